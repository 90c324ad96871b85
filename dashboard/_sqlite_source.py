"""The SQLite source: reads a penwatch store incrementally into the shared :class:`Snapshot`.

Only :class:`~penwatch.store.StoreReader`'s public methods are used (runs, series, values,
rollup, steps, step_span, step_reports, events, steps_with, step_values), never the raw
tables: the store's layout may change under them. Each refresh reads **only what is new** (``id >
last_seen``, the last rollup bucket held); :func:`penwatch.dashboard._model.derive`
computes every derived figure.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from penwatch.dashboard import _model, _runs
from penwatch.dashboard._errors import SourceUnavailable
from penwatch.dashboard._model import GRAD_QUANTITIES, Snapshot
from penwatch.dashboard._runs import RunChoice

from penwatch import store
from penwatch.schema import BASE_TERM, TERM_QUANTITIES, term_key, thresholds

__all__ = ["DIAGNOSTICS_STEPS", "STEP_WINDOW", "SQLiteSource"]

DIAGNOSTICS_STEPS = 500
"""Most recent diagnostics steps offered by :meth:`SQLiteSource.diagnostics_steps`."""

_DIAGNOSTICS_KEY = term_key(BASE_TERM, "grad_share")
"""A key every diagnostics step records (SPEC §4): marks the steps that ran them."""

STEP_WINDOW = 2000
"""Most recent step rows kept for headline numbers and duration percentiles."""

NONFINITE_LIMIT = 10_000
"""Non-finite steps read one by one (each has a stored report); past this many, the
counts come from the rollup buckets (a range: at least one step per marked bucket)."""

EVENT_WINDOW = 5000
"""Most recent events kept per run selection."""

_STEP_KEYS = {"_loss": "base loss", "_total": "total penalty"}


class _RunCache:
    """What one SQLiteSource has read so far for one run selection."""

    def __init__(self, run_ids: tuple[int, ...]) -> None:
        self.run_ids = run_ids
        self.width = 0
        self.series: dict[int, store.SeriesRow] = {}
        self.last_series_id = 0
        self.buckets: dict[int, np.ndarray] = {}
        self.last_metric_id: int | None = None
        self.steps: dict[str, np.ndarray] = {}
        self.last_step_id = 0
        self.events: list[store.EventRow] = []
        self.last_event_id = 0
        self.reports: list[dict[str, Any]] = []
        self.nonfinite_seen = -1.0
        self.settled: tuple[tuple[float, int | None, str], ...] | None = None
        self.snapshot: Snapshot | None = None


class SQLiteSource:
    """Reads a penwatch SQLite store incrementally (read-only; never creates it).

    A run that is not live (finished, stopped, failed, crashed) is read once more after
    it ended and then left alone until its heartbeat, last step or status changes (a
    resumed run): its snapshot is reused as is.

    Args:
      path: the store file. A missing file is reported as :class:`SourceUnavailable`
        until it appears.
      max_buckets: most buckets per series drawn (longer runs use rollups).
      stale_after: seconds without a heartbeat after which a ``running`` run reads as
        ``crashed`` (passed to :class:`~penwatch.store.StoreReader`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_buckets: int = store.MAX_BUCKETS,
        stale_after: float = thresholds.STALE_AFTER_SECONDS,
    ) -> None:
        self.path = pathlib.Path(path)
        self.label = f"SQLite store {self.path}"
        self.max_buckets = max_buckets
        self.stale_after = stale_after
        self._reader: store.StoreReader | None = None
        self._cache: dict[tuple[str, int | None], _RunCache] = {}

    def _open(self) -> store.StoreReader:
        if self._reader is not None and not self.path.exists():
            self._reader.close()  # deleted under us: start over when it comes back
            self._reader, self._cache = None, {}
        if self._reader is None:
            if not self.path.exists():
                raise SourceUnavailable(
                    f"No penwatch store at {self.path} yet. Start a run that writes to it "
                    f"(penwatch demo --db {self.path}, or pw.sinks.SQLite({str(self.path)!r})"
                    " in your monitor); this page picks it up by itself."
                )
            self._reader = store.StoreReader(self.path, stale_after=self.stale_after)
        return self._reader

    def close(self) -> None:
        """Close the store connection."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def runs(self) -> list[RunChoice]:
        """Runs, most recently updated first (raises :class:`SourceUnavailable`)."""
        try:
            rows = self._open().runs()
        except store.StoreError as exc:
            raise SourceUnavailable(f"{self.path} is not a readable penwatch store: {exc}") from exc
        return _runs.group_runs(rows)

    def _rows(self, run: str, process: int | None) -> list[store.RunRow]:
        rows = [r for r in self._open().runs() if r.name == run]
        return rows if process is None else [r for r in rows if r.process == process]

    def diagnostics_steps(self, run: str, process: int | None) -> list[int]:
        """The latest :data:`DIAGNOSTICS_STEPS` steps that ran gradient diagnostics,
        oldest first (read through the ``(run_id, step)`` index, not the whole run)."""
        ids = [r.id for r in self._rows(run, process)]
        found = self._open().steps_with(ids, _DIAGNOSTICS_KEY, limit=DIAGNOSTICS_STEPS)
        return sorted({int(s) for s in found})

    def step_values(
        self, run: str, process: int | None, step: int | None
    ) -> tuple[int, str, dict[str, float]] | None:
        """One diagnostics step's recorded values as ``(step, where, values)``: the first
        process (and pipeline) that ran diagnostics at ``step`` (None: the latest
        diagnostics step); None when none did. ``where`` names them (``"process 0,
        pipeline default"``)."""
        rows = self._rows(run, process)
        process_of = {r.id: r.process for r in rows}
        if step is None:
            latest = self._open().steps_with(list(process_of), _DIAGNOSTICS_KEY, limit=1)
            if not latest.size:
                return None
            step = int(latest[0])
        for run_id, pipeline, values in self._open().step_values(list(process_of), step):
            if _DIAGNOSTICS_KEY in values:
                return step, f"process {process_of[run_id]}, pipeline {pipeline}", values
        return None

    def snapshot(self, run: str, process: int | None) -> Snapshot:
        """Everything the views draw for ``run`` (``process=None``: all processes)."""
        reader = self._open()
        rows = self._rows(run, process)
        run_ids = tuple(sorted(r.id for r in rows))
        cache = self._cache.get((run, process))
        if cache is None or cache.run_ids != run_ids:
            cache = self._cache[(run, process)] = _RunCache(run_ids)
        # an ended run is read once more, then only when its heartbeat, steps or status move
        ended = tuple((r.updated_at, r.last_step, r.status) for r in rows)
        if cache.settled == ended and cache.snapshot is not None:
            return cache.snapshot
        self._update(reader, cache)
        live = any(r.status == _runs.LIVE for r in rows)
        cache.settled = None if live else ended
        snap = build(
            run=run,
            process=process,
            runs=rows,
            width=cache.width,
            series=cache.series,
            buckets=cache.buckets,
            steps=cache.steps,
            events=cache.events,
            reports=cache.reports,
        )
        _model.derive(snap, stale_after=self.stale_after)
        cache.snapshot = None if live else snap
        return snap

    def _update(self, reader: store.StoreReader, c: _RunCache) -> None:
        span = reader.step_span(c.run_ids)
        width = (
            1
            if span is None
            else store.choose_width(span[1] - span[0] + 1, max_buckets=self.max_buckets)
        )
        if width != c.width:
            c.width, c.buckets, c.last_metric_id = width, {}, None
        for s in reader.series(c.run_ids, since_id=c.last_series_id):
            c.series[s.id] = s
            c.last_series_id = max(c.last_series_id, s.id)
        if width == 1:
            rows = reader.values(c.run_ids, since_id=c.last_metric_id)
            if rows["id"].size:
                c.last_metric_id = int(rows["id"][-1])
                order = np.argsort(rows["series_id"], kind="stable")
                sid, step, value = (rows[k][order] for k in ("series_id", "step", "value"))
                cuts = np.flatnonzero(np.diff(sid)) + 1
                for part_sid, part_step, part_value in zip(
                    np.split(sid, cuts), np.split(step, cuts), np.split(value, cuts), strict=True
                ):
                    key = int(part_sid[0])
                    new = store.bucketize(part_step, part_value, 1)
                    old = c.buckets.get(key)
                    c.buckets[key] = new if old is None else store.combine([old, new])
        else:
            for sid in c.series:
                old = c.buckets.get(sid)
                since = int(old["bucket"][-1]) if old is not None and old.size else None
                new = reader.rollup(sid, width=width, since_bucket=since)
                if old is None or since is None:
                    c.buckets[sid] = new
                else:
                    c.buckets[sid] = np.concatenate([old[old["bucket"] < since], new])
        new_steps = reader.steps(c.run_ids, since_id=c.last_step_id, limit=STEP_WINDOW)
        if new_steps["id"].size:
            c.last_step_id = int(new_steps["id"][-1])
            c.steps = {
                k: np.concatenate([c.steps.get(k, v[:0]), v])[-STEP_WINDOW:]
                for k, v in new_steps.items()
            }
        events = reader.events(c.run_ids, since_id=c.last_event_id)
        if events:
            c.last_event_id = events[-1].id
            c.events = (c.events + events)[-EVENT_WINDOW:]
        nonfinite = _total_nonfinite(c.series, c.buckets)
        if nonfinite != c.nonfinite_seen:
            c.nonfinite_seen = nonfinite
            c.reports = reader.step_reports(c.run_ids, limit=NONFINITE_LIMIT) if nonfinite else []


def _total_nonfinite(
    series: Mapping[int, store.SeriesRow], buckets: Mapping[int, np.ndarray]
) -> float:
    """Non-finite values so far: the sum of the ``_nonfinite`` step series."""
    return float(
        sum(
            np.nansum(buckets[sid]["vsum"])
            for sid, s in series.items()
            if s.key == "_nonfinite" and sid in buckets
        )
    )


def _gather(series: Mapping[int, store.SeriesRow], buckets: Mapping[int, np.ndarray]):
    """Series grouped by (pipeline, key) across processes, buckets combined."""
    groups: dict[tuple[str, str], list[int]] = {}
    for sid, s in series.items():
        groups.setdefault((s.pipeline, s.key), []).append(sid)
    out = {}
    empty = np.zeros(0, store.BUCKET_DTYPE)
    for (pipeline, key), sids in groups.items():
        parts = [buckets[sid] for sid in sids if sid in buckets]
        b = parts[0] if len(parts) == 1 else store.combine(parts) if parts else empty
        out[(pipeline, key)] = (series[sids[0]], b)
    return out


def _long(parts: list[tuple[dict[str, str], np.ndarray]], width: int) -> pd.DataFrame | None:
    """Long DataFrame of envelope points, one block of rows per labelled series."""
    if not parts:
        return None
    xs, ys = [], []
    for _, b in parts:
        x, y = store.envelope(b, width)
        xs.append(x)
        ys.append(y)
    sizes = [x.size for x in xs]
    columns: dict[str, Any] = {"step": np.concatenate(xs), "value": np.concatenate(ys)}
    for label in parts[0][0]:
        names = np.array([labels[label] for labels, _ in parts], dtype=object)
        columns[label] = np.repeat(names, sizes)
    return pd.DataFrame(columns)


def _last_mean(b: np.ndarray) -> float:
    """The mean of the last bucket holding a finite value (NaN when none does)."""
    if not b.size:
        return float("nan")
    means = store.mean(b)
    finite = np.flatnonzero(np.isfinite(means))
    return float(means[finite[-1]]) if finite.size else float("nan")


def _quantity(s: store.SeriesRow) -> str:
    """The drawn quantity of a term series (``param_grad_norm`` is drawn as ``grad_norm``)."""
    return "grad_norm" if s.quantity in ("param_grad_norm", "grad_norm") else s.quantity


def build(
    *,
    run: str,
    process: int | None,
    runs: Sequence[store.RunRow],
    width: int,
    series: Mapping[int, store.SeriesRow],
    buckets: Mapping[int, np.ndarray],
    steps: Mapping[str, np.ndarray],
    events: Sequence[store.EventRow],
    reports: list[dict[str, Any]],
) -> Snapshot:
    """The read fields of a :class:`Snapshot` from what an SQLite source has cached."""
    snap = Snapshot(
        run=run,
        process=process,
        width=width,
        processes=tuple(sorted(r.process for r in runs)),
        reports=reports[:5],
    )
    groups = _gather(series, buckets)
    pipelines = {p for p, _ in groups}
    label = (lambda p, n: n) if len(pipelines) <= 1 else (lambda p, n: f"{p}/{n}")
    latest: list[tuple[str, str, float]] = []

    weighted = [
        (label(p, s.name), b)
        for (p, _), (s, b) in groups.items()
        if s.quantity == "weighted" and s.name
    ]
    df = _long([({"penalty": n}, b) for n, b in weighted], width)
    if df is not None:
        snap.contributions = df[["step", "penalty", "value"]]
        latest += [("weighted", n, _last_mean(b)) for n, b in weighted]

    parts = [({"series": _STEP_KEYS[k]}, b) for (_, k), (_, b) in groups.items() if k in _STEP_KEYS]
    df = _long(parts, width)
    if df is not None:
        snap.losses = df.groupby(["step", "series"], as_index=False)["value"].mean()
    nf = [b for (_, k), (_, b) in groups.items() if k == "_nonfinite"]
    if reports and len(reports) < NONFINITE_LIMIT:  # every non-finite step, exactly
        per_step: dict[int, int] = {}
        for r in reports:
            per_step[r["step"]] = per_step.get(r["step"], 0) + len(r.get("nonfinite") or ())
        bad = np.array(sorted(per_step), dtype=float)
        snap.nonfinite_buckets = pd.DataFrame(
            {
                "step": bad,
                "step_hi": bad,
                "count": [float(per_step[int(s)]) for s in bad],
                "bad_min": np.ones(bad.size),
                "bad_max": np.ones(bad.size),
            }
        )
    elif nf:
        b = store.combine(nf)
        b = b[np.nan_to_num(b["vmax"]) > 0]
        span = b["step_hi"] - b["step_lo"] + 1
        every = np.nan_to_num(b["vmin"]) > 0
        most = np.minimum(b["n"], span) if width > 1 else np.ones(b.size)
        snap.nonfinite_buckets = pd.DataFrame(
            {
                "step": b["step_lo"].astype(float),
                "step_hi": b["step_hi"].astype(float),
                "count": b["vsum"],
                "bad_min": np.where(every, most, 1).astype(float),
                "bad_max": most.astype(float),
            }
        )

    term_parts = [
        (s, b) for (_, _), (s, b) in groups.items() if s.name and s.quantity in TERM_QUANTITIES
    ]
    snap.grad_wrt = "params" if term_parts else None
    if not term_parts:
        term_parts = [
            (s, b) for (_, _), (s, b) in groups.items() if s.name and s.quantity == "grad_norm"
        ]
        snap.grad_wrt = "input" if term_parts else None
    df = _long(
        [({"term": label(s.pipeline, s.name), "quantity": _quantity(s)}, b) for s, b in term_parts],
        width,
    )
    if df is not None:
        snap.grads = df[["step", "term", "quantity", "value"]]
        latest += [(_quantity(s), label(s.pipeline, s.name), _last_mean(b)) for s, b in term_parts]
        snap.base_terms = frozenset(
            label(s.pipeline, s.name) for s, _ in term_parts if s.name == BASE_TERM
        )
    snap.latest = pd.DataFrame(latest, columns=["group", "name", "value"])
    snap.latest = snap.latest[snap.latest["group"].isin(("weighted", *GRAD_QUANTITIES))]

    process_of = {r.id: r.process for r in runs}
    if events:
        snap.events = pd.DataFrame(
            [
                {
                    "step": e.step,
                    "wall_time": e.wall_time,
                    "kind": e.kind,
                    "name": e.name,
                    "severity": e.severity,
                    "message": e.message,
                    "process": process_of.get(e.run_id, 0),
                    "penalty": _text(e.attributes.get("penalty")),
                    "capsule": _text(e.attributes.get("capsule")),
                    "replay": _text(e.attributes.get("replay")),
                }
                for e in events
                if e.kind in ("alert", "nonfinite")
            ],
            columns=list(snap.events.columns),
        )

    h = snap.headline
    h.status = _runs.combine_statuses(r.status for r in runs)
    h.updated_at = max((r.updated_at for r in runs), default=None)
    if steps and steps.get("step") is not None and steps["step"].size:
        _headline_from_steps(h, steps)
        snap.durations, snap.duration_summary = _durations(steps)
    return snap


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _headline_from_steps(h: _model.Headline, steps: Mapping[str, np.ndarray]) -> None:
    """Current step, loss and total: the latest row of each process, averaged."""
    run_ids = steps["run_id"]
    last = [np.flatnonzero(run_ids == r)[-1] for r in np.unique(run_ids)]
    h.step = int(steps["step"][last].max())

    def avg(col: str) -> float | None:
        v = steps[col][last]
        return None if np.all(np.isnan(v)) else float(np.nanmean(v))

    h.loss, h.total = avg("loss"), avg("total")
    h.last_step_at = float(np.nanmax(steps["wall_time"][last]))


def _durations(steps: Mapping[str, np.ndarray]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Device-time p50/p90/p99 (ms) per sub-window of the recent steps, and overall."""
    ok = np.isfinite(steps["duration_seconds"])
    if not ok.any():
        return _model.frame("step", "percentile", "ms"), {}
    step, ms = steps["step"][ok], steps["duration_seconds"][ok] * 1e3
    order = np.argsort(step, kind="stable")
    step, ms = step[order], ms[order]
    summary = {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}
    summary["steps"] = float(ms.size)
    chunk = max(1, ms.size // 40)
    rows = []
    for i in range(0, ms.size, chunk):
        end = float(step[min(i + chunk, ms.size) - 1])
        p50, p90, p99 = np.percentile(ms[i : i + chunk], (50, 90, 99))
        rows += [(end, "p50", float(p50)), (end, "p90", float(p90)), (end, "p99", float(p99))]
    return pd.DataFrame(rows, columns=["step", "percentile", "ms"]), summary
