"""Where the dashboard's data comes from: a small source interface and two implementations.

A source lists runs and builds a :class:`Snapshot` of one run (one process or all of
them) — the one data model of ``_model.py``, already downsampled, with every derived
figure computed by :func:`~penwatch.dashboard._model.derive`. Sources keep state between
calls and read **only what is new** on each refresh: :class:`SQLiteSource`
(``_sqlite_source.py``) polls the store by id and by rollup bucket;
:class:`~penwatch.dashboard.prom_source.PrometheusSource` asks Prometheus only for the
time since its last query. The app keeps one source per browser session
(``st.session_state``), so a long run stays cheap to watch.

Imports point one way: this module imports both sources; they import ``_model``,
``_runs`` and ``_errors``, never this module or each other.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol

from penwatch.dashboard._errors import SourceUnavailable
from penwatch.dashboard._model import ALL_PROCESSES, Snapshot
from penwatch.dashboard._runs import RunChoice
from penwatch.dashboard._sqlite_source import SQLiteSource
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


class Source(Protocol):
    """What the app needs from a data source."""

    label: str

    def runs(self) -> list[RunChoice]:
        """Runs, most recently updated first (raises :class:`SourceUnavailable`)."""
        ...

    def snapshot(self, run: str, process: int | None) -> Snapshot:
        """Everything the views draw for ``run`` (``process=None``: all processes)."""
        ...

    def diagnostics_steps(self, run: str, process: int | None) -> list[int]:
        """Diagnostics steps whose values :meth:`step_values` can read, oldest first
        (empty when the source keeps no per-step values: Prometheus)."""
        ...

    def step_values(
        self, run: str, process: int | None, step: int | None
    ) -> tuple[int, str, dict[str, float]] | None:
        """``(step, where, values)`` of one diagnostics step (None: the latest the
        source has), as record keys; None when there is none."""
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
        parser = argparse.ArgumentParser(prog="dashboard/app.py", allow_abbrev=False)
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
