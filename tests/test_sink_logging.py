"""pw.sinks.Logging: a line for every ``every``-th step, and always for a non-finite one."""

from __future__ import annotations

import logging

import jax.numpy as jnp

import penwatch as pw
from penwatch.telemetry import leaf_nonfinite


def _record(step: int, value: float) -> dict:
    return {"l1": value, "l1_weight": 1.0, "l1_weighted": value}


def test_every_nth_step_is_logged_and_every_non_finite_one(caplog):
    # docs/telemetry.md: one line per step (the multiples of `every`, always when
    # non-finite) -- a NaN metric, and finite metrics over a non-finite leaf
    bad_leaf = leaf_nonfinite(grads={"w": jnp.array([1.0, jnp.inf])})
    sink = pw.sinks.Logging("penwatch.test.logging", every=3)
    monitor = pw.Monitor("log", sinks=[sink], alerts=[])
    with caplog.at_level(logging.INFO, "penwatch.test.logging"), monitor:
        for step in range(8):
            metrics = _record(step, float("nan") if step == 4 else float(step))
            if step == 5:
                metrics["_leaf_nonfinite"] = bad_leaf
            monitor.record(step, metrics)
    lines = {
        int(r.getMessage().split("step=")[1].split()[0]): r
        for r in caplog.records
        if r.name == "penwatch.test.logging"
    }
    assert sorted(lines) == [0, 3, 4, 5, 6]  # the multiples of three, and the bad
    assert {s for s, r in lines.items() if r.levelno == logging.WARNING} == {4, 5}
    assert lines[4].getMessage().endswith("| non-finite: l1, l1_weighted")
    assert lines[5].getMessage().endswith("| non-finite: grads['w']")
    assert "non-finite" not in lines[3].getMessage()


def test_every_counts_steps_not_records_like_the_span_sink(caplog):
    # A run resumed at step 7 that records every other step, two pipelines a step: the
    # lines are for the steps the OpenTelemetry sink's `every=4` traces, for each pipeline
    sink = pw.sinks.Logging("penwatch.test.logging", every=4)
    monitor = pw.Monitor("resumed", sinks=[sink], alerts=[])
    with caplog.at_level(logging.INFO, "penwatch.test.logging"), monitor:
        for step in range(7, 30, 2):
            for pipeline in ("a", "b"):
                monitor.record(step + 1, _record(step, 1.0), pipeline=pipeline)
    lines = [
        (int(r.getMessage().split("step=")[1].split()[0]), r.getMessage().split("pipeline=")[1][0])
        for r in caplog.records
        if r.name == "penwatch.test.logging"
    ]
    assert lines == [(step, p) for step in (8, 12, 16, 20, 24, 28) for p in "ab"]
