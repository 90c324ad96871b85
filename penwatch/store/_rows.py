"""Row builders for the store writer: key parsing and step rows."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from penwatch.schema import StepRecord


def key_parts(record: StepRecord, key: str) -> tuple[str | None, str]:
    """``(name, quantity)`` of a metric key, read from the record's layout."""
    i = record.layout.index.get(key)
    if i is None:  # the writer's own step-level series (STEP_KEYS)
        return None, key
    slot = record.layout.slots[i]
    return slot.name, slot.quantity


def step_row(run_id: int, r: StepRecord) -> tuple[Any, ...]:
    """The ``steps`` columns of a record, ``run_id`` to ``report`` (values not included)."""
    loss = r.loss
    if loss is None:
        loss = r.values.get("base_loss", r.values.get("loss"))
    report = None
    if r.nonfinite or r.leaves:
        report = json.dumps(
            {
                "nonfinite": [dataclasses.asdict(n) for n in r.nonfinite],
                "leaves": [dataclasses.asdict(leaf) for leaf in r.leaves],
            }
        )
    return (
        run_id,
        r.step,
        r.pipeline,
        r.wall_time,
        loss,
        r.values.get("total"),
        r.duration_seconds,
        len(r.nonfinite),
        None if r.trace_id is None else f"{r.trace_id:032x}",
        report,
    )
