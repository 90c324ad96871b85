"""``Callback``: hand every record (and optionally every event) to a function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from penwatch import _checks
from penwatch.schema import Event, StepRecord
from penwatch.sinks._base import Sink

__all__ = ["Callback"]


class Callback(Sink):
    """Calls ``fn(record)`` for every :class:`StepRecord` on the monitor's worker thread.

    An exception in ``fn`` is isolated like any sink failure (logged, counted, retried
    with backoff), never raised into training.

    Args:
      fn: called with each :class:`StepRecord` (host floats, keys already parsed).
      on_event: optional, called with each :class:`Event` (non-finite reports, alerts).
    """

    name = "Callback"

    def __init__(
        self,
        fn: Callable[[StepRecord], Any],
        *,
        on_event: Callable[[Event], Any] | None = None,
    ) -> None:
        self.fn = _checks.check_callable("penwatch.sinks.Callback", "fn", fn)
        if on_event is not None:
            _checks.check_callable("penwatch.sinks.Callback", "on_event", on_event, label="option")
        self.on_event = on_event

    def write_step(self, record: StepRecord) -> None:
        self.fn(record)

    def write_event(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
