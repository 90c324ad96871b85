"""The recipes the docs promise: step-based weight schedules and ParamTerm.weight
(docs/training.md), the Logging sink's level and seeing spans locally
(docs/telemetry.md)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import penwatch as pw
from penwatch.store._synthetic import synthetic_record

X = jax.random.normal(jax.random.key(0), (32, 4))
Y = X @ jnp.array([[1.0], [-2.0], [0.5], [0.0]])


def _apply(params, x):
    return x @ params["w"]


def test_step_based_schedule_changes_weights_every_step_without_recompiling():
    steps = 12
    schedule = pw.weight_schedule(
        {
            "output_magnitude": ("warmup", 0.05, 8),
            "l2": optax.linear_schedule(1e-2, 0.0, transition_steps=steps - 1),
        }
    )
    pipe = pw.pipeline([("output_magnitude", 0.0)])
    init_fn, step_fn = pw.build_train_step(
        _apply, optax.l2_loss, pipe, optax.sgd(1e-2),
        param_terms={"l2": pw.diagnostics.l2_term(1e-2)},
    )  # fmt: skip
    state = init_fn({"w": jnp.ones((4, 1))})
    seen = []
    for step in range(steps):
        state = pw.apply_scheduled_weights(state, schedule(step, steps))
        assert float(state.param_terms["l2"].weight) == pytest.approx(
            float(1e-2 * (1 - step / (steps - 1))), abs=1e-8
        )
        params_before = state.params
        state, metrics = step_fn(state, (X, Y))
        seen.append(float(metrics["output_magnitude_weight"]))
        weight = float(state.param_terms["l2"].weight)
        assert float(metrics["l2_weight"]) == pytest.approx(weight, abs=1e-9)
        raw = float(jnp.sum(params_before["w"] ** 2))
        assert float(metrics["l2"]) == pytest.approx(raw, rel=1e-5)  # unweighted
        assert float(metrics["l2_weighted"]) == pytest.approx(weight * raw, rel=1e-5, abs=1e-9)
    np.testing.assert_allclose(seen, [0.05 * min(s / 8, 1.0) for s in range(steps)], rtol=1e-6)
    assert step_fn.plain._cache_size() == 1  # weights are data: one compilation


def test_param_term_weight_is_a_leaf_read_and_replaced_without_recompiling():
    term = pw.diagnostics.l2_term(jnp.float32(1e-3))
    assert float(term.weight) == pytest.approx(1e-3)
    params = {"w": jnp.arange(3.0)}
    traces = []

    @jax.jit
    def value(t, p):
        traces.append(1)
        return t.value_and_grad(p)[0]

    assert float(value(term, params)) == pytest.approx(1e-3 * 5.0)
    stronger = dataclasses.replace(term, weight=jnp.float32(1e-1))
    assert float(value(stronger, params)) == pytest.approx(1e-1 * 5.0)
    assert len(traces) == 1
    assert jax.tree.leaves(term) == [term.weight]


def _log(sink: pw.sinks.Logging, *, nan: bool = False) -> None:
    record = synthetic_record("r", 3, nan=nan)
    sink.write_step(record)


def test_logging_sink_level_and_the_loggers_level(caplog):
    logger = logging.getLogger("penwatch.recipe")
    caplog.set_level(logging.INFO, logger="penwatch.recipe")
    _log(pw.sinks.Logging(logger))  # INFO step lines: shown under INFO
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    caplog.clear()
    debug = pw.sinks.Logging(logger, level=logging.DEBUG)
    _log(debug)  # DEBUG step lines: hidden under INFO ...
    assert caplog.records == []
    _log(debug, nan=True)  # ... but a non-finite step is logged at WARNING
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    caplog.clear()
    debug.write_event(pw.schema.Event("r", 0, 3, 0.0, "alert", "A", "m", severity="info"))
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # events at their severity
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="penwatch.recipe")  # the logger allows DEBUG
    _log(debug)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_spans_locally_in_memory_recipe():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with pw.Monitor("local", sinks=[pw.sinks.OpenTelemetry(provider)]) as monitor:
        for step in range(3):
            monitor.record(step, dict(synthetic_record("local", step).values))
    finished = spans.get_finished_spans()
    assert [s.attributes["penwatch.step"] for s in finished] == [0, 1, 2]


def test_spans_locally_on_the_terminal_recipe(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_TRACES_EXPORTER"] = "console"
    out = subprocess.run(
        [sys.executable, "-m", "penwatch.cli", "demo", "--steps", "3", "--no-dashboard",
         "--step-delay", "0", "--metrics-port", "0", "--db", str(tmp_path / "d.db")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"name": "penwatch.train_step"') == 3, out.stdout[-3000:]
    assert "OTLP tracing on" in out.stdout
