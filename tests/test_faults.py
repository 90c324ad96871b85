"""Telemetry faults never stop training, and every loss is counted.

Metrics port taken, OTLP collector unreachable, SQLite store read-only or deleted
mid-run, a sink that raises, a sink that recovers, a full queue.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

import penwatch as pw
from penwatch._demo import _train
from penwatch._demo._tracing import configure_tracing
from penwatch.store import StoreWriter

STEPS = 8


def _metrics(step: int) -> dict[str, float]:
    return {"l1": float(step), "l1_weight": 1.0, "l1_weighted": float(step), "total": float(step)}


def test_metrics_port_already_taken(caplog):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    records: list = []
    try:
        with caplog.at_level(logging.ERROR, logger="penwatch.telemetry"):
            monitor = pw.Monitor(
                "port",
                sinks=[pw.sinks.Prometheus(port=port), pw.sinks.Callback(records.append)],
                close_timeout=1.0,
            )
            state = _train.run(monitor, steps=STEPS)
            monitor.close()
    finally:
        holder.close()
    assert int(state.step) == STEPS  # training completed
    assert [r.step for r in records] == list(range(STEPS))  # the other sink got everything
    stats = monitor.stats
    prom = stats.sinks["Prometheus"]
    assert prom.errors >= 1 and not prom.healthy
    # buffered while the port stayed taken, counted when close stopped waiting
    assert prom.written == 0 and prom.lost["unfinished"] == STEPS
    assert stats.sinks["Callback"].written == STEPS
    errors = [r for r in caplog.records if "sink Prometheus cannot write" in r.getMessage()]
    assert len(errors) == 1 and "Address already in use" in errors[0].getMessage()


def test_collector_unreachable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=1)
    provider, counting = configure_tracing(exporter=exporter)
    records: list = []
    monitor = pw.Monitor(
        "collector", sinks=[pw.sinks.OpenTelemetry(provider), pw.sinks.Callback(records.append)]
    )
    start = time.perf_counter()
    state = _train.run(monitor, steps=STEPS)
    assert time.perf_counter() - start < 30
    monitor.close()
    provider.shutdown()  # the batch processor's final export fails too
    assert int(state.step) == STEPS and len(records) == STEPS
    assert monitor.sink_errors["OpenTelemetry"] == 0  # the API never raises
    assert counting.failed == STEPS and counting.exported == 0  # every lost span counted


_READONLY_CHILD = textwrap.dedent(
    """
    import os, sys
    import jax, penwatch as pw, penwatch.store, penwatch.sinks._sqlite
    jax.devices()  # load everything while still able to read the interpreter's files
    if os.getuid() == 0:  # root ignores file modes: continue as an unprivileged user
        os.setgid(65534)
        os.setuid(65534)
    seen = []
    monitor = pw.Monitor(
        "ro", sinks=[pw.sinks.SQLite(sys.argv[1]), pw.sinks.Callback(seen.append)],
        close_timeout=1.0,
    )
    for step in range(20):
        monitor.record(step, {"l1": 1.0, "l1_weight": 1.0, "total": 1.0})
    monitor.close()
    s = monitor.stats.sinks["SQLite"]
    print(len(seen), s.errors, s.written, s.lost["unfinished"])
    """
)


def test_store_read_only():
    # In a directory an unprivileged user can reach (pytest's tmp dirs are root-only).
    base = tempfile.mkdtemp(prefix="penwatch-ro-")
    try:
        os.chmod(base, 0o755)
        path = os.path.join(base, "ro.db")
        StoreWriter(path).close()  # an existing store
        os.chmod(path, 0o444)
        env = dict(os.environ, HOME=base, JAX_PLATFORMS="cpu")
        out = subprocess.run(
            [sys.executable, "-c", _READONLY_CHILD, path],
            capture_output=True, text=True, env=env, cwd=base, timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    delivered, errors, written, unfinished = map(int, out.stdout.split())
    assert delivered == 20  # the other sink got every record
    assert errors >= 1 and written == 0 and unfinished == 20  # the store's losses are counted
    assert "sink SQLite cannot write" in out.stderr


def test_store_deleted_mid_run(tmp_path):
    path = tmp_path / "gone.db"
    records: list = []
    with pw.Monitor(
        "gone", sinks=[pw.sinks.SQLite(path), pw.sinks.Callback(records.append)], alerts=[]
    ) as monitor:
        for step in range(10):
            monitor.record(step, _metrics(step))
        assert monitor.flush(timeout=10)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.remove(f"{path}{suffix}")
        for step in range(10, 20):
            monitor.record(step, _metrics(step))
    assert len(records) == 20
    assert monitor.stats.lost("SQLite") == 0
    with sqlite3.connect(path) as conn:
        steps = [s for (s,) in conn.execute("SELECT step FROM steps ORDER BY step")]
    assert steps == list(range(10, 20))  # written to the recreated store


def test_a_sink_that_raises_is_isolated(caplog):
    calls = []

    def broken(record):
        calls.append(record.step)
        raise RuntimeError("boom")

    records: list = []
    with (
        caplog.at_level(logging.ERROR, logger="penwatch.telemetry"),
        pw.Monitor(
            "raises",
            sinks=[pw.sinks.Callback(broken), pw.sinks.Callback(records.append)],
            alerts=[],
        ) as monitor,
    ):
        for step in range(50):
            monitor.record(step, _metrics(step))
    stats = monitor.stats
    assert len(records) == 50
    # a RuntimeError is not an outage: each record is tried alone once, then dropped
    assert sorted(set(calls)) == list(range(50))
    assert stats.sinks["Callback"].errors == len(calls)
    assert stats.sinks["Callback"].lost == {"overflow": 0, "poison": 50, "unfinished": 0}
    assert stats.lost("Callback#2") == 0 and stats.sinks["Callback#2"].written == 50
    logged = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(logged) == 1  # logged once


def test_a_sink_that_recovers_loses_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="penwatch.telemetry")
    delivered = []
    fail = threading.Event()
    fail.set()

    def flaky(record):
        if fail.is_set():
            raise ConnectionError("collector down")
        delivered.append(record.step)

    with pw.Monitor("flaky", sinks=[pw.sinks.Callback(flaky)], alerts=[]) as monitor:
        for step in range(10):
            monitor.record(step, _metrics(step))
        assert not monitor.flush(timeout=0.5)  # the collector is down: not written yet
        assert monitor.sink_errors["Callback"] >= 1
        # logs tell the truth: no "recovered" before a write succeeded; the count is there
        assert not [r for r in caplog.records if "recovered" in r.getMessage()]
        assert any(" records buffered (up to max_pending" in r.getMessage() for r in caplog.records)
        fail.clear()  # the collector is back
        deadline = time.monotonic() + 10
        step = 10
        while not delivered and time.monotonic() < deadline:  # until the backoff ends
            monitor.record(step, _metrics(step))  # the buffered records are replayed first
            step += 1
            monitor.flush(timeout=10)
            time.sleep(0.02)
    assert delivered == list(range(step))
    assert monitor.stats.lost("Callback") == 0
    assert [r for r in caplog.records if "recovered" in r.getMessage()]


class _SlowScalar:
    """Stands in for a device array whose computation finishes when the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def block_until_ready(self) -> _SlowScalar:
        self.gate.wait(timeout=10)
        return self

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(0.0, dtype=dtype)


def test_full_queue_drops_the_oldest_and_counts(caplog):
    records: list = []
    events: list = []
    prom = pw.sinks.Prometheus(port=None)
    slow = _SlowScalar()
    monitor = pw.Monitor(
        "full",
        sinks=[prom, pw.sinks.Callback(records.append, on_event=events.append)],
        alerts=[],
        max_queue=4,
    )
    monitor.record(0, {"v": slow})  # the worker waits on this one (the device is busy)
    deadline = time.monotonic() + 10
    while monitor.pending and time.monotonic() < deadline:
        time.sleep(0.001)  # until the worker holds record 0
    start = time.perf_counter()
    for step in range(1, 21):
        monitor.record(step, _metrics(step))
    assert time.perf_counter() - start < 0.1  # never blocks
    assert monitor.pending == 4
    slow.gate.set()
    with caplog.at_level(logging.WARNING, logger="penwatch.telemetry"):
        monitor.close()
    assert [r.step for r in records] == [0, 17, 18, 19, 20]  # the newest kept
    assert monitor.stats.dropped["queue_full"] == 16
    (gap,) = [e for e in events if e.name == "records_dropped"]  # the gap, marked once
    assert gap.attributes["reason"] == "queue_full" and gap.attributes["count"] == 16
    assert (gap.attributes["first_step"], gap.attributes["last_step"]) == (1, 16)
    # close() logs a summary whenever anything was lost
    assert any("queue_full" in r.getMessage() for r in caplog.records), caplog.text
    labels = {"run": "full", "process": "0", "reason": "queue_full"}
    assert prom.registry.get_sample_value("penwatch_telemetry_dropped_total", labels) == 16


def test_the_default_queue_holds_4096_records_while_the_device_is_busy():
    # docs/telemetry.md: 4,096 by default, two seconds of records at 2,000 steps/s
    records: list = []
    slow = _SlowScalar()
    monitor = pw.Monitor("default", sinks=[pw.sinks.Callback(records.append)], alerts=[])
    monitor.record(0, {"v": slow})  # the ready thread waits on this one
    deadline = time.monotonic() + 10
    while monitor.pending and time.monotonic() < deadline:
        time.sleep(0.001)
    for step in range(1, 4097 + 3):
        monitor.record(step, _metrics(step))
    assert monitor.pending == 4096
    slow.gate.set()
    monitor.close()
    assert monitor.stats.dropped["queue_full"] == 3
    assert [r.step for r in records] == [0, *range(4, 4100)]


@pytest.mark.parametrize("max_queue", [1, 3])
def test_queue_bound_holds_under_a_stalled_worker(max_queue):
    slow = _SlowScalar()
    monitor = pw.Monitor("bound", alerts=[], max_queue=max_queue)
    monitor.record(0, {"v": slow})
    for step in range(1, 100):
        monitor.record(step, _metrics(step))
        assert monitor.pending <= max_queue + 1
    slow.gate.set()
    monitor.close()
    assert monitor.stats.processed + monitor.stats.dropped["queue_full"] == 100
