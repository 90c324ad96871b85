"""The sink interface: where a monitor's records go.

Deliberately narrow (compare ``clu/metric_writers/interface.py`` and Levanter's
``Tracker``): a sink is told once which run it serves, then receives batches of step
records and events in order, and is flushed and closed. Every hook a sink may implement
is named here with a default, so the monitor never probes with ``hasattr``.

The monitor wraps each sink in its own delivery worker (``penwatch/telemetry/_delivery.py``):
one thread per sink, so a slow, hung or failing sink never delays another or the
training step; an outage buffer of :attr:`Sink.max_pending` records; retries with a
short backoff. A sink therefore simply raises:

* :class:`SinkUnavailable` (or any ``OSError``: a port taken, a collector unreachable, a
  disk full) when it cannot write *now*: the batch stays buffered and is retried;
* any other exception for a record it can never write: the worker writes the batch's
  records one at a time and drops (and counts) the one that still fails alone.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from penwatch.schema import Event, RunInfo, RunStatus, StepRecord

__all__ = ["Sink", "SinkUnavailable"]


class SinkUnavailable(Exception):
    """A sink cannot write now (outage): keep the records and retry later."""


class Sink(abc.ABC):
    """Receives a run's records, from one delivery thread of its own, in order.

    Attributes (class defaults; built-in sinks take them as keyword options):
      name: the sink's name in counters and logs.
      max_pending: records (steps and events) kept while the sink is down or behind;
        past it the oldest are dropped, counted and reported by a ``records_dropped``
        event once the sink writes again.
      batch_size: most records handed to one :meth:`write_steps` call.
      max_delay: seconds a record may wait for its batch to fill (latency bound).
      flush_interval: seconds between :meth:`flush` calls while the run lasts (also the
        heartbeat of sinks that keep one, like the SQLite store).
    """

    name: str = ""
    max_pending: int = 10_000
    batch_size: int = 256
    max_delay: float = 0.2
    flush_interval: float = 1.0

    def open(self, info: RunInfo) -> None:  # noqa: B027 - optional hook
        """Called before the first record (again after a failed try)."""

    def begin_step(self, record: StepRecord) -> int | None:
        """Start a step's span and return its trace id (tracing sinks only).

        Called on the monitor's dispatch thread before the record is fanned out, so the
        trace id reaches every sink (exemplars, the store); must be quick and do no I/O.
        A sink that overrides it gets the record's :meth:`write_steps` as usual.
        """
        return None

    @abc.abstractmethod
    def write_step(self, record: StepRecord) -> None:
        """Write one step's metrics."""

    def write_steps(self, records: Sequence[StepRecord]) -> None:
        """Write a batch of steps (default: :meth:`write_step` each). Batched sinks (the
        store) override it to write the batch at once, or not at all."""
        for record in records:
            self.write_step(record)

    def write_event(self, event: Event) -> None:  # noqa: B027 - optional hook
        """Write one event (non-finite detection, alert, dropped records)."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written so far durable or visible; called periodically."""

    def close(self, *, status: RunStatus = "finished") -> None:
        """Flush and release resources; ``status`` says how the run ended (``finished``,
        ``stopped`` by a signal, ``failed`` by an exception). Called once."""
        self.flush()
