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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from penwatch._checks import check_positive
from penwatch.schema import thresholds
from penwatch.store import _packed
from penwatch.store._downsample import BUCKET_DTYPE, combine
from penwatch.store._packed import STEP_KEYS
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
        self._layouts: dict[int, np.ndarray] = {}
        self._layout_names: dict[int, list[str]] = {}
        self._step_series: dict[tuple[int, str], np.ndarray] = {}

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
        sql = f"SELECT {', '.join(STEP_COLUMNS)} FROM steps WHERE run_id = ? AND id > ?"
        sql += " ORDER BY id DESC" + ("" if limit is None else f" LIMIT {int(limit)}")
        rows = []  # one walk of the (run_id, id) index per run, newest first: no sort
        for run_id in _distinct(run_ids):
            rows += self._query(sql, (run_id, since_id))
        table = np.array(rows, dtype=np.float64).reshape(len(rows), len(STEP_COLUMNS))
        table = table[np.argsort(table[:, 0], kind="stable")]
        if limit is not None:
            table = table[len(table) - min(limit, len(table)) :]
        out = {}
        for i, name in enumerate(STEP_COLUMNS):
            is_float = name in ("wall_time", "loss", "total", "duration_seconds")
            out[name] = table[:, i].copy() if is_float else table[:, i].astype(np.int64)
        return out

    def step_reports(self, run_ids: Iterable[int], *, limit: int = 20) -> list[dict[str, Any]]:
        """The latest non-finite reports (``step``, ``run_id``, ``nonfinite``, ``leaves``).

        Walks the partial index of rows holding a report, newest first, per run.
        """
        rows = []
        for run_id in _distinct(run_ids):
            rows += self._query(
                "SELECT id, run_id, step, report FROM steps WHERE run_id = ?"
                " AND report IS NOT NULL ORDER BY id DESC LIMIT ?",
                (run_id, int(limit)),
            )
        rows = sorted(rows, reverse=True)[:limit]
        return [{"run_id": r[1], "step": r[2], **json.loads(r[3])} for r in rows]

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
        """``(first_step, last_step)`` over the given runs, or None when they have no steps.

        Two look-ups of the ``(run_id, step)`` index per run (one ``min``/``max`` each: SQLite
        answers a lone ``min`` or ``max`` from the index end).
        """
        ends = []
        for run_id in _distinct(run_ids):
            ends += self._query(
                "SELECT (SELECT min(step) FROM steps WHERE run_id = ?),"
                " (SELECT max(step) FROM steps WHERE run_id = ?)",
                (run_id, run_id),
            )
        ends = [e for e in ends if e[0] is not None]
        if not ends:
            return None
        return int(min(e[0] for e in ends)), int(max(e[1] for e in ends))

    def values(
        self, run_ids: Iterable[int], *, since_id: int | None = None
    ) -> dict[str, np.ndarray]:
        """Metric values of the given runs' steps with ``steps.id > since_id``, oldest first.

        Every value of a step, the step-level series (:data:`~penwatch.store._packed.STEP_KEYS`)
        included, is one row of the result.

        Args:
          run_ids: runs to read.
          since_id: last steps id already read (the largest ``id`` returned before);
            None reads from the start.

        Returns:
          NumPy columns ``id`` (the step row's id, shared by its values), ``series_id``,
          ``step``, ``value`` (NaN for NaN).
        """
        ids = _ids(run_ids)
        rows = self._query(
            f"SELECT id, run_id, pipeline, step, layout_id, vals, loss, total,"
            f" duration_seconds, nonfinite FROM steps"
            f" WHERE run_id IN ({ids}) AND id > ? ORDER BY id",
            (since_id or 0,),
        )
        out: dict[str, list[np.ndarray]] = {"id": [], "series_id": [], "step": [], "value": []}
        start = 0
        while start < len(rows):  # runs of consecutive rows of one layout, decoded at once
            layout_id, run_id, pipeline = rows[start][4], rows[start][1], rows[start][2]
            stop = start + 1
            while stop < len(rows) and rows[stop][4] == layout_id:
                stop += 1
            chunk = rows[start:stop]
            start = stop
            sids = np.r_[self._step_sids(run_id, pipeline), self._layout_sids(layout_id)]
            step_cols = np.array(
                [[np.nan if v is None else v for v in r[6:10]] for r in chunk], dtype=np.float64
            )
            present = np.array([[v is not None for v in r[6:10]] for r in chunk], dtype=bool)
            vals = _packed.decode_rows([r[5] for r in chunk], sids.size - len(STEP_KEYS))
            table = np.concatenate([step_cols, vals], axis=1)
            keep = np.concatenate([present, np.ones(vals.shape, dtype=bool)], axis=1)
            keep &= sids[None, :] >= 0
            n = len(chunk)
            out["id"].append(np.repeat([r[0] for r in chunk], sids.size).reshape(n, -1)[keep])
            out["series_id"].append(np.broadcast_to(sids, (n, sids.size))[keep])
            out["step"].append(np.repeat([r[3] for r in chunk], sids.size).reshape(n, -1)[keep])
            out["value"].append(table[keep])
        dtypes = {"id": np.int64, "series_id": np.int64, "step": np.int64, "value": np.float64}
        return {
            name: np.concatenate(parts).astype(dtypes[name]) if parts else np.zeros(0, dtypes[name])
            for name, parts in out.items()
        }

    def steps_with(self, run_ids: Iterable[int], key: str, *, limit: int = 500) -> np.ndarray:
        """Steps whose stored row records ``key`` (e.g. a diagnostics key), newest first.

        Walks the ``(run_id, step)`` index back from the newest step and stops after
        ``limit`` matches: the cost is the steps walked, not the run.

        Args:
          run_ids: runs to read.
          key: a flat metric key (the series ``key``).
          limit: most steps returned (an int >= 1).

        Returns:
          An int64 array of step numbers, newest first (a step recorded by several of
          ``run_ids`` or pipelines appears once per row; the newest ``limit`` rows of
          all of them).
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"StoreReader.steps_with: limit must be an int >= 1, got {limit!r}")
        found: list[int] = []
        for run_id in _distinct(run_ids):  # one index walk per run: no sort of a run
            found += [
                r[0]
                for r in self._query(
                    "SELECT step FROM steps WHERE run_id = ? AND layout_id IN"
                    " (SELECT ls.layout_id FROM layout_series AS ls JOIN series AS s"
                    " ON s.id = ls.series_id WHERE s.run_id = ? AND s.key = ?)"
                    " ORDER BY step DESC LIMIT ?",
                    (run_id, run_id, key, limit),
                )
            ]
        return np.array(sorted(found, reverse=True)[:limit], dtype=np.int64)

    def step_values(
        self, run_ids: Iterable[int], step: int
    ) -> list[tuple[int, str, dict[str, float]]]:
        """Every stored row at exactly ``step`` as ``(run_id, pipeline, values)``.

        One index look-up on ``(run_id, step)``, one packed row decoded per match;
        values as recorded (NaN included), in write order.
        """
        ids = _ids(run_ids)
        rows = self._query(
            f"SELECT run_id, pipeline, layout_id, vals FROM steps"
            f" WHERE run_id IN ({ids}) AND step = ? ORDER BY id",
            (int(step),),
        )
        out = []
        for run_id, pipeline, layout_id, blob in rows:
            names = self._layout_keys(layout_id)
            values = _packed.decode_values(blob, len(names))
            out.append((run_id, pipeline, dict(zip(names, values.tolist(), strict=True))))
        return out

    def _layout_keys(self, layout_id: int) -> list[str]:
        """Keys of a layout, in ``vals`` order (cached: layouts never change)."""
        names = self._layout_names.get(layout_id)
        if names is None:
            names = self._layout_names[layout_id] = [
                k
                for (k,) in self._query(
                    "SELECT s.key FROM layout_series AS ls JOIN series AS s"
                    " ON s.id = ls.series_id WHERE ls.layout_id = ? ORDER BY ls.idx",
                    (layout_id,),
                )
            ]
        return names

    def _layout_sids(self, layout_id: int) -> np.ndarray:
        """Series ids of a layout, in ``vals`` order (cached: layouts never change)."""
        sids = self._layouts.get(layout_id)
        if sids is None:
            rows = self._query(
                "SELECT series_id FROM layout_series WHERE layout_id = ? ORDER BY idx",
                (layout_id,),
            )
            sids = self._layouts[layout_id] = np.array([r[0] for r in rows], dtype=np.int64)
        return sids

    def _step_sids(self, run_id: int, pipeline: str) -> np.ndarray:
        """Series ids of the step-level series of one run and pipeline (-1 when absent)."""
        sids = self._step_series.get((run_id, pipeline))
        if sids is None:
            found = dict(
                self._query(
                    "SELECT key, id FROM series WHERE run_id = ? AND pipeline = ? AND key IN"
                    f" ({', '.join('?' * len(STEP_KEYS))})",
                    (run_id, pipeline, *STEP_KEYS),
                )
            )
            sids = np.array([found.get(k, -1) for k in STEP_KEYS], dtype=np.int64)
            self._step_series[(run_id, pipeline)] = sids
        return sids

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
        found = self._query("SELECT run_id, pipeline, key FROM series WHERE id = ?", (series_id,))
        if not found:
            return np.zeros(0, BUCKET_DTYPE)
        run_id, pipeline, key = found[0]
        if key in STEP_KEYS:  # a step column: an entry of every layout of the pipeline
            where = self._query(
                "SELECT id, ? FROM layouts WHERE run_id = ? AND pipeline = ?",
                (STEP_KEYS.index(key), run_id, pipeline),
            )
        else:
            where = self._query(
                "SELECT layout_id, idx + ? FROM layout_series WHERE series_id = ?",
                (len(STEP_KEYS), series_id),
            )
        since = -(2**62) if since_bucket is None else since_bucket
        parts = []
        for layout_id, entry in where:
            rows = self._query(
                "SELECT bucket, substr(n, ? * 4 + 1, 4), substr(n_nan, ? * 4 + 1, 4),"
                " substr(n_inf, ? * 4 + 1, 4), substr(vmin, ? * 8 + 1, 8),"
                " substr(vmax, ? * 8 + 1, 8), substr(vsum, ? * 8 + 1, 8), step_lo, step_hi"
                " FROM rollups WHERE layout_id = ? AND width = ? AND bucket >= ?"
                " ORDER BY bucket",
                (*[entry] * 6, layout_id, width, since),
            )
            part = _bucket_entries(rows)
            parts.append(part[part["n"] > 0])
        return combine(parts)

    def records(self, run: str, process: int = 0) -> list[tuple[int, str, dict[str, float]]]:
        """Every stored step of a run as ``(step, pipeline, values)``, in write order.

        Values come back exactly as recorded (NaN included). Meant for checks and
        exports; a dashboard should use :meth:`rollup`.
        """
        rows = self._query(
            "SELECT st.step, st.pipeline, st.layout_id, st.vals FROM steps AS st"
            " JOIN runs AS r ON r.id = st.run_id"
            " WHERE r.name = ? AND r.process = ? ORDER BY st.id",
            (run, process),
        )
        out: list[tuple[int, str, dict[str, float]]] = []
        for step, pipeline, layout_id, blob in rows:
            names = self._layout_keys(layout_id)
            values = _packed.decode_values(blob, len(names))
            out.append((step, pipeline, dict(zip(names, values.tolist(), strict=True))))
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


def _distinct(run_ids: Iterable[int]) -> list[int]:
    """The run ids, validated as ints, each once, in order (read one run at a time)."""
    return sorted({int(i) for i in run_ids})


def _ids(run_ids: Iterable[int] | Mapping[int, Any]) -> str:
    """Comma-separated integer ids for an ``IN (...)`` clause (validated as ints)."""
    ids = [int(i) for i in run_ids]
    return ",".join(map(str, ids)) if ids else "NULL"


def _bucket_entries(rows: Sequence[Sequence[object]]) -> np.ndarray:
    """One entry of ``rollups`` rows selected as ``bucket``, 4-byte slices of ``n``,
    ``n_nan``, ``n_inf``, 8-byte slices of ``vmin``, ``vmax``, ``vsum``, ``step_lo``,
    ``step_hi``, as a :data:`BUCKET_DTYPE` array."""
    out = np.zeros(len(rows), BUCKET_DTYPE)
    if not rows:
        return out
    cols = list(zip(*rows, strict=True))
    out["bucket"] = np.array(cols[0], dtype=np.int64)
    for field, col in zip(("n", "n_nan", "n_inf"), cols[1:4], strict=True):
        out[field] = [0 if b is None else int.from_bytes(b, "little") for b in col]
    for field, col in zip(("vmin", "vmax", "vsum"), cols[4:7], strict=True):
        out[field] = np.frombuffer(b"".join(col), dtype="<f8")
    out["step_lo"] = np.array(cols[7], dtype=np.int64)
    out["step_hi"] = np.array(cols[8], dtype=np.int64)
    return out
