"""Runs as the picker lists them, and what their statuses mean for the page.

A run's status per process is the store reader's: ``running``, ``finished``, ``stopped``,
``failed``, or ``crashed`` (the reader's verdict for ``running`` without a heartbeat for
``stale_after`` seconds; see :data:`penwatch.schema.RUN_STATUSES`). The Prometheus source
has no stored status and says ``running`` or ``idle``. Only ``running`` is live.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence

from penwatch.dashboard._text import md_escape

from penwatch import store

__all__ = ["LIVE", "RunChoice", "age", "combine_statuses", "group_runs", "status_note"]

LIVE = "running"
"""The one status whose run is still being written."""

ENDED = ("finished", "stopped", "failed", "crashed")
"""Statuses of runs that no longer write, least alarming first."""

_NOTES = {
    "finished": (
        "info",
        "Run {run} finished {age} (closed normally); it is not live, the data below is final.",
    ),
    "stopped": (
        "warning",
        "Run {run} was stopped {age} (SIGTERM or SIGINT): its records were flushed and the "
        "data below is final.",
    ),
    "failed": (
        "error",
        "Run {run} failed {age}: an exception ended its training (see the training "
        "process's log). The data below is final.",
    ),
    "crashed": (
        "error",
        "Run {run} crashed: it is still marked running, but its last heartbeat was {age} "
        "(limit {limit}). Its process probably died without closing the monitor; the data "
        "below ends there.",
    ),
    "idle": (
        "info",
        "Run {run} recorded its last step {age} (limit {limit}); Prometheus cannot tell "
        "whether it finished, was stopped or crashed.",
    ),
}


@dataclasses.dataclass(frozen=True)
class RunChoice:
    """A run as listed in the run picker.

    Attributes:
      name: the run's name (user text).
      processes: its process indices.
      status: the run's status over all processes (:func:`combine_statuses`).
      last_step: the furthest recorded step, or None.
      updated_at: the latest heartbeat of any process (Unix time).
      process_statuses: each process's status, aligned with ``processes`` (empty when
        the source does not know them).
      process_updated_at: each process's latest heartbeat, aligned with ``processes``.
    """

    name: str
    processes: tuple[int, ...]
    status: str
    last_step: int | None
    updated_at: float
    process_statuses: tuple[str, ...] = ()
    process_updated_at: tuple[float, ...] = ()

    @property
    def live(self) -> bool:
        """True while some process of the run is still being written."""
        return self.status == LIVE

    @property
    def per_process(self) -> list[tuple[int, str, float]]:
        """``(process, status, updated_at)`` of each process; empty when not known."""
        if not self.process_statuses:
            return []
        return list(
            zip(self.processes, self.process_statuses, self.process_updated_at, strict=True)
        )

    def of(self, process: int | None) -> tuple[str, float]:
        """``(status, updated_at)`` of one process, or of the whole run for None.

        The whole run's ``updated_at`` is the latest heartbeat among the processes in the
        run's status (a crashed run's age is its crashed process's).
        """
        if process is None:
            ages = [u for _, s, u in self.per_process if s == self.status]
            return self.status, max(ages, default=self.updated_at)
        for p, s, u in self.per_process:
            if p == process:
                return s, u
        return self.status, self.updated_at


def combine_statuses(statuses: Iterable[str]) -> str:
    """One status for a run from its processes' statuses.

    ``running`` while any process runs; otherwise the most alarming of ``crashed`` >
    ``failed`` > ``stopped`` > ``finished``; a status penwatch does not know is passed
    through; ``unknown`` for none.
    """
    seen = set(statuses)
    if LIVE in seen:
        return LIVE
    for status in reversed(ENDED):
        if status in seen:
            return status
    return min(seen) if seen else "unknown"


def group_runs(rows: Sequence[store.RunRow]) -> list[RunChoice]:
    """Runs by name (processes gathered), most recently updated first."""
    by: dict[str, list[store.RunRow]] = {}
    for r in rows:
        by.setdefault(r.name, []).append(r)
    out = []
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r.process)
        steps = [r.last_step for r in rs if r.last_step is not None]
        out.append(
            RunChoice(
                name,
                tuple(r.process for r in rs),
                combine_statuses(r.status for r in rs),
                max(steps) if steps else None,
                max(r.updated_at for r in rs),
                tuple(r.status for r in rs),
                tuple(r.updated_at for r in rs),
            )
        )
    return sorted(out, key=lambda c: -c.updated_at)


def status_note(
    choice: RunChoice, process: int | None, *, stale_after: float, now: float | None = None
) -> tuple[str, str] | None:
    """What the page says about a run's status, as ``(level, markdown)``, or None.

    ``level`` is ``info``, ``warning`` or ``error`` (the Streamlit banner to use). A live
    run gets no note unless one of its processes has ended (then a warning naming them);
    the run name is escaped (user text is text).

    Args:
      choice: the selected run.
      process: the selected process, or None for all.
      stale_after: the heartbeat limit the source applies (seconds).
      now: the time ages are measured to (default: now).
    """
    status, updated_at = choice.of(process)
    run = f"**{md_escape(choice.name)}**"
    if process is not None and len(choice.processes) > 1:
        run += f" (process {process})"
    mixed = process is None and len(set(choice.process_statuses)) > 1
    each = choice.per_process
    if status == LIVE:
        if not mixed:
            return None
        ended = [f"process {p} {md_escape(s)} ({age(u, now=now)})" for p, s, u in each if s != LIVE]
        return "warning", f"Run {run} is running, but {', '.join(ended)}."
    if status not in _NOTES:
        return None
    level, text = _NOTES[status]
    note = text.format(run=run, age=age(updated_at, now=now), limit=f"{stale_after:g} s")
    if mixed:
        note += " Processes: " + ", ".join(f"{p} {md_escape(s)}" for p, s, _ in each) + "."
    return level, note


def age(updated_at: float | None, *, now: float | None = None) -> str:
    """'3 s ago' style age of a timestamp."""
    if updated_at is None:
        return "never"
    s = max(0.0, (time.time() if now is None else now) - updated_at)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"
