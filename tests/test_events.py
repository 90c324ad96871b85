"""penwatch.events: attach/detach, compute start/stop events, failing handlers, tracing."""

from __future__ import annotations

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw
from penwatch import events

START, STOP = events.PIPELINE_COMPUTE_START, events.PIPELINE_COMPUTE_STOP


@pytest.fixture(autouse=True)
def clean_handlers():
    yield
    for info in events.list_handlers():
        if info.handler_id.startswith("test-"):
            events.detach(info.handler_id)


@pytest.fixture(scope="module")
def pipe() -> pw.Pipeline:
    return pw.pipeline([("l1", 0.5), ("l2", 0.25)], name="reg")


X = jnp.array([[1.0, -2.0], [0.5, 3.0]])


def recorder(store: list):
    def handler(event, measurements, metadata):
        store.append((event, dict(measurements), dict(metadata)))

    return handler


def test_start_and_stop_events_carry_the_seed_fields(pipe):
    seen: list = []
    events.attach_many("test-both", [START, STOP], recorder(seen))
    total, metrics = pipe.compute(X)
    assert [e for e, _, _ in seen] == [START, STOP]
    (_, start_m, start_meta), (_, stop_m, stop_meta) = seen
    assert isinstance(start_m["system_time"], int) and start_m["system_time"] > 1.6e18
    assert start_meta["pipeline"] == "reg" and start_meta["size"] == 2
    assert isinstance(stop_m["duration"], int) and stop_m["duration"] >= 0
    assert stop_meta["pipeline"] == "reg" and stop_meta["track_grad_norms"] is False
    assert stop_meta["total"] is total and stop_meta["metrics"] is metrics
    assert isinstance(stop_meta["total"], jax.Array)  # device arrays: no host sync
    np.testing.assert_allclose(stop_meta["metrics"]["l1"], 6.5)


def test_detach_stops_delivery(pipe):
    seen: list = []
    events.attach("test-stop", STOP, recorder(seen))
    pipe.compute(X)
    assert events.detach("test-stop") is True
    assert events.detach("test-stop") is False
    pipe.compute(X)
    assert len(seen) == 1
    assert not events.has_handlers(STOP) or all(
        not h.handler_id.startswith("test-") for h in events.list_handlers(STOP)
    )


def test_raising_handler_is_logged_and_detached_caller_unaffected(pipe, caplog):
    seen: list = []

    def bad(event, measurements, metadata):
        raise RuntimeError("handler bug")

    events.attach("test-bad", STOP, bad)
    events.attach("test-good", STOP, recorder(seen))
    with caplog.at_level(logging.ERROR, logger="penwatch.events"):
        total, _ = pipe.compute(X)
    np.testing.assert_allclose(total, 0.5 * 6.5 + 0.25 * 14.25)
    assert len(seen) == 1  # the good handler still ran
    records = [r for r in caplog.records if "test-bad" in r.getMessage()]
    assert records and records[0].exc_info and "handler bug" in str(records[0].exc_info[1])
    assert "test-bad" not in {h.handler_id for h in events.list_handlers()}
    caplog.clear()
    pipe.compute(X)
    assert len(seen) == 2 and not caplog.records  # detached: not called again


def test_no_events_inside_traces(pipe):
    seen: list = []
    events.attach_many("test-trace", [START, STOP], recorder(seen))
    jax.jit(lambda p, x: p.compute(x, track_grad_norms=True))(pipe, X)
    jax.grad(lambda x: pipe.compute(x)[0])(X)
    jax.vmap(lambda x: pipe.compute(x)[0])(X)
    jax.jit(pw.pipeline(["l1"]).compute)(X)  # traced input, concrete weights
    assert seen == []
    pipe.compute(X, track_grad_norms=True)
    assert len(seen) == 2 and seen[1][2]["track_grad_norms"] is True


def test_multi_pipeline_emits_the_same_events():
    seen: list = []
    events.attach("test-multi", STOP, recorder(seen))
    mp = pw.multi_pipeline([("consistency", 1.0, ("a", "b"))], name="pair")
    mp.compute({"a": X, "b": 2 * X})
    assert len(seen) == 1 and seen[0][2]["pipeline"] == "pair"


def test_exception_event_and_error_propagates():
    seen: list = []
    events.attach("test-exc", events.PIPELINE_COMPUTE_EXCEPTION, recorder(seen))
    p = pw.Pipeline().add("vec", lambda x: x)  # not a scalar: fails while tracing
    with pytest.raises(ValueError, match="must return a scalar"):
        p.compute(X)
    assert len(seen) == 1
    _, measurements, metadata = seen[0]
    assert measurements["duration"] >= 0 and metadata["kind"] == "ValueError"


def test_attach_validation():
    events.attach("test-dup", STOP, lambda *a: None)
    with pytest.raises(ValueError, match="already attached"):
        events.attach("test-dup", START, lambda *a: None)
    with pytest.raises(ValueError, match="sequence of strings"):
        events.attach("test-x", "penwatch.pipeline", lambda *a: None)
    with pytest.raises(ValueError, match="callable"):
        events.attach("test-y", STOP, 42)
    with pytest.raises(ValueError, match="non-empty"):
        events.attach("", STOP, lambda *a: None)


def test_execute_with_custom_events_and_threads():
    counts = {"n": 0}
    lock = threading.Lock()

    def count(event, measurements, metadata):
        with lock:
            counts["n"] += 1

    events.attach("test-count", ("app", "tick"), count)

    def churn(i: int) -> None:
        for j in range(200):
            hid = f"test-churn-{i}-{j}"
            events.attach(hid, ("app", "tick"), lambda *a: None)
            events.execute(("app", "tick"), {"value": j}, {"i": i})
            events.detach(hid)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts["n"] == 800
    assert [h.handler_id for h in events.list_handlers(("app",))] == ["test-count"]
