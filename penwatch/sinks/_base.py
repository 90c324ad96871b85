"""The sink interface: where a monitor's records go.

Deliberately narrow (compare ``clu/metric_writers/interface.py``): a sink is told once
which run it serves, then receives steps and events in order from the monitor's single
worker thread, and is flushed and closed. Sinks never see device arrays and never run on
the training thread; a sink that raises is isolated by the monitor (logged once,
counted, retried with backoff), so a sink may simply let errors propagate.
"""

from __future__ import annotations

import abc

from penwatch.schema import Event, RunInfo, StepRecord


class Sink(abc.ABC):
    """Receives a run's records. Called from one worker thread, in order."""

    def open(self, info: RunInfo) -> None:  # noqa: B027 - optional hook
        """Called once before the first record."""

    @abc.abstractmethod
    def write_step(self, record: StepRecord) -> None:
        """Write one step's metrics."""

    def write_event(self, event: Event) -> None:  # noqa: B027 - optional hook
        """Write one event (non-finite detection, alert)."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written so far durable or visible."""

    def close(self) -> None:
        """Flush and release resources. Called once; later calls do nothing."""
        self.flush()
