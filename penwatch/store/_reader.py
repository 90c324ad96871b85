"""Incremental, read-only access to the SQLite run store.

Every ``since_id`` argument returns only rows newer than the caller has seen (``id >
since_id``), so a reader that polls a growing store reads each row once. Long ranges come
from the writer's ``rollups`` (:meth:`StoreReader.rollup`): pass the last bucket you hold
to re-read only that bucket (it may have grown) and the ones after it.

Run statuses are read as stored, with one verdict of the reader's own: a run stored as
``running`` whose heartbeat (``runs.updated_at``) is older than ``stale_after`` seconds
reads as ``crashed`` (its process died without closing the monitor; SPEC section 11).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from penwatch._checks import check_positive
from penwatch.schema import thresholds
from penwatch.store._downsample import BUCKET_DTYPE
from penwatch.store._schema import ROLLUP_WIDTHS, reader_connection, schema_version


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One run of one process, as stored; ``status`` is the reader's verdict.

    ``status`` is one of :data:`penwatch.schema.RUN_STATUSES`: the stored status, except
    that a ``running`` run without a heartbeat for longer than the reader's
    ``stale_after`` reads as ``crashed``.
    """

    id: int
    name: str
    process: int
    status: str
    started_at: float
    updated_at: float
    finished_at: float | None
    last_step: int | None
    version: str | None
    backend: str | None
    devices: int | None
    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SeriesRow:
    """One metric key of one pipeline of one run."""

    id: int
    run_id: int
    pipeline: str
    name: str | None
    quantity: str
    key: str


@dataclasses.dataclass(frozen=True)
class EventRow:
    """One stored event (non-finite detection, alert, note)."""

    id: int
    run_id: int
    step: int
    wall_time: float
    kind: str
    name: str
    severity: str
    message: str
    attributes: dict[str, Any]


STEP_COLUMNS = (
    "id",
    "run_id",
    "step",
    "wall_time",
    "loss",
    "total",
    "duration_seconds",
    "nonfinite",
)


class StoreReader:
    """Read-only view of a store file; safe while a writer (another process) appends.

    Args:
      path: the store file. It must exist (:class:`FileNotFoundError` otherwise); an
        existing file without tables yet reads as an empty store.
      busy_timeout: seconds to wait on a lock held by the writer.
      stale_after: seconds without a heartbeat after which a run stored as ``running``
        reads as ``crashed`` (a finite number > 0; the writer refreshes the heartbeat
        every :data:`~penwatch.schema.thresholds.HEARTBEAT_SECONDS`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 2.0,
        stale_after: float = thresholds.STALE_AFTER_SECONDS,
    ) -> None:
        self.stale_after = check_positive("penwatch.store.StoreReader", "stale_after", stale_after)
        self.path = pathlib.Path(path)
        self._conn = reader_connection(self.path, busy_timeout=busy_timeout)
        self._ready = False

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        """True once the writer has created the schema (checked, then cached)."""
        if not self._ready:
            self._ready = schema_version(self._conn) is not None
        return self._ready

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        if not self.ready:
            return []
        return self._conn.execute(sql, tuple(params)).fetchall()

    def runs(self, *, now: float | None = None) -> list[RunRow]:
        """All runs, most recently updated first, with the ``crashed`` verdict applied.

        Args:
          now: the Unix time heartbeats are judged against (default: the current time).
        """
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT id, name, process, status, started_at, updated_at, finished_at, last_step,"
            " version, backend, devices, config FROM runs ORDER BY updated_at DESC, name, process"
        )
        return [
            RunRow(
                *r[:3],
                verdict(r[3], r[5], now=now, stale_after=self.stale_after),
                *r[4:-1],
                config=json.loads(r[-1]) if r[-1] else {},
            )
            for r in rows
        ]

    def series(self, run_ids: Iterable[int], *, since_id: int = 0) -> list[SeriesRow]:
        """Series of the given runs with ``id > since_id``."""
        ids = _ids(run_ids)
        rows = self._query(
            f"SELECT id, run_id, pipeline, name, quantity, key FROM series"
            f" WHERE run_id IN ({ids}) AND id > ? ORDER BY id",
            (since_id,),
        )
        return [SeriesRow(*r) for r in rows]

    def steps(
        self, run_ids: Iterable[int], *, since_id: int = 0, limit: int | None = None
    ) -> dict[str, np.ndarray]:
        """Step rows with ``id > since_id`` as NumPy columns (:data:`STEP_COLUMNS`).

        Args:
          run_ids: runs to read.
          since_id: last steps id already read.
          limit: keep only the newest ``limit`` of those rows.

        Returns:
          Columns in id order; ``loss``, ``total`` and ``duration_seconds`` are NaN where
          not recorded (or NaN).
        """
        ids = _ids(run_ids)
        sql = (
            f"SELECT {', '.join(STEP_COLUMNS)} FROM steps"
            f" WHERE run_id IN ({ids}) AND id > ? ORDER BY id DESC"
        )
        params: tuple[int, ...] = (since_id,)
        if limit is not None:
            sql, params = sql + " LIMIT ?", (since_id, limit)
        rows = self._query(sql, params)
        table = np.array(rows, dtype=np.float64).reshape(len(rows), len(STEP_COLUMNS))[::-1]
        out = {}
        for i, name in enumerate(STEP_COLUMNS):
            is_float = name in ("wall_time", "loss", "total", "duration_seconds")
            out[name] = table[:, i].copy() if is_float else table[:, i].astype(np.int64)
        return out

    def step_reports(self, run_ids: Iterable[int], *, limit: int = 20) -> list[dict[str, Any]]:
        """The latest non-finite reports (``step``, ``run_id``, ``nonfinite``, ``leaves``)."""
        ids = _ids(run_ids)
        rows = self._query(
            f"SELECT run_id, step, report FROM steps WHERE run_id IN ({ids})"
            f" AND report IS NOT NULL ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [{"run_id": r[0], "step": r[1], **json.loads(r[2])} for r in rows]

    def events(self, run_ids: Iterable[int], *, since_id: int = 0) -> list[EventRow]:
        """Events of the given runs with ``id > since_id``, oldest first."""
        ids = _ids(run_ids)
        rows = self._query(
            f"SELECT id, run_id, step, wall_time, kind, name, severity, message, attributes"
            f" FROM events WHERE run_id IN ({ids}) AND id > ? ORDER BY id",
            (since_id,),
        )
        return [EventRow(*r[:-1], attributes=json.loads(r[-1]) if r[-1] else {}) for r in rows]

    def step_span(self, run_ids: Iterable[int]) -> tuple[int, int] | None:
        """``(first_step, last_step)`` over the given runs, or None when they have no steps."""
        ids = _ids(run_ids)
        rows = self._query(f"SELECT min(step), max(step) FROM steps WHERE run_id IN ({ids})")
        if not rows or rows[0][0] is None:
            return None
        return int(rows[0][0]), int(rows[0][1])

    def values(
        self, run_ids: Iterable[int], *, since_id: int | None = None
    ) -> dict[str, np.ndarray]:
        """Raw metric rows of the given runs with ``id > since_id``, oldest first.

        Args:
          run_ids: runs to read.
          since_id: last metrics id already read; None starts at the runs' first row.

        Returns:
          NumPy columns ``id``, ``series_id``, ``step``, ``value`` (NaN for NULL).
        """
        ids = _ids(run_ids)
        if since_id is None:
            rows = self._query(f"SELECT min(metrics_from) FROM runs WHERE id IN ({ids})")
            since_id = rows[0][0] if rows and rows[0][0] is not None else 0
        rows = self._query(
            f"SELECT m.id, m.series_id, m.step, m.value FROM metrics AS m"
            f" WHERE m.id > ? AND m.series_id IN"
            f" (SELECT id FROM series WHERE run_id IN ({ids})) ORDER BY m.id",
            (since_id,),
        )
        cols = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        return {
            "id": np.array(cols[0], dtype=np.int64),
            "series_id": np.array(cols[1], dtype=np.int64),
            "step": np.array(cols[2], dtype=np.int64),
            "value": np.array(cols[3], dtype=np.float64),
        }

    def rollup(self, series_id: int, *, width: int, since_bucket: int | None = None) -> np.ndarray:
        """Aggregates of one series per bucket of ``width`` steps, from ``since_bucket`` on.

        Args:
          series_id: the series.
          width: one of :data:`~penwatch.store.ROLLUP_WIDTHS`.
          since_bucket: first bucket to return (inclusive; re-read the last bucket you
            hold, it may have grown); None for all.

        Returns:
          A :data:`~penwatch.store.BUCKET_DTYPE` array sorted by bucket.
        """
        if width not in ROLLUP_WIDTHS:
            raise ValueError(
                f"StoreReader.rollup: width must be one of {ROLLUP_WIDTHS}, got {width!r}"
            )
        rows = self._query(
            "SELECT bucket, n, n_nan, n_inf, vmin, vmax, vsum, step_lo, step_hi FROM rollups"
            " WHERE series_id = ? AND width = ? AND bucket >= ? ORDER BY bucket",
            (series_id, width, -(2**62) if since_bucket is None else since_bucket),
        )
        out = np.zeros(len(rows), BUCKET_DTYPE)
        if rows:
            for name, col in zip(BUCKET_DTYPE.names, zip(*rows, strict=True), strict=True):
                out[name] = np.array(col, dtype=float if name[0] == "v" else np.int64)
        return out

    def records(self, run: str, process: int = 0) -> list[tuple[int, str, dict[str, float]]]:
        """Every stored step of a run as ``(step, pipeline, values)``, in write order.

        NaN comes back as ``nan`` (stored as NULL). Meant for checks and exports; a
        dashboard should use :meth:`buckets`.
        """
        rows = self._query(
            "SELECT m.id, m.step, s.pipeline, s.key, m.value FROM metrics AS m"
            " JOIN series AS s ON s.id = m.series_id JOIN runs AS r ON r.id = s.run_id"
            " WHERE r.name = ? AND r.process = ? ORDER BY m.id",
            (run, process),
        )
        out: list[tuple[int, str, dict[str, float]]] = []
        for _, step, pipeline, key, value in rows:
            if key.startswith("_"):
                continue  # step-level series the writer adds (STEP_KEYS)
            if not out or out[-1][0] != step or out[-1][1] != pipeline or key in out[-1][2]:
                out.append((step, pipeline, {}))
            out[-1][2][key] = float("nan") if value is None else value
        return out


def verdict(status: str, updated_at: float, *, now: float, stale_after: float) -> str:
    """The status a reader reports: ``crashed`` for a ``running`` run with a stale heartbeat.

    Args:
      status: the stored status (``running``, ``finished``, ``stopped``, ``failed``).
      updated_at: the run's last heartbeat (Unix time).
      now: the time to judge against.
      stale_after: seconds without a heartbeat after which ``running`` means ``crashed``.
    """
    if status == "running" and now - updated_at > stale_after:
        return "crashed"
    return status


def _ids(run_ids: Iterable[int] | Mapping[int, Any]) -> str:
    """Comma-separated integer ids for an ``IN (...)`` clause (validated as ints)."""
    ids = [int(i) for i in run_ids]
    return ",".join(map(str, ids)) if ids else "NULL"
