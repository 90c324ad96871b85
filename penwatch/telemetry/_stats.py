"""The counters a monitor keeps: where every record went (SPEC section 11)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = ["LOSS_REASONS", "MonitorStats", "SinkStats"]

LOSS_REASONS = ("overflow", "poison", "unfinished")
"""Why a sink lost a record: its buffer overflowed, the record could not be written,
or it was still buffered or in flight when ``close`` stopped waiting."""


@dataclasses.dataclass(frozen=True)
class SinkStats:
    """One sink's delivery counters (step records; events are counted apart).

    ``received == written + sum(lost.values()) + pending`` always; ``pending`` is 0
    after ``close``.
    """

    name: str
    received: int
    written: int
    lost: dict[str, int]
    pending: int
    errors: int
    events_written: int
    events_lost: int
    healthy: bool


@dataclasses.dataclass(frozen=True)
class MonitorStats:
    """Counters of a monitor: what was recorded, and where every record went.

    For every sink ``s``: ``recorded == sum(dropped.values()) + sinks[s].received`` and
    ``sinks[s].received == sinks[s].written + sum(sinks[s].lost.values()) +
    sinks[s].pending`` (``pending`` is 0 after ``close``): every record is written or
    counted as lost, by reason.

    Attributes:
      recorded: ``record`` calls accepted on the training thread.
      processed: records parsed and handed to the sinks.
      dropped: records lost before any sink saw them, by reason: ``queue_full`` (the
        bounded queue overflowed; the oldest went), ``materialize_error`` (the arrays
        could not be read, e.g. donated buffers), ``invalid`` (values that could not be
        converted), ``close_timeout`` (still queued when ``close`` stopped waiting).
      refused: ``record`` calls after ``close`` (not recorded).
      sinks: per sink (by name) its :class:`~penwatch.telemetry.SinkStats`.
      events: events emitted (non-finite reports and alerts).
      alert_errors: exceptions raised by alerts (logged, never propagated).
    """

    recorded: int
    processed: int
    dropped: Mapping[str, int]
    refused: int
    sinks: Mapping[str, SinkStats]
    events: int
    alert_errors: int

    def lost(self, sink: str) -> int:
        """Records sink ``sink`` never wrote: dropped before it, or lost by it."""
        return sum(self.dropped.values()) + sum(self.sinks[sink].lost.values())
