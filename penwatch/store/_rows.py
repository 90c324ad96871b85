"""Row builders for the store writer: key parsing, step rows, rollup aggregates."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from penwatch.schema import StepRecord
from penwatch.store._downsample import bucketize_sorted
from penwatch.store._schema import ROLLUP_WIDTHS

STEP_KEYS: tuple[str, ...] = ("_loss", "_total", "_duration_seconds", "_nonfinite")
"""Step-level series the writer adds to every record (``steps`` columns as metrics), so
that readers get loss, total, duration and non-finite counts from ``rollups`` too."""


ROLLUP_SQL = """
INSERT INTO rollups (series_id, width, bucket, n, n_nan, n_inf, vmin, vmax, vsum,
                     step_lo, step_hi)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (series_id, width, bucket) DO UPDATE SET
  n = n + excluded.n, n_nan = n_nan + excluded.n_nan, n_inf = n_inf + excluded.n_inf,
  vmin = CASE WHEN vmin IS NULL THEN excluded.vmin WHEN excluded.vmin IS NULL THEN vmin
              ELSE min(vmin, excluded.vmin) END,
  vmax = CASE WHEN vmax IS NULL THEN excluded.vmax WHEN excluded.vmax IS NULL THEN vmax
              ELSE max(vmax, excluded.vmax) END,
  vsum = CASE WHEN vsum IS NULL THEN excluded.vsum WHEN excluded.vsum IS NULL THEN vsum
              ELSE vsum + excluded.vsum END,
  step_lo = min(step_lo, excluded.step_lo), step_hi = max(step_hi, excluded.step_hi)
"""


def key_parts(record: StepRecord, key: str) -> tuple[str | None, str]:
    """``(name, quantity)`` of a metric key, read from the record's layout."""
    i = record.layout.index.get(key)
    if i is None:  # the writer's own step-level series (STEP_KEYS)
        return None, key
    slot = record.layout.slots[i]
    return slot.name, slot.quantity


def rollup_rows(sids: list[int], steps: list[int], vals: list[float]) -> Iterator[tuple[Any, ...]]:
    """Per-(series, width, bucket) aggregates of a batch, for merging into ``rollups``."""
    sid = np.array(sids, dtype=np.int64)
    step = np.array(steps, dtype=np.int64)
    val = np.array(vals, dtype=np.float64)
    order = np.lexsort((step, sid))
    sid, step, val = sid[order], step[order], val[order]
    for width in ROLLUP_WIDTHS:
        bucket = step // width
        starts = np.flatnonzero(np.r_[True, (sid[1:] != sid[:-1]) | (bucket[1:] != bucket[:-1])])
        agg = bucketize_sorted(step, val, bucket, starts)
        cols = [sid[starts], np.full(starts.size, width), bucket[starts]]
        cols += [agg[f] for f in ("n", "n_nan", "n_inf", "vmin", "vmax", "vsum")]
        cols += [agg["step_lo"], agg["step_hi"]]
        # NaN (no finite value in the bucket) binds as NULL.
        yield from zip(*(c.tolist() for c in cols), strict=True)


def step_row(run_id: int, r: StepRecord) -> tuple[Any, ...]:
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
