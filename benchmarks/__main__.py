"""Run every ``benchmarks/bench_*.py`` module and print one table of ratios.

Each module exposes ``run(report: Report) -> None`` and runs in a fresh Python process
of its own, after an ``os.sync()``, so one benchmark's heap, threads and disk writeback
never weigh on another's timings. The benchmarks that write big files (``LAST``: the
dashboard's 200,000-step store) run last: runs that followed it measured the monitor at
1.07-1.08x (1.02-1.04x alone) and the [256,10] gradient norms at 1.6-1.8x (0.98x alone),
and the kernel's memory reclaim thread was busy afterwards. Exit status is 1 when a bar
fails.

Usage: ``python -m benchmarks [name ...]`` (names filter the modules, e.g. ``pipeline``);
``PENWATCH_BENCH_QUICK=1`` for a quick run (fewer repeats, small scaling sweeps, plots
written to ``bench-results/`` instead of ``docs/img/``). Each benchmark's rows are kept
as JSON in ``bench-results/<name>.json`` (``PENWATCH_BENCH_RESULTS`` names another
directory).

After each benchmark three rows say how the machine fared meanwhile: the share of its
CPUs that other processes used and the share the hypervisor took (steal), both from
``/proc/stat`` (Linux), and how long a fixed CPU workload took just before and just after
(:func:`~benchmarks._harness.reference_seconds`; a shared machine's CPUs slow down with
their neighbours' work without counting it as steal). On the 2-core development machine
the same code measured a 10,000 records/s loop at 0.99x its bare rate one hour and 0.70x
the next, with no other process running and 1.3 % steal: compare runs by the reference
time too.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

from benchmarks._harness import (
    Report,
    Row,
    contention,
    cpu_times,
    machine,
    quick,
    reference_seconds,
)

_ROWS = "PENWATCH_BENCH_ROWS"  # where a child process writes its rows (JSON)
RESULTS_ENV = "PENWATCH_BENCH_RESULTS"
"""A directory for each benchmark's rows (``<name>.json``); ``bench-results/`` by default."""
LAST = ("bench_dashboard",)


def main(argv: list[str]) -> int:
    if os.environ.get(_ROWS):  # a child: run one module, hand its rows back
        return _run_one(argv[0], pathlib.Path(os.environ[_ROWS]))
    here = pathlib.Path(__file__).parent
    names = sorted((p.stem for p in here.glob("bench_*.py")), key=lambda n: (n in LAST, n))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    results = pathlib.Path(os.environ.get(RESULTS_ENV) or here.parent / "bench-results")
    print(machine() + ("  (QUICK mode)" if quick() else ""), flush=True)
    report = Report()
    for name in names:
        print(f"== {name}", flush=True)
        out = results / f"{name}.json"
        out.parent.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        env = {**os.environ, _ROWS: str(out)}
        os.sync()  # the previous benchmark's disk writeback must not land in this one's timings
        reference = [reference_seconds()]
        before, start = cpu_times(), time.monotonic()
        code = subprocess.call([sys.executable, "-m", "benchmarks", name], env=env)
        wall, after = time.monotonic() - start, cpu_times()
        reference.append(reference_seconds())
        if code != 0 or not out.exists():
            report.add(f"{name}: benchmark process failed (exit {code})", 0.0, passed=False)
            continue
        report.rows.extend(Row(**row) for row in json.loads(out.read_text()))
        if before is not None and after is not None:
            cpus = os.cpu_count() or 1  # /proc/stat's line sums every CPU of the machine
            others, steal = contention(before, after, wall=wall, cpus=cpus)
            report.add(f"  machine during {name}: CPU used by other processes", 100 * others,
                       unit="%")  # fmt: skip
            report.add(f"  machine during {name}: CPU stolen by the hypervisor", 100 * steal,
                       unit="%")  # fmt: skip
        for when, seconds in zip(("before", "after"), reference, strict=True):
            report.add(f"  machine {when} {name}: fixed reference workload", 1e3 * seconds,
                       unit=" ms")  # fmt: skip
    print()
    print(report.markdown())
    return 1 if report.failed else 0


def _run_one(name: str, out: pathlib.Path) -> int:
    report = Report()
    importlib.import_module(f"benchmarks.{name}").run(report)
    out.write_text(json.dumps([dataclasses.asdict(row) for row in report.rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
