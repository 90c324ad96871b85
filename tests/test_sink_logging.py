"""pw.sinks.Logging: a line every ``every`` records, and always for a non-finite one."""

from __future__ import annotations

import logging

import jax.numpy as jnp

import penwatch as pw
from penwatch.telemetry import leaf_nonfinite


def _record(step: int, value: float) -> dict:
    return {"l1": value, "l1_weight": 1.0, "l1_weighted": value}


def test_every_nth_record_is_logged_and_every_non_finite_one(caplog):
    # docs/telemetry.md: one line per step (every `every` records, always when
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
    assert sorted(lines) == [0, 3, 4, 5, 6]  # records 1, 4, 7 of each three, and the bad
    assert {s for s, r in lines.items() if r.levelno == logging.WARNING} == {4, 5}
    assert lines[4].getMessage().endswith("| non-finite: l1, l1_weighted")
    assert lines[5].getMessage().endswith("| non-finite: grads['w']")
    assert "non-finite" not in lines[3].getMessage()
