"""Where the dashboard's data comes from: a small source interface and two implementations.

A source lists runs and builds a :class:`Snapshot` of one run (one process or all of
them) — everything the views draw, already downsampled. Sources keep state between calls
and read **only what is new** on each refresh: :class:`SQLiteSource` polls the store by
id (``id > last_seen``) and by rollup bucket; :class:`~dashboard.prom_source.PrometheusSource`
asks Prometheus only for the time since its last query. The app keeps one source per
browser session (``st.session_state``), so a long run stays cheap to watch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol

import numpy as np
import pandas as pd

from penwatch import store
from penwatch.dashboard import _runs, _snapshot
from penwatch.dashboard._errors import SourceUnavailable
from penwatch.dashboard._runs import RunChoice
from penwatch.dashboard._snapshot import ALL_PROCESSES, Snapshot
from penwatch.dashboard.prom_source import PrometheusSource
from penwatch.schema import thresholds

__all__ = [
    "ALL_PROCESSES",
    "Config",
    "PrometheusSource",
    "RunChoice",
    "SQLiteSource",
    "Snapshot",
    "Source",
    "SourceUnavailable",
    "make_source",
    "session_source",
]

STEP_WINDOW = 2000
"""Most recent step rows kept for headline numbers and duration percentiles."""


class Source(Protocol):
    """What the app needs from a data source."""

    label: str

    def runs(self) -> list[RunChoice]:
        """Runs, most recently updated first (raises :class:`SourceUnavailable`)."""
        ...

    def snapshot(self, run: str, process: int | None) -> Snapshot:
        """Everything the views draw for ``run`` (``process=None``: all processes)."""
        ...


@dataclasses.dataclass(frozen=True)
class Config:
    """Where to read from and how: a store path or a Prometheus URL (Prometheus wins).

    Attributes:
      db: the SQLite store.
      prometheus: a Prometheus server's base URL, or None.
      refresh_seconds: seconds between refreshes.
      stale_after: seconds without a heartbeat after which a ``running`` run reads as
        ``crashed`` (Prometheus: ``idle``).
    """

    db: str = "penwatch.db"
    prometheus: str | None = None
    refresh_seconds: float = 2.0
    stale_after: float = thresholds.STALE_AFTER_SECONDS

    @classmethod
    def from_env(
        cls, argv: list[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Config:
        """Options after ``--`` in ``streamlit run .../app.py -- --db PATH``, then env.

        ``--db`` / ``PENWATCH_DB``, ``--prometheus`` / ``PENWATCH_PROMETHEUS_URL``,
        ``--refresh`` / ``PENWATCH_REFRESH_SECONDS``, ``--stale-after`` /
        ``PENWATCH_STALE_AFTER``.

        Raises:
          ValueError: a number of seconds that is not a finite number > 0.
        """
        import argparse

        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(prog="penwatch/dashboard/app.py", allow_abbrev=False)
        parser.add_argument("--db", default=env.get("PENWATCH_DB", "penwatch.db"))
        parser.add_argument("--prometheus", default=env.get("PENWATCH_PROMETHEUS_URL") or None)
        parser.add_argument("--refresh", default=env.get("PENWATCH_REFRESH_SECONDS", "2"))
        parser.add_argument(
            "--stale-after",
            default=env.get("PENWATCH_STALE_AFTER", str(thresholds.STALE_AFTER_SECONDS)),
        )
        args, _ = parser.parse_known_args([] if argv is None else argv)
        return cls(
            db=args.db,
            prometheus=args.prometheus,
            refresh_seconds=_seconds("--refresh / PENWATCH_REFRESH_SECONDS", args.refresh),
            stale_after=_seconds("--stale-after / PENWATCH_STALE_AFTER", args.stale_after),
        )


def _seconds(option: str, raw: str | float) -> float:
    """A finite number of seconds > 0 from an option's text."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"dashboard: option {option} must be a finite number of seconds > 0, got {raw!r}"
        )
    return value


def make_source(config: Config) -> Source:
    """The source a config names."""
    if config.prometheus:
        return PrometheusSource(config.prometheus, stale_after=config.stale_after)
    return SQLiteSource(config.db, stale_after=config.stale_after)


def session_source(state: MutableMapping[str, Any], config: Config) -> Source:
    """One source per session and config, kept across Streamlit reruns."""
    key = f"penwatch-source:{config.prometheus or ''}:{config.db}:{config.stale_after:g}"
    if key not in state:
        state[key] = make_source(config)
    return state[key]


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


class SQLiteSource:
    """Reads a penwatch SQLite store incrementally (read-only; never creates it).

    A run that is not live (finished, stopped, failed, crashed) is read once more after
    it ended and then left alone until its heartbeat, last step or status changes (a
    resumed run).

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
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def runs(self) -> list[RunChoice]:
        try:
            rows = self._open().runs()
        except store.StoreError as exc:
            raise SourceUnavailable(f"{self.path} is not a readable penwatch store: {exc}") from exc
        return _runs.group_runs(rows)

    def snapshot(self, run: str, process: int | None) -> Snapshot:
        reader = self._open()
        rows = [r for r in reader.runs() if r.name == run]
        if process is not None:
            rows = [r for r in rows if r.process == process]
        run_ids = tuple(sorted(r.id for r in rows))
        cache = self._cache.get((run, process))
        if cache is None or cache.run_ids != run_ids:
            cache = self._cache[(run, process)] = _RunCache(run_ids)
        # an ended run is read once more, then only when its heartbeat, steps or status move
        ended = tuple((r.updated_at, r.last_step, r.status) for r in rows)
        if cache.settled != ended:
            self._update(reader, cache)
            live = any(r.status == _runs.LIVE for r in rows)
            cache.settled = None if live else ended
        return _snapshot.build(
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
            c.events = (c.events + events)[-5000:]
        nonfinite = _snapshot.total_nonfinite(c.series, c.buckets)
        if nonfinite != c.nonfinite_seen:
            c.nonfinite_seen = nonfinite
            c.reports = reader.step_reports(c.run_ids, limit=5) if nonfinite else []


def empty_frame(*columns: str) -> pd.DataFrame:
    """A DataFrame with the given columns and no rows."""
    return pd.DataFrame({c: [] for c in columns})
