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
written to ``bench-results/`` instead of ``docs/img/``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys

from benchmarks._harness import Report, Row, machine, quick

_ROWS = "PENWATCH_BENCH_ROWS"  # where a child process writes its rows (JSON)
LAST = ("bench_dashboard",)


def main(argv: list[str]) -> int:
    if os.environ.get(_ROWS):  # a child: run one module, hand its rows back
        return _run_one(argv[0], pathlib.Path(os.environ[_ROWS]))
    here = pathlib.Path(__file__).parent
    names = sorted((p.stem for p in here.glob("bench_*.py")), key=lambda n: (n in LAST, n))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    print(machine() + ("  (QUICK mode)" if quick() else ""), flush=True)
    report = Report()
    for name in names:
        print(f"== {name}", flush=True)
        out = here.parent / "bench-results" / f"{name}.json"
        out.parent.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        env = {**os.environ, _ROWS: str(out)}
        os.sync()  # the previous benchmark's disk writeback must not land in this one's timings
        code = subprocess.call([sys.executable, "-m", "benchmarks", name], env=env)
        if code != 0 or not out.exists():
            report.add(f"{name}: benchmark process failed (exit {code})", 0.0, passed=False)
            continue
        report.rows.extend(Row(**row) for row in json.loads(out.read_text()))
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
