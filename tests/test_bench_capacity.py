"""``bench_capacity``'s per-thread CPU rows: each telemetry thread's CPU is read from
``/proc`` and attributed to its role (Linux only: elsewhere the rows are left out)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from benchmarks.bench_capacity import _thread_cpu


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_thread_cpu_is_attributed_to_each_telemetry_thread_by_role():
    burnt, release = threading.Barrier(3), threading.Event()

    def burn(seconds: float) -> None:
        start = time.thread_time()
        while time.thread_time() - start < seconds:
            pass
        burnt.wait()
        release.wait()

    threads = [
        threading.Thread(target=burn, args=(0.3,), name="penwatch-my-run-dispatch"),
        threading.Thread(target=burn, args=(0.0,), name="penwatch-sink-Probe#2"),
    ]
    before = _thread_cpu()  # threads an earlier test left behind count from here
    for thread in threads:
        thread.start()
    try:
        burnt.wait()
        after = _thread_cpu()
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert not [role for role in after if "my-run" in role], after  # the run's name left out
    assert 0.25 <= after["dispatch"] - before.get("dispatch", 0.0) <= 1.0, (before, after)
    assert after["sink-Probe#2"] < 0.1, after
