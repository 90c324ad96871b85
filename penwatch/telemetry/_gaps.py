"""Gaps: records that were dropped, reported as one ``records_dropped`` event.

A gap is what a bounded buffer dropped since the last report: how many step records
and events, and the step range. The intake reports queue overflow this way to every
sink; a sink's delivery worker reports its own overflow to that sink once it writes
again, so the store shows where its data has a hole (SPEC section 11).
"""

from __future__ import annotations

import dataclasses
import time

from penwatch.schema import Event, RunInfo

__all__ = ["GAP_EVENT", "Gap"]

GAP_EVENT = "records_dropped"
"""The name of the event that marks a gap."""


@dataclasses.dataclass
class Gap:
    """Records dropped since the last report."""

    count: int = 0
    events: int = 0
    first_step: int | None = None
    last_step: int | None = None

    def __bool__(self) -> bool:
        return bool(self.count or self.events)

    def add(self, step: int | None, *, event: bool = False) -> None:
        """Count one dropped step record (or event) at ``step`` (None: unknown step)."""
        if event:
            self.events += 1
        else:
            self.count += 1
        if step is not None:
            self.first_step = step if self.first_step is None else min(self.first_step, step)
            self.last_step = step if self.last_step is None else max(self.last_step, step)

    def merge(self, other: Gap) -> None:
        """Fold ``other`` into this gap (a report that could not be written)."""
        self.count += other.count
        self.events += other.events
        firsts = [s for s in (self.first_step, other.first_step) if s is not None]
        lasts = [s for s in (self.last_step, other.last_step) if s is not None]
        self.first_step = min(firsts) if firsts else None
        self.last_step = max(lasts) if lasts else None

    def event(self, info: RunInfo, *, at: int, sink: str | None, reason: str, why: str) -> Event:
        """The ``records_dropped`` event for this gap, at step ``at``."""
        steps = f"steps {self.first_step}..{self.last_step}"
        by = f"sink {sink}" if sink else "the monitor"
        return Event(
            run=info.run,
            process=info.process,
            step=at,
            wall_time=time.time(),
            kind="info",
            name=GAP_EVENT,
            message=(
                f"{self.count} step records and {self.events} events ({steps}) were dropped "
                f"by {by}: {why}"
            ),
            severity="warning",
            attributes={
                "sink": sink,
                "reason": reason,
                "count": self.count,
                "events": self.events,
                "first_step": self.first_step,
                "last_step": self.last_step,
            },
        )
