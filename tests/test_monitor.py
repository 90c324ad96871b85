"""pw.Monitor: never blocks the training thread, keeps order, measures device time,
names the first non-finite offender, flushes on close and at interpreter exit."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw
from penwatch.schema import find_nonfinite, layout_of, leaf_reports
from penwatch.telemetry import leaf_nonfinite


class _SlowScalar:
    """A stand-in for a device array still being computed: ready when the gate opens.

    Records which threads waited on it or read it, so the test can prove that the
    training thread did neither (``jax.block_until_ready`` calls ``block_until_ready``
    on such leaves, ``jax.device_get`` calls ``__array__``).
    """

    def __init__(self, value: float) -> None:
        self.gate = threading.Event()
        self.value = value
        self.touched_by: set[str] = set()

    def block_until_ready(self) -> _SlowScalar:
        self.touched_by.add(threading.current_thread().name)
        self.gate.wait(timeout=10)
        return self

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        self.touched_by.add(threading.current_thread().name)
        return np.asarray(self.value, dtype=dtype)

    def __float__(self) -> float:
        self.touched_by.add(threading.current_thread().name)
        return self.value


def _pipeline_metrics(value: float = 1.0) -> dict[str, float]:
    return {
        "l1": value,
        "l1_weighted": 0.1 * value,
        "l1_weight": 0.1,
        "total": 0.1 * value,
    }


def _collect() -> tuple[list[pw.telemetry.StepRecord], list[pw.telemetry.Event], pw.sinks.Sink]:
    records: list = []
    events: list = []
    return records, events, pw.sinks.Callback(records.append, on_event=events.append)


def test_the_monitor_leaves_the_garbage_collector_to_the_application(tmp_path):
    # docs/telemetry.md advises gc.freeze() after setup and says penwatch never does it
    import gc

    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    with pw.Monitor("gc", sinks=[pw.sinks.SQLite(tmp_path / "gc.db")]) as monitor:
        for step in range(20):
            monitor.record(step, pw.Metrics.pack({"loss": jnp.float32(step)}))
    assert monitor.stats.sinks["SQLite"].written == 20
    assert gc.get_freeze_count() == frozen and gc.isenabled() == enabled


def test_record_returns_before_results_are_ready_and_duration_is_device_time():
    records, _, sink = _collect()
    slow = _SlowScalar(2.0)
    with pw.Monitor("gate", sinks=[sink], alerts=[]) as monitor:
        metrics = {"l1": slow, "l1_weight": jnp.float32(1.0)}  # built (and compiled) first
        dispatched = time.time_ns()
        start = time.perf_counter()
        monitor.record(0, metrics, dispatched_at_ns=dispatched)
        assert time.perf_counter() - start < 0.2, "record() waited for the device"
        assert threading.current_thread().name not in slow.touched_by
        held = 0.3
        time.sleep(held)  # the "device" is still busy: nothing may have been processed
        assert monitor.records == 0
        slow.gate.set()
        assert monitor.flush(timeout=10)
    assert threading.current_thread().name not in slow.touched_by
    assert slow.touched_by  # the worker read it
    (rec,) = records
    assert rec.values["l1"] == 2.0
    assert rec.duration_seconds >= held
    assert rec.ready_at_ns - rec.dispatched_at_ns == pytest.approx(rec.duration_seconds * 1e9)


def test_record_of_real_device_arrays_does_not_wait():
    @jax.jit
    def slow(x):
        return jax.lax.fori_loop(0, 200, lambda i, a: jnp.tanh(a @ a), x)[0, 0]

    x = jnp.eye(256) * 0.5
    jax.block_until_ready(slow(x))  # compile
    records, _, sink = _collect()
    with pw.Monitor("async", sinks=[sink], alerts=[]) as monitor:
        start = time.perf_counter()
        y = slow(x)
        monitor.record(0, {"v": y})
        recorded = time.perf_counter() - start
        jax.block_until_ready(y)
        total = time.perf_counter() - start
    assert recorded < total / 2, (recorded, total)
    assert records[0].duration_seconds >= 0.5 * total


def test_records_keep_order_and_values():
    records, _, sink = _collect()
    with pw.Monitor("order", sinks=[sink], alerts=[]) as monitor:
        for step in range(50):
            monitor.record(step, _pipeline_metrics(jnp.float32(step)), pipeline="p")
    assert [r.step for r in records] == list(range(50))
    assert all(r.values["l1"] == r.step for r in records)
    assert records[3].penalties == ("l1",)
    l1 = records[3].penalty("l1")
    assert (l1.value, l1.weighted, l1.weight) == (3.0, pytest.approx(0.3), pytest.approx(0.1))
    assert records[3].pipeline == "p" and records[3].run == "order"
    assert records[3].kind == "pipeline_compute"
    assert monitor.stats.processed == monitor.stats.recorded == 50


def test_loss_argument_and_kind_inference():
    records, _, sink = _collect()
    with pw.Monitor("loss", sinks=[sink], alerts=[]) as monitor:
        monitor.record(0, {"total": 1.0}, loss=jnp.float32(2.5))
        monitor.record(1, {"loss": 3.0, "base_loss": 2.0, "total": 1.0})
        monitor.record(2, {"loss": 3.0, "base_loss": 2.0}, loss=1.5)
        monitor.record(3, {"x": 1.0}, kind="train_step")
    assert records[0].loss == 2.5 and records[0].values["loss"] == 2.5
    assert records[1].loss == 2.0 and records[1].kind == "train_step"
    assert records[2].loss == 1.5 and records[2].values["loss"] == 3.0
    assert records[0].kind == "pipeline_compute" and records[3].kind == "train_step"


def test_non_scalar_and_private_keys_are_not_metrics():
    records, _, sink = _collect()
    with pw.Monitor("keys", sinks=[sink], alerts=[]) as monitor:
        monitor.record(0, {"m": jnp.ones((2, 2)), "_x": 1.0, "ok": jnp.array(True), "v": 2})
    assert dict(records[0].values) == {"ok": 1.0, "v": 2.0}


def test_first_offender_order_and_leaf_report():
    values = {
        "loss": math.nan,
        "base_loss": 1.0,
        "a": 1.0,
        "a_weight": 1.0,
        "a_weighted": 1.0,
        "b": math.inf,
        "b_weight": 1.0,
        "b_weighted": math.inf,
        "total": math.inf,
        "base_grad_share": math.nan,
        "b_grad_share": math.nan,
    }
    found = find_nonfinite(tuple(values.values()), layout_of(values, ("a", "b")))
    assert [nf.key for nf in found] == [
        "b", "b_weighted", "total", "loss", "base_grad_share", "b_grad_share",
    ]  # fmt: skip
    assert found[0].kind == "inf" and found[0].source == "penalty" and found[0].penalty == "b"
    assert found[3].kind == "nan" and found[3].source == "loss"
    assert found[4].source == "gradient" and found[4].penalty is None

    counts = jax.device_get(
        leaf_nonfinite(
            params={"w": jnp.array([1.0, jnp.nan]), "n": jnp.arange(3)},
            grads={"w": jnp.array([jnp.inf, jnp.nan]), "v": jnp.full(5, jnp.nan)},
        )
    )
    assert set(counts["params"]) == {"['w']"}  # integer leaves are skipped
    leaves = leaf_reports(counts, max_leaves=5)
    # Inf holders first, then params before grads, then row order; counts never reorder
    assert [(lf.tree, lf.path, lf.nan_count, lf.inf_count) for lf in leaves] == [
        ("grads", "['w']", 1, 1),
        ("params", "['w']", 1, 0),
        ("grads", "['v']", 5, 0),
    ]
    assert len(leaf_reports(counts, max_leaves=2)) == 2


def test_leaf_nonfinite_works_under_jit():
    fn = jax.jit(lambda p: leaf_nonfinite(params=p))
    out = fn({"w": jnp.array([jnp.nan, jnp.inf, 1.0])})
    assert [int(c) for c in out["params"]["['w']"]] == [1, 1]


def test_nonfinite_in_a_record_is_reported_with_leaves():
    records, events, sink = _collect()
    metrics = {
        **_pipeline_metrics(jnp.float32(jnp.nan)),
        "_leaf_nonfinite": {"params": {"['w']": (jnp.int32(3), jnp.int32(0))}},
    }
    with pw.Monitor("nan", sinks=[sink]) as monitor:  # default alerts: [NonFinite()]
        monitor.record(0, metrics)
    (rec,) = records
    assert rec.first_offender.key == "l1" and not rec.ok
    assert rec.leaves[0].path == "['w']" and rec.leaves[0].nan_count == 3
    assert rec.kind == "train_step"
    (event,) = events
    assert event.kind == "nonfinite" and event.name == "NonFinite"
    assert "'l1'" in event.message and "params['w']" in event.message


@pytest.mark.parametrize("wait", [False, True])
def test_raise_inside_with_raises_the_first_episode(wait):
    # Two episodes (steps 1-2 and 4) in one `with`: whether record() raises mid-loop or
    # close() in __exit__ raises at the end, the user catches the *first* episode's
    # error, never the second's.
    _, _, sink = _collect()
    values = [1.0, float("nan"), float("nan"), 1.0, float("inf"), 1.0]
    monitor = pw.Monitor("first", sinks=[sink], alerts=[pw.alerts.NonFinite(action="raise")])
    with pytest.raises(pw.alerts.NonFiniteDetected) as info, monitor as m:
        for step, v in enumerate(values):
            if wait:
                m.flush(timeout=10)  # the worker has seen every earlier step
            m.record(step, _pipeline_metrics(v))
    assert info.value.record.step == 1 and info.value.kind == "nan"


def test_close_never_replaces_a_propagating_exception_with_the_first_episode():
    _, _, sink = _collect()
    monitor = pw.Monitor("exc", sinks=[sink], alerts=[pw.alerts.NonFinite(action="raise")])
    with pytest.raises(KeyError, match="the user's error"), monitor as m:
        m.record(0, _pipeline_metrics(float("nan")))
        raise KeyError("the user's error")


def test_raise_action_raises_on_the_training_thread_at_the_next_call():
    records, _, sink = _collect()
    monitor = pw.Monitor("raise", sinks=[sink], alerts=[pw.alerts.NonFinite(action="raise")])
    monitor.record(0, _pipeline_metrics(float("nan")))
    monitor.flush(timeout=10)
    with pytest.raises(pw.alerts.NonFiniteDetected) as info:
        monitor.record(1, _pipeline_metrics(1.0))
    assert isinstance(info.value, pw.NonFiniteError)
    assert info.value.kind == "nan" and info.value.path == "l1"
    assert info.value.record.step == 0
    monitor.record(2, _pipeline_metrics(1.0))  # raised once only
    monitor.close()
    assert [r.step for r in records] == [0, 2]


def test_close_is_quick_idempotent_and_drops_later_records():
    records, _, sink = _collect()
    monitor = pw.Monitor("close", sinks=[sink], alerts=[])
    for step in range(200):
        monitor.record(step, _pipeline_metrics(jnp.float32(step)))
    start = time.perf_counter()
    assert monitor.close()
    assert time.perf_counter() - start < 0.5
    assert monitor.close()
    assert len(records) == 200
    monitor.record(200, _pipeline_metrics())
    assert monitor.stats.refused == 1 and monitor.stats.recorded == 200


def test_monitor_is_garbage_collected_and_flushes():
    records, _, sink = _collect()
    monitor = pw.Monitor("gc", sinks=[sink], alerts=[])
    monitor.record(0, _pipeline_metrics())
    ref = weakref.ref(monitor)
    del monitor
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 10
    while len(records) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(records) == 1


def test_flush_at_interpreter_exit(tmp_path):
    out = tmp_path / "steps.txt"
    script = textwrap.dedent(
        f"""
        import penwatch as pw
        lines = open({str(out)!r}, "w")
        sink = pw.sinks.Callback(lambda r: (lines.write(f"{{r.step}}\\n"), lines.flush()))
        monitor = pw.Monitor("exit", sinks=[sink], alerts=[])
        for step in range(5):
            monitor.record(step, {{"l1": 1.0, "l1_weight": 1.0}})
        # no close(): the atexit hook must flush
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert out.read_text().split() == ["0", "1", "2", "3", "4"]


def test_instrumented_pipeline_records_and_emits_events():
    records, _, sink = _collect()
    seen = []
    pw.events.attach("test-instrument", pw.events.PIPELINE_COMPUTE_STOP, lambda *a: seen.append(a))
    try:
        with pw.Monitor("inst", sinks=[sink], alerts=[]) as monitor:
            pipe = pw.instrument(pw.pipeline([("l1", 0.5), ("l2", 0.25)]), monitor, label="reg")
            x = jnp.arange(4.0)
            total, _ = pipe.compute(x)
            pipe2 = pipe.update_weight("l1", 1.0)
            assert isinstance(pipe2, pw.telemetry.InstrumentedPipeline)
            pipe2.compute(x, track_grad_norms=True)
    finally:
        pw.events.detach("test-instrument")
    assert float(total) == pytest.approx(0.5 * 6 + 0.25 * 14)
    assert [r.step for r in records] == [0, 1]
    assert records[0].kind == "pipeline_compute" and records[0].pipeline == "reg"
    assert records[1].values["l1_weight"] == 1.0 and "l1_grad_norm" in records[1].values
    assert all(r.duration_seconds is not None and r.duration_seconds >= 0 for r in records)
    assert len(seen) == 2 and seen[0][2]["pipeline"] == "default"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_queue": 0}, "'max_queue' must be an integer >= 1"),
        ({"run": ""}, "'run' must be a non-empty string"),
        ({"sinks": [object()]}, r"'sinks\[0\]' must be a penwatch.sinks.Sink"),
        ({"alerts": [1]}, r"'alerts\[0\]' must be a penwatch alert"),
        ({"open_timeout": -1}, "'open_timeout' must be"),
    ],
)
def test_monitor_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=f"penwatch.Monitor: option {match}"):
        pw.Monitor(**{"run": "bad", **kwargs})


def test_record_rejects_a_non_mapping():
    with (
        pw.Monitor("bad", alerts=[]) as monitor,
        pytest.raises(
            TypeError, match=r"penwatch\.Monitor\.record: argument 'metrics' must be a mapping"
        ),
    ):
        monitor.record(0, [1.0])


def test_a_runs_leaf_counts_are_read_in_one_host_copy(monkeypatch):
    """docs/ARCHITECTURE.md: a train step's per-leaf NaN/Inf counts are one array per
    step; the dispatcher reads a batch's arrays in one host copy and builds the leaf
    report of the steps whose counts are not all zero, those alone."""
    import optax

    import penwatch.telemetry._dispatch as dispatch_module
    from penwatch.schema import RunInfo
    from penwatch.telemetry._dispatch import Dispatch

    copies: list[int] = []
    real = dispatch_module.host_rows

    def counted(arrays):
        copies.append(len(arrays))
        return real(arrays)

    monkeypatch.setattr(dispatch_module, "host_rows", counted)
    init, step = pw.build_train_step(
        lambda p, x: x @ p["w"], optax.l2_loss, pw.pipeline([("l1", 0.1)]), optax.sgd(0.1)
    )
    state = init({"w": jnp.ones((3, 2))})
    y = jnp.zeros((4, 2))
    xs = [jnp.full((4, 3), np.nan if i == 20 else 1.0) for i in range(24)]
    metrics = [step(state, (x, y))[1] for x in xs]
    jax.block_until_ready(metrics)
    dispatch = Dispatch(RunInfo("r", 0, "v", "cpu", 1, 0.0), [], [], max_leaves=5)
    records = list(dispatch._records(_items(metrics)))
    assert copies == [24]  # the batch's 24 counts arrays, in one copy
    assert [bool(r.leaves) for r in records] == [i == 20 for i in range(24)]
    assert {(lf.tree, lf.path) for lf in records[20].leaves} == {
        ("grads", "['w']"),
        ("params", "['w']"),  # updated by the NaN gradient
    }


def test_leaf_counts_are_one_array_for_every_tree_and_read_as_a_mapping():
    import pickle

    from penwatch.schema import LeafCounts, TreeLeafCounts

    params = {"w": jnp.array([1.0, jnp.nan, jnp.inf]), "b": jnp.zeros(2), "n": jnp.arange(3)}
    grads = {"w": jnp.array([jnp.inf, 0.0, 0.0])}
    out = jax.jit(lambda p, g: leaf_nonfinite(params=p, grads=g))(params, grads)
    assert isinstance(out, TreeLeafCounts) and list(out) == ["params", "grads"]
    assert len(jax.tree_util.tree_leaves(out)) == 1  # one [n, 2] array for both trees
    assert out.counts.shape == (3, 2) and out.counts.dtype == jnp.int32
    assert isinstance(out["params"], LeafCounts)
    assert set(out["params"]) == {"['w']", "['b']"}  # integer leaves are skipped
    assert [int(c) for c in out["params"]["['w']"]] == [1, 1]
    assert [int(c) for c in out["grads"]["['w']"]] == [0, 1]
    with pytest.raises(KeyError):
        out["activations"]
    host = jax.device_get(out)
    assert isinstance(host, TreeLeafCounts) and isinstance(host.counts, np.ndarray)
    assert sorted(host["params"].rows()) == [("['b']", 0, 0), ("['w']", 1, 1)]
    again = pickle.loads(pickle.dumps(host))
    assert again.trees == host.trees and np.array_equal(again.counts, host.counts)
    assert TreeLeafCounts.pack({}).counts.shape == (0, 2)
    assert LeafCounts.pack({}).counts.shape == (0, 2)


def test_computed_records_are_stamped_within_a_poll_not_held_for_a_batch():
    """docs/telemetry.md: while records keep coming the ready thread looks every
    READY_POLL (1 ms) instead of being woken per record, so a record already computed is
    stamped ~1 ms late at most — it never waits for READY_BATCH records to pile up (at the
    pace below, 32 records take ≈ 64 ms)."""
    from penwatch.telemetry._intake import READY_BATCH, READY_POLL

    records, _, sink = _collect()
    with pw.Monitor("poll", sinks=[sink], alerts=[]) as monitor:
        for i in range(120):
            due = time.perf_counter() + 0.002
            monitor.record(i, _pipeline_metrics(float(i)))  # host floats: computed at once
            while time.perf_counter() < due:  # pace one record per 2 ms
                pass
    assert len(records) == 120
    late = sorted((r.ready_at_ns - r.dispatched_at_ns) / 1e9 for r in records)
    median = late[len(late) // 2]
    assert median < 5 * READY_POLL, f"median stamp delay {1e3 * median:.2f} ms"
    assert median < READY_BATCH * 0.002 / 4


def _items(metrics: list, **kw) -> list:
    from penwatch.telemetry._intake import Item

    return [
        Item(payload=(m, None, i), step=i, wall_time=100.0 + i, dispatched_at_ns=10 * i,
             ready_at_ns=10 * i + 5, device_ns=5 + i, **kw)
        for i, m in enumerate(metrics)
    ]  # fmt: skip


def test_runs_of_packed_records_are_built_together_exactly_as_one_by_one():
    """The dispatcher reads a run of packed Metrics of one structure with one
    conversion (Metrics.scalar_rows); every field of every record equals the record
    built alone, NaN/Inf reports and kinds included, across structure changes."""
    from penwatch.schema import RunInfo
    from penwatch.telemetry._dispatch import Dispatch

    pipe = pw.pipeline([("l1", 0.1), ("l2", 0.2)])
    step = jax.jit(lambda x: pipe.compute(x)[1].merge({"base_loss": jnp.sum(x)}))
    xs = [jnp.full(3, v) for v in (1.0, np.nan, 2.0, np.inf, -1.0)]
    trained = [step(x) for x in xs]  # train-step-like: base_loss present
    plain = [pipe.compute(x)[1] for x in xs[:3]]  # another structure: pipeline_compute
    items = _items(trained + plain + trained[:2])
    dispatch = Dispatch(RunInfo("r", 0, "v", "cpu", 1, 0.0), [], [], max_leaves=5)
    together = list(dispatch._records(items))
    alone = [dispatch.build(item) for item in items]
    assert repr(together) == repr(alone)  # every field; repr: NaN equals NaN, floats exact
    assert [r.kind for r in together] == ["train_step"] * 5 + ["pipeline_compute"] * 3 + [
        "train_step"
    ] * 2
    assert together[1].nonfinite and together[1].loss != together[1].loss  # NaN base loss
    assert together[3].nonfinite[0].kind == "inf"
    assert together[0].loss == pytest.approx(3.0)
    explicit = _items(trained[:3], kind="custom")
    assert [r.kind for r in dispatch._records(explicit)] == ["custom"] * 3


def test_the_ready_thread_waits_for_a_metrics_last_buffer_and_for_anything_else_whole():
    """docs/telemetry.md: a Metrics recorded without a separate loss is waited for through
    its last packed buffer (all its buffers come from one computation); any other payload
    leaf by leaf."""
    from penwatch.telemetry._intake import _computed, _representative

    m = pw.Metrics.pack({"a": jnp.float32(1.0), "ok": jnp.bool_(True)})
    assert _representative((m, None, 0)) is m.buffers[-1]
    assert _representative((m, jnp.float32(2.0), 0)) is None  # a loss of its own
    assert _representative((m, None, jnp.int32(0))) is None  # a device step
    assert _representative(({"a": jnp.float32(1.0)}, None, 0)) is None
    assert _representative((jax.device_get(m), None, 0)) is None  # NumPy buffers
    assert _computed((m, None, 0)) and _computed((jax.device_get(m), None, 0))
    slow = _SlowScalar(1.0)
    assert not _computed(({"a": slow}, None, 0))  # waited for, not assumed
    m.buffers[-1].delete()
    assert not _computed((m, None, 0))  # deleted: left to block_until_ready to report


def test_values_are_right_when_a_metrics_buffers_come_from_several_computations():
    """docs/telemetry.md: the ready thread waits for a Metrics' last buffer only; the
    dispatcher checks each buffer before reading it, so an earlier buffer still being
    computed (a Metrics rebuilt from separate computations) is waited for, not misread."""
    template = pw.Metrics.pack({"a": jnp.float32(0.0), "ok": jnp.bool_(True)})
    structure = jax.tree_util.tree_structure(template)
    big = jnp.ones((1200, 1200))  # ~0.2 s here: longer than the dispatcher's batch timer
    slow = jax.jit(lambda x, v: jnp.full(1, v) + 0.0 * jnp.sum(((x @ x) @ x) @ x))
    records, _, sink = _collect()
    with pw.Monitor("several", sinks=[sink], alerts=[]) as monitor:
        for i in range(3):
            first = slow(big, float(i))  # still computing when the record is queued
            last = jnp.array([True])  # ready at once: the one the ready thread watches
            assert not first.is_ready()  # the premise
            monitor.record(i, jax.tree_util.tree_unflatten(structure, [first, last]))
    assert [r.values["a"] for r in records] == [float(i) for i in range(3)]
    assert all(r.values["ok"] == 1.0 for r in records)


def test_train_step_records_are_built_together_exactly_as_one_by_one():
    """A penwatch train step's Metrics carry its NaN/Inf leaf counts unpacked; runs of
    them are built together too (their counts read in one copy), and a step with a
    non-zero count is built alone with its leaf report, in order."""
    import optax

    from penwatch.schema import RunInfo
    from penwatch.telemetry._dispatch import Dispatch

    def linear(params, x):
        return x @ params["w"] + params["b"]

    init, step = pw.build_train_step(
        linear, optax.l2_loss, pw.pipeline([("l1", 0.1), ("l2", 0.2)]), optax.sgd(0.1)
    )
    state = init({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)})
    y = jnp.zeros((4, 2))
    xs = [jnp.full((4, 3), v) for v in (1.0, 2.0, np.nan, 3.0, np.inf, 4.0)]
    metrics = [step(state, (x, y))[1] for x in xs]
    assert metrics[0].unpacked_keys == ("_leaf_nonfinite",)
    items = _items(metrics)
    dispatch = Dispatch(RunInfo("r", 0, "v", "cpu", 1, 0.0), [], [], max_leaves=5)
    together = list(dispatch._records(items))
    alone = [dispatch.build(item) for item in items]
    assert repr(together) == repr(alone)  # every field; repr: NaN equals NaN, floats exact
    assert [bool(r.leaves) for r in together] == [False, False, True, False, True, False]
    assert {r.kind for r in together} == {"train_step"}


def test_dispatched_buffers_are_deleted_only_when_the_monitor_holds_them_alone():
    """Freeing a device array releases the GIL inside jaxlib (a hand-off per buffer on
    the dispatch thread); the dispatcher deletes the packed buffers it holds alone with
    Array.delete() instead, and never touches what the user still references."""
    from penwatch.telemetry._intake import _release

    def fresh() -> pw.Metrics:
        return pw.Metrics.pack({"a": jnp.float32(1.0), "ok": jnp.bool_(True)})

    def _counts() -> pw.schema.TreeLeafCounts:
        return pw.telemetry.leaf_nonfinite(params={"w": jnp.ones(2)})

    assert _release((fresh(), None, 0)) == 2  # nobody else holds them: both deleted
    kept = fresh()
    assert _release((kept, None, 0)) == 0  # the user's Metrics
    assert kept.scalars() == {"a": 1.0, "ok": 1.0}
    m = fresh()
    buffers = m.buffers
    del m
    assert _release((pw.Metrics.pack({"x": 1.0}), None, 0)) == 1
    payload = (buffers and fresh(), None, 0)
    assert _release(payload) == 2
    one = fresh()
    first = one.buffers[0]
    payload = (one, None, 0)
    del one
    assert _release(payload) == 1  # the buffer kept by the user stays
    assert not first.is_deleted() and float(first[0]) == 1.0
    assert _release(({"a": jnp.float32(1.0)}, None, 0)) == 0  # plain mappings: as usual
    # a train step's leaf counts (one array for both trees) too, unless the user holds them
    counts = pw.telemetry.leaf_nonfinite(params={"w": jnp.ones(2)}, grads={"w": jnp.ones(2)})
    assert _release((fresh().merge({"_leaf_nonfinite": counts}), None, 0)) == 2
    assert not counts.counts.is_deleted()
    del counts
    made = pw.telemetry.leaf_nonfinite(params={"w": jnp.ones(2)})
    payload = (fresh().merge({"_leaf_nonfinite": made}), None, 0)
    array = made.counts
    del made
    assert _release(payload) == 2  # the counts array is still held (by `array`)
    assert not array.is_deleted()
    payload = (fresh().merge({"_leaf_nonfinite": _counts()}), None, 0)
    assert _release(payload) == 3  # both packed buffers and the counts

    # end to end: a monitor deletes what the training loop let go, and nothing it kept
    records, _, sink = _collect()
    held = []
    with pw.Monitor("release", sinks=[sink], alerts=[]) as monitor:
        for i in range(50):
            m = fresh()
            if i % 10 == 0:
                held.append(m)
            monitor.record(i, m)
            del m
    assert len(records) == 50
    assert monitor._intake.released == 2 * 45
    assert all(h.scalars() == {"a": 1.0, "ok": 1.0} for h in held)


@pytest.mark.parametrize("skip", [False, True])
def test_a_nan_in_an_unrecorded_step_shows_next_only_without_skip_nonfinite(skip):
    # docs/telemetry.md, "At thousands of steps per second": recording every N-th step, a
    # non-finite step that is not recorded reaches the next recorded one through the
    # parameters, unless skip_nonfinite dropped its update.
    import optax

    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jnp.ones((16, 1))
    params = {"w": jnp.full((4, 1), 0.1)}
    init, step = pw.build_train_step(
        lambda p, v: v @ p["w"],
        lambda pred, target: (pred - target) ** 2,
        pw.pipeline([("l2", 1e-3)]),
        optax.sgd(0.1),
        skip_nonfinite=skip,
    )
    state = init(params)
    records: list = []
    with pw.Monitor("every2", sinks=[pw.sinks.Callback(records.append)], alerts=[]) as monitor:
        for i in range(6):
            batch = (x.at[0, 0].set(jnp.nan), y) if i == 3 else (x, y)
            state, metrics = step(state, batch)
            if i % 2 == 0:  # steps 0, 2, 4 recorded; the NaN is at step 3
                monitor.record(i, metrics)
    assert [r.step for r in records] == [0, 2, 4]
    assert records[0].ok and records[1].ok
    assert records[2].ok is skip


def test_step_record_constructor_takes_every_field_with_its_default():
    """StepRecord's hand-written ``__init__`` (one dict update, not a frozen
    dataclass's per-field setattr) names every field, in order, with the field's
    default, so records built by keyword, positionally or by ``dataclasses.replace``
    are the dataclass they declare."""
    import dataclasses
    import inspect

    from penwatch.schema import StepRecord

    fields = dataclasses.fields(StepRecord)
    params = list(inspect.signature(StepRecord).parameters.values())
    assert [p.name for p in params] == [f.name for f in fields]
    for field, param in zip(fields, params, strict=True):
        if field.default is not dataclasses.MISSING:
            assert param.default == field.default, field.name
        elif field.default_factory is not dataclasses.MISSING:
            assert param.default is None, field.name  # None gives a fresh default
        else:
            assert param.default is inspect.Parameter.empty, field.name
    values = {"l1": 1.0, "l1_weight": 0.5, "l1_weighted": 0.5, "total": 0.5}
    record = StepRecord("r", 0, 3, "p", 1.0, values)
    assert record.layout == layout_of(values) and record.dropped == {}
    assert record.kind == "pipeline_compute" and record.trace_id is None
    other = StepRecord("r", 0, 3, "p", 1.0, values)
    assert other.dropped is not record.dropped  # no shared mutable default
    moved = dataclasses.replace(record, step=4, loss=2.0)
    assert (moved.step, moved.loss, moved.values) == (4, 2.0, values)
    assert dataclasses.replace(moved, step=3, loss=None) == record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.step = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        StepRecord("r", 0, 3, "p", 1.0, values, colour="red")  # type: ignore[call-arg]


def test_the_dispatcher_takes_ready_records_in_batches_of_64_or_after_its_delay(monkeypatch):
    # docs/telemetry.md: ready records are taken in batches (64, or after at most 0.2 s,
    # or at once for a flush/close)
    from penwatch.telemetry import _intake

    assert (_intake.DISPATCH_BATCH, _intake.DISPATCH_DELAY) == (64, 0.2)
    arrived: list[tuple[int, float]] = []
    done = threading.Event()

    def write(record):
        arrived.append((record.step, time.perf_counter()))
        if len(arrived) == 64:
            done.set()

    # one record waits for the batch's timer, no longer than it (within a margin)
    with pw.Monitor("timer", sinks=[pw.sinks.Callback(write)], alerts=[]) as monitor:
        start = time.perf_counter()
        monitor.record(0, {"l1": 1.0, "l1_weight": 1.0})
        deadline = time.monotonic() + 10
        while not arrived and time.monotonic() < deadline:
            time.sleep(0.01)
    assert arrived, "the record never reached the sink without a flush"
    assert 0.2 <= arrived[0][1] - start < 5.0

    # with the timer out of the way, the 64th ready record wakes the dispatcher at once
    monkeypatch.setattr(_intake, "DISPATCH_DELAY", 60.0)
    arrived.clear()
    with pw.Monitor("cap", sinks=[pw.sinks.Callback(write)], alerts=[]) as monitor:
        for step in range(64):
            monitor.record(step, {"l1": float(step), "l1_weight": 1.0})
        assert done.wait(10), f"{len(arrived)} of 64 records reached the sink"
        monitor.record(64, {"l1": 64.0, "l1_weight": 1.0})
        time.sleep(0.3)  # one ready record waits for the 60-s timer (or the close below)
        assert [step for step, _ in arrived] == list(range(64))
    assert [step for step, _ in arrived] == list(range(65))
