"""The suite's own promise (README, Development): the test files marked ``parallel``,
which ``make test`` runs on two workers, hold no wall-clock assertion, start no process,
thread, server or monitor; the files marked ``concurrent``, which it runs two at a time,
measure no duration (they await processes, with deadlines only); ``make test`` runs
all three parts, the rest alone; and the processes the tests start share one JAX
compilation cache, which the pytest processes leave alone."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^pytestmark = pytest\.mark\.parallel\b", re.M)
CONCURRENT = re.compile(r"^pytestmark = .*pytest\.mark\.concurrent\b", re.M)
MEASURING = re.compile(r"perf_counter|process_time|thread_time|timeit|elapsed")
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


def test_concurrent_files_measure_no_duration():
    marked = [
        p for p in sorted((ROOT / "tests").glob("test_*.py")) if CONCURRENT.search(p.read_text())
    ]
    assert len(marked) >= 5, marked  # the examples, the demo, the wheel, the browser
    for path in marked:
        text = path.read_text()
        assert not MARK.search(text), f"{path.name} is marked both parallel and concurrent"
        found = sorted({m.group(0) for m in MEASURING.finditer(text)})
        assert not found, f"{path.name} is marked concurrent but measures time: {found}"


def test_make_test_runs_the_parallel_and_concurrent_parts_on_workers_and_the_rest_alone():
    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "-m parallel -n 2" in recipe
    assert "-m concurrent -n 2 --dist loadfile" in recipe
    assert '-m "not parallel and not concurrent"' in recipe


def test_started_processes_share_a_compilation_cache_the_pytest_process_does_not_write():
    cache = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    assert jax.config.jax_compilation_cache_dir is None  # this process: no cache writes
    salt = secrets.randbelow(1 << 30)  # a program no earlier process compiled
    code = f"import jax, jax.numpy as jnp; print(jax.jit(lambda x: x * {salt})(jnp.ones(2)))"
    before = set(cache.iterdir()) if cache.exists() else set()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert set(cache.iterdir()) - before, f"the child wrote nothing to {cache}"
