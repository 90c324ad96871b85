"""Row builders for the store writer: key parsing, step columns, multi-row inserts."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np

from penwatch.schema import StepRecord


def key_parts(record: StepRecord, key: str) -> tuple[str | None, str]:
    """``(name, quantity)`` of a metric key, read from the record's layout."""
    i = record.layout.index.get(key)
    if i is None:  # the writer's own step-level series (STEP_KEYS)
        return None, key
    slot = record.layout.slots[i]
    return slot.name, slot.quantity


@dataclasses.dataclass(frozen=True)
class StepColumns:
    """The ``steps`` columns of a batch of records, one list per column (``run_id``,
    ``layout_id`` and ``vals`` come from the writer), in the batch's order.

    Built column by column: the writer's Python per record is most of what the store
    costs next to a fast training loop, and a list per column reads each field once.
    """

    step: list[int]
    pipeline: list[str]
    wall_time: list[float]
    loss: list[float | None]
    total: list[float | None]
    duration_seconds: list[float | None]
    nonfinite: list[int]
    trace_id: list[str | None]
    report: list[str | None]

    @classmethod
    def of(cls, records: Sequence[StepRecord]) -> StepColumns:
        """The columns of ``records``. Without an explicit loss a step's ``loss`` is its
        ``base_loss`` metric, else its ``loss`` metric; ``report`` is the JSON non-finite
        report of a step that has one."""
        values = [r.values for r in records]
        return cls(
            step=[r.step for r in records],
            pipeline=[r.pipeline for r in records],
            wall_time=[r.wall_time for r in records],
            loss=[
                v.get("base_loss", v.get("loss")) if r.loss is None else r.loss
                for r, v in zip(records, values, strict=True)
            ],
            total=[v.get("total") for v in values],
            duration_seconds=[r.duration_seconds for r in records],
            nonfinite=[len(r.nonfinite) for r in records],
            trace_id=[None if r.trace_id is None else f"{r.trace_id:032x}" for r in records],
            report=[_report(r) if r.has_nonfinite else None for r in records],
        )

    def take(self, positions: Sequence[int]) -> StepColumns:
        """The columns of the records at ``positions`` (ascending, distinct)."""
        if len(positions) == len(self.step):
            return self
        return StepColumns(*([column[i] for i in positions] for column in vars(self).values()))

    def rows(
        self, run_ids: Sequence[int], layout_ids: Sequence[int], blobs: Sequence[bytes]
    ) -> list[tuple[Any, ...]]:
        """The ``steps`` rows, ``run_id`` to ``vals`` in table order."""
        return list(
            zip(
                run_ids,
                self.step,
                self.pipeline,
                self.wall_time,
                self.loss,
                self.total,
                self.duration_seconds,
                self.nonfinite,
                self.trace_id,
                self.report,
                layout_ids,
                blobs,
                strict=True,
            )
        )

    def step_series(self) -> tuple[np.ndarray, np.ndarray]:
        """The step-level rollup entries (``STEP_KEYS``: loss, total, duration, non-finite
        count) as ``(float64[n, 4] values, NaN where not recorded; bool[n, 4] recorded)``:
        a recorded NaN is counted as NaN, a missing value not at all."""
        columns = (self.loss, self.total, self.duration_seconds, self.nonfinite)
        values = np.array(columns, dtype=np.float64).T  # None reads as NaN
        present = np.array([[v is not None for v in c] for c in columns], dtype=bool).T
        return values, present


def _report(r: StepRecord) -> str:
    return json.dumps(
        {
            "nonfinite": [dataclasses.asdict(n) for n in r.nonfinite],
            "leaves": [dataclasses.asdict(leaf) for leaf in r.leaves],
        }
    )


MAX_ROWS_PER_STATEMENT = 256
"""Most rows one ``INSERT`` of :func:`insert_rows` carries (fewer when SQLite's limit on
bound parameters is lower)."""


def insert_rows(
    conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]], *, tail: str = ""
) -> None:
    """Insert ``rows`` in order with multi-row ``VALUES`` statements.

    ``executemany`` steps one statement per row, and Python's ``sqlite3`` releases the
    GIL around every step: on a telemetry thread that is a hand-off to the training
    thread per row, and a wait to get the GIL back. Here a batch takes one statement per
    power-of-two chunk (``head`` followed by ``size`` placeholder tuples; each size's
    statement is prepared once and cached), so the GIL is given up a few times per batch.

    Args:
      conn: the connection (inside the caller's transaction).
      head: ``"INSERT INTO table (columns) VALUES"``.
      rows: rows of equal length, inserted in this order.
      tail: what follows the values (an ``ON CONFLICT`` clause).
    """
    if not rows:
        return
    width = len(rows[0])
    fits = max(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width, 1)
    size = 1 << (min(fits, MAX_ROWS_PER_STATEMENT).bit_length() - 1)
    start, n = 0, len(rows)
    while start < n:
        while size > n - start:
            size >>= 1
        chunk = rows[start : start + size]
        sql = _values_sql(head, width, size, tail)
        conn.execute(sql, list(itertools.chain.from_iterable(chunk)))
        start += size


@functools.lru_cache(maxsize=64)
def _values_sql(head: str, width: int, size: int, tail: str) -> str:
    row = "(" + ", ".join(["?"] * width) + ")"
    return f"{head} {', '.join([row] * size)} {tail}".rstrip()
