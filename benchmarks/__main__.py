"""Run every ``benchmarks/bench_*.py`` module and print one table of ratios.

Each module exposes ``run(report: Report) -> None``. Exit status is 1 when a bar fails.
Usage: ``python -m benchmarks [name ...]`` (names filter the modules, e.g. ``pipeline``).
"""

from __future__ import annotations

import importlib
import pathlib
import platform
import sys

import jax

from benchmarks._harness import Report


def main(argv: list[str]) -> int:
    here = pathlib.Path(__file__).parent
    names = sorted(p.stem for p in here.glob("bench_*.py"))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    report = Report()
    device = jax.devices()[0]
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={_cpus()} "
        f"backend={jax.default_backend()} device={device.device_kind} jax={jax.__version__}"
    )
    for name in names:
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").run(report)
    print()
    print(report.markdown())
    return 1 if report.failed else 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
