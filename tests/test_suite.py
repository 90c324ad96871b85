"""The suite's own promise (README, Development): the test files marked ``parallel``,
which ``make test`` runs on two workers, hold no wall-clock assertion, start no process,
thread, server or monitor; and ``make test`` runs both halves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^pytestmark = pytest\.mark\.parallel\b", re.M)
FORBIDDEN = re.compile(
    r"\btime\.|perf_counter|monotonic|sleep\(|subprocess|threading|socket|http|"
    r"Monitor\(|run_examples|Popen"
)


def test_parallel_files_use_no_clock_process_or_server():
    marked = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if MARK.search(p.read_text())]
    assert len(marked) >= 10, marked  # the numerical half of the suite
    for path in marked:
        found = sorted({m.group(0) for m in FORBIDDEN.finditer(path.read_text())})
        assert not found, f"{path.name} is marked parallel but uses {found}"


def test_make_test_runs_the_parallel_half_on_workers_and_the_rest_alone():
    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "-m parallel -n 2" in recipe
    assert '-m "not parallel"' in recipe
