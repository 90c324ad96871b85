"""Row builders for the store writer: key parsing, step rows, multi-row inserts."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sqlite3
from collections.abc import Sequence
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
