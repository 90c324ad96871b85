"""SPEC section 11: every record reaches every healthy sink, every loss is counted.

Sink isolation (a slow, hung or failing sink never starves another), the per-sink outage
buffer honoured at its size, exact accounting under random faults (a property test),
bad records rejected at the call or dropped alone, SIGTERM/SIGINT and exceptions ending a
run with the right status, a crashed process read as ``crashed``, device time, and a
bounded span-exporter shutdown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import penwatch as pw
from penwatch import store
from penwatch.schema import StepRecord


def _values(step: int) -> dict[str, float]:
    return {"l1": float(step), "l1_weight": 1.0, "l1_weighted": float(step), "total": 1.0}


def _stored_steps(path, run: str = "r") -> list[int]:
    return [s for s, _, _ in store.StoreReader(path).records(run)]


def _check_accounting(stats: pw.telemetry.MonitorStats) -> None:
    """recorded = written + counted as lost, for every sink."""
    before = sum(stats.dropped.values())
    for name, sink in stats.sinks.items():
        assert sink.pending == 0, name
        assert stats.recorded == before + sink.received, name
        assert sink.received == sink.written + sum(sink.lost.values()), (name, sink)


# --- a property test: random faults, exact accounting ---------------------------------


class _Faulty(pw.sinks.Sink):
    """A sink that follows a script of faults, one per write call, then writes."""

    def __init__(self, name: str, faults: Sequence[str], release: threading.Event) -> None:
        self.name, self.faults, self.release = name, list(faults), release
        self.calls = 0
        self.steps: list[int] = []
        self.max_pending = 64
        self.batch_size = 8
        self.max_delay = 0.002

    def write_step(self, record: StepRecord) -> None:
        self.write_steps([record])

    def write_steps(self, records: Sequence[StepRecord]) -> None:
        fault = self.faults[self.calls] if self.calls < len(self.faults) else "ok"
        self.calls += 1
        if fault == "raise":
            raise RuntimeError("a record this sink cannot take")
        if fault == "down":
            raise ConnectionError("the collector is down")
        if fault == "sleep":
            time.sleep(0.02)
        if fault == "hang":
            self.release.wait(10)
        self.steps.extend(r.step for r in records)


_FAULT = st.sampled_from(["ok", "ok", "raise", "down", "sleep", "hang"])


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    scripts=st.lists(st.lists(_FAULT, max_size=12), min_size=1, max_size=3),
    n=st.integers(min_value=1, max_value=120),
)
def test_accounting_is_exact_under_random_sink_faults(scripts, n):
    release = threading.Event()
    sinks = [_Faulty(f"s{i}", script, release) for i, script in enumerate(scripts)]
    healthy: list[StepRecord] = []
    monitor = pw.Monitor(
        "faults",
        sinks=[*sinks, pw.sinks.Callback(healthy.append)],
        alerts=[],
        close_timeout=1.0,
        max_queue=4096,
    )
    for step in range(n):
        monitor.record(step, _values(step))
    monitor.close()
    stats = monitor.stats
    release.set()
    _check_accounting(stats)
    assert [r.step for r in healthy] == list(range(n))  # the healthy sink got everything
    for sink in sinks:
        own = stats.sinks[sink.name]
        if "hang" not in sink.faults:  # a hung write may finish after the counts were sealed
            assert own.written == len(sink.steps), (sink.faults, own)
            assert sorted(sink.steps) == sorted(set(sink.steps)), "a record written twice"
        if "raise" not in sink.faults:
            assert own.lost["poison"] == 0, (sink.faults, own)  # outages are never poison
        if set(sink.faults) <= {"ok", "sleep"} and n <= sink.max_pending:
            assert own.written == n, (sink.faults, own)  # slowness within the buffer: no loss


# --- isolation ------------------------------------------------------------------------


def test_a_one_second_per_write_sink_beside_sqlite_leaves_the_store_complete(tmp_path):
    path = tmp_path / "s.db"

    def slow(record: StepRecord) -> None:
        time.sleep(1.0)

    monitor = pw.Monitor(
        "r",
        sinks=[pw.sinks.Callback(slow), pw.sinks.SQLite(path)],
        alerts=[],
        close_timeout=3.0,
    )
    start = time.perf_counter()
    for step in range(1000):
        monitor.record(step, _values(step))
    recording = time.perf_counter() - start
    monitor.close()
    assert recording < 2.0  # the training thread never waited for the slow sink
    assert _stored_steps(path) == list(range(1000))
    stats = monitor.stats
    assert stats.sinks["SQLite"].written == 1000
    assert stats.sinks["Callback"].written <= 5  # it really was slow...
    _check_accounting(stats)  # ...and what it never wrote is counted


class _Meeting(pw.sinks.Sink):
    """A sink whose flush waits (bounded) until every other such sink is flushing too."""

    batch_size, max_delay, flush_interval = 1024, 60.0, 60.0

    def __init__(self, name: str, barrier: threading.Barrier) -> None:
        self.name, self.barrier = name, barrier
        self.written: list[int] = []
        self.met: list[bool] = []

    def write_step(self, record: StepRecord) -> None:
        self.written.append(record.step)

    def flush(self) -> None:
        try:
            self.barrier.wait()
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)


def test_flush_asks_every_sink_before_waiting_for_any():
    """The sinks write and flush side by side: a flush that waited for each sink before
    asking the next would leave the first alone at the barrier until it broke."""
    barrier = threading.Barrier(2, timeout=5.0)
    sinks = [_Meeting("a", barrier), _Meeting("b", barrier)]
    with pw.Monitor("r", sinks=sinks, alerts=[]) as monitor:
        for step in range(50):
            monitor.record(step, _values(step))
        assert monitor.flush(timeout=20.0)
        for sink in sinks:
            assert sink.written == list(range(50)), sink.name
            assert sink.met == [True], sink.name  # met the other one at its flush


def test_an_unreachable_pushgateway_leaves_the_store_complete(tmp_path):
    path = tmp_path / "s.db"
    with socket.socket() as blackhole:  # accepts connections, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        url = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        prom = pw.sinks.Prometheus(port=None, pushgateway=url, push_interval=0.0)
        prom.flush_interval = 0.05  # push (and hang) as often as possible
        monitor = pw.Monitor("r", sinks=[prom, pw.sinks.SQLite(path)], alerts=[], close_timeout=2.0)
        for step in range(2000):
            monitor.record(step, _values(step))
            if step % 200 == 0:
                time.sleep(0.05)
        monitor.close()
    assert _stored_steps(path) == list(range(2000))
    _check_accounting(monitor.stats)


# --- the outage buffer ----------------------------------------------------------------


def test_a_5000_record_outage_with_max_pending_10000_loses_nothing(tmp_path):
    path = tmp_path / "s.db"
    monitor = pw.Monitor(
        "r",
        sinks=[pw.sinks.SQLite(path, max_pending=10_000, busy_timeout=0.01)],
        alerts=[],
        max_queue=10_000,
    )
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the store cannot be written
    for step in range(5000):
        monitor.record(step, _values(step))
    deadline = time.monotonic() + 30
    # every record handed to the sink, and a write tried and refused (the first try may
    # still be waiting out the busy timeout when the last record arrives)
    while time.monotonic() < deadline:
        held = monitor.stats.sinks["SQLite"]
        if held.received == 5000 and held.errors >= 1:
            break
        time.sleep(0.01)
    assert held.written == 0 and held.pending == 5000 and held.errors >= 1
    blocker.execute("ROLLBACK")  # the outage ends
    resumed = time.monotonic()
    assert monitor.flush(timeout=30)
    assert time.monotonic() - resumed < 5.0  # writing resumes promptly, not after 30 s
    monitor.close()
    assert _stored_steps(path) == list(range(5000))
    stats = monitor.stats
    assert stats.lost("SQLite") == 0
    _check_accounting(stats)


def test_the_documented_default_outage_buffer_is_the_one_used():
    # docs/telemetry.md and the docstring promise 100,000 records for the store.
    sink = pw.sinks.SQLite(":memory:")
    assert sink.max_pending == 100_000
    with pw.Monitor("r", sinks=[sink], alerts=[]) as monitor:
        assert monitor._dispatch.workers[0].max_pending == 100_000


# --- bad records ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step",
    [2**63, -(2**63) - 1, True, 1.5, "3", None, np.uint64(2**63), jnp.zeros(()), jnp.arange(2)],
)
def test_a_bad_step_raises_at_the_call_and_later_records_are_stored(tmp_path, step):
    path = tmp_path / "s.db"
    with pw.Monitor("r", sinks=[pw.sinks.SQLite(path)], alerts=[]) as monitor:
        monitor.record(0, _values(0))
        with pytest.raises((TypeError, ValueError), match=r"Monitor\.record: argument 'step'"):
            monitor.record(step, _values(1))
        for s in range(1, 5):
            monitor.record(s, _values(s))
    assert _stored_steps(path) == list(range(5))
    assert monitor.stats.recorded == 5


def test_record_checks_keys_and_pipeline_at_the_call():
    with pw.Monitor("r", alerts=[]) as monitor:
        with pytest.raises(TypeError, match="string keys"):
            monitor.record(0, {1: 1.0})
        with pytest.raises(ValueError, match="'pipeline' must be a non-empty string"):
            monitor.record(0, {"a": 1.0}, pipeline="")
        monitor.record(2**63 - 1, {"a": 1.0})  # the int64 edge is fine
        monitor.record(jnp.int32(7), {"a": 1.0})  # a device step, read later
    assert monitor.stats.recorded == 2


def test_a_record_the_sink_cannot_take_is_dropped_alone(tmp_path):
    class Picky(pw.sinks.Sink):
        name = "Picky"

        def __init__(self) -> None:
            self.steps: list[int] = []

        def write_step(self, record: StepRecord) -> None:
            if record.step == 7:
                raise OverflowError("cannot store this one")
            self.steps.append(record.step)

    picky = Picky()
    with pw.Monitor("r", sinks=[picky], alerts=[]) as monitor:
        for step in range(100):
            monitor.record(step, _values(step))
    assert picky.steps == [s for s in range(100) if s != 7]
    assert monitor.stats.sinks["Picky"].lost == {"overflow": 0, "poison": 1, "unfinished": 0}
    _check_accounting(monitor.stats)


def test_records_still_queued_at_a_close_timeout_are_counted():
    gate = threading.Event()

    def stuck(record: StepRecord) -> None:
        gate.wait(10)

    monitor = pw.Monitor("r", sinks=[pw.sinks.Callback(stuck)], alerts=[])
    for step in range(300):
        monitor.record(step, _values(step))
    start = time.perf_counter()
    assert monitor.close(timeout=0.5) is False
    assert time.perf_counter() - start < 1.5
    gate.set()
    stats = monitor.stats
    assert stats.sinks["Callback"].lost["unfinished"] >= 299
    _check_accounting(stats)


# --- shutdown and status ----------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    import penwatch as pw
    path, mode = sys.argv[1], sys.argv[2]
    monitor = pw.Monitor("child", sinks=[pw.sinks.SQLite(path, heartbeat=0.2)], alerts=[])
    def train():
        for step in range(1_000_000):
            monitor.record(step, {"l1": 1.0, "l1_weight": 1.0, "total": 1.0})
            print(step, flush=True)
            time.sleep(0.002)
    if mode == "with":
        with monitor:
            train()
    else:
        train()  # no close(): the handler and atexit must flush
    """
)


def _start_child(path, mode: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    last = -1
    while last < 200:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        last = int(line)
    return proc, last


@pytest.mark.parametrize("mode", ["with", "plain"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_flushes_every_step_and_marks_the_run_stopped(tmp_path, mode, sig):
    path = tmp_path / "s.db"
    proc, last = _start_child(path, mode)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    printed = [int(line) for line in out.split()]
    last = printed[-1] if printed else last
    assert proc.returncode != 0  # the signal still ends the process
    steps = _stored_steps(path, "child")
    assert steps[: last + 1] == list(range(last + 1)) and len(steps) in (last + 1, last + 2), err
    (run,) = store.StoreReader(path).runs()
    assert run.status == "stopped", err


def test_a_stop_signal_whose_exception_was_swallowed_still_ends_the_loop(tmp_path):
    """Code a signal interrupts may swallow the KeyboardInterrupt penwatch's handler
    raises (a demo was seen training on after Ctrl-C under load); the handler also records
    the signal on every open monitor, and the demo's loop checks ``monitor.stop_signal``
    each step."""
    from penwatch._demo import _train

    monitor = pw.Monitor("sig", sinks=[pw.sinks.SQLite(tmp_path / "s.db")], alerts=[])
    closed = pw.Monitor("closed", sinks=[], alerts=[])
    closed.close()
    assert monitor.stop_signal is None
    with contextlib.suppress(KeyboardInterrupt):  # swallowed, as interrupted code may
        signal.raise_signal(signal.SIGINT)  # the handler runs here, in the main thread
    assert monitor.stop_signal == signal.SIGINT
    assert closed.stop_signal is None  # only monitors still open are marked

    def guard(step: int) -> None:
        assert step < 3, "the loop did not see the stop signal"

    _train.run(monitor, steps=None, on_step=guard)  # ends at once instead of forever
    monitor.close()
    (run,) = store.StoreReader(tmp_path / "s.db").runs()
    assert run.status == "stopped"
    later = pw.Monitor("after", sinks=[], alerts=[])  # opened after the signal: unaffected
    assert later.stop_signal is None
    later.close()


def test_the_demo_exits_130_for_a_ctrl_c_its_loop_saw_only_through_the_monitor(
    tmp_path, monkeypatch
):
    """docs/telemetry.md: the demo ends on ``monitor.stop_signal``; a Ctrl-C seen that
    way (its KeyboardInterrupt swallowed) still exits 130 with the run ``stopped``."""
    from penwatch import cli
    from penwatch._demo import _train

    def swallowing_run(monitor, **kwargs):
        monitor.record(0, {"l1": 1.0, "l1_weight": 1.0, "total": 1.0})
        with contextlib.suppress(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(_train, "run", swallowing_run)
    db = tmp_path / "demo.db"
    args = ["demo", "--no-dashboard", "--metrics-port", "0", "--db", str(db), "--run", "c"]
    assert cli.main(args) == 130
    (run,) = store.StoreReader(db).runs()
    assert run.status == "stopped"


def test_a_killed_process_reads_as_crashed_and_a_live_one_as_running(tmp_path):
    dead, live = tmp_path / "dead.db", tmp_path / "live.db"
    proc, _ = _start_child(dead, "plain")
    other, _ = _start_child(live, "plain")
    try:
        proc.kill()  # SIGKILL: no handler, no flush, status stays "running"
        proc.communicate(timeout=30)
        time.sleep(1.0)
        (crashed,) = store.StoreReader(dead, stale_after=0.6).runs()
        (running,) = store.StoreReader(live, stale_after=0.6).runs()
    finally:
        other.kill()
        other.communicate(timeout=30)
    assert crashed.status == "crashed"
    assert running.status == "running"  # its heartbeat (0.2 s) keeps it fresh


def test_an_exception_in_with_marks_the_run_failed_and_propagates(tmp_path):
    path = tmp_path / "s.db"
    nonfinite = pw.alerts.NonFinite(action="raise")
    with (
        pytest.raises(KeyError, match="the training error"),  # not NonFiniteDetected
        pw.Monitor("r", sinks=[pw.sinks.SQLite(path)], alerts=[nonfinite]) as monitor,
    ):
        monitor.record(0, {"l1": float("nan"), "l1_weight": 1.0})
        assert monitor._intake.drained(10)  # the alert fired: an error is pending
        raise KeyError("the training error")
    (run,) = store.StoreReader(path).runs()
    assert run.status == "failed"
    assert _stored_steps(path) == [0]


def test_a_normal_close_marks_the_run_finished(tmp_path):
    path = tmp_path / "s.db"
    with pw.Monitor("r", sinks=[pw.sinks.SQLite(path)], alerts=[]) as monitor:
        monitor.record(0, _values(0))
    (run,) = store.StoreReader(path).runs()
    assert run.status == "finished"


def test_span_exporter_shutdown_is_bounded_when_the_collector_does_not_answer():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from penwatch._demo._tracing import configure_tracing, shutdown_tracing

    with socket.socket() as blackhole:  # accepts, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}/v1/traces"
        provider, _ = configure_tracing(exporter=OTLPSpanExporter(endpoint=endpoint, timeout=30))
        with pw.Monitor("r", sinks=[pw.sinks.OpenTelemetry(provider)], alerts=[]) as monitor:
            for step in range(50):
                monitor.record(step, _values(step))
        start = time.perf_counter()
        finished = shutdown_tracing(provider)
        took = time.perf_counter() - start
    assert not finished and took <= 2.5


# --- device time ------------------------------------------------------------------------


def test_device_time_of_back_to_back_steps_is_their_own_time():
    x = jnp.ones((384, 384), jnp.float32)

    @jax.jit
    def work(a):
        for _ in range(8):
            a = jnp.tanh(a @ a) * 0.5
        return {"v": a.sum()}

    jax.block_until_ready(work(x))
    blocking = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(work(x))
        blocking.append(time.perf_counter() - start)
    true_time = float(np.median(blocking))
    records: list[StepRecord] = []
    with pw.Monitor("dev", sinks=[pw.sinks.Callback(records.append)], alerts=[]) as monitor:
        for step in range(20):  # dispatched back to back: the host runs ahead
            dispatched = time.time_ns()
            out = work(x)
            monitor.record(step, out, dispatched_at_ns=dispatched)
    durations = [r.duration_seconds for r in records]
    measured = float(np.median(durations))
    assert true_time / 2 <= measured <= true_time * 2, (true_time, durations)
    queued = (records[-1].ready_at_ns - records[-1].dispatched_at_ns) / 1e9
    assert records[-1].duration_seconds < queued or queued < 2 * true_time
