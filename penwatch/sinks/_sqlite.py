"""``pw.sinks.SQLite``: the embedded run store that the dashboard reads."""

from __future__ import annotations

import os
from collections.abc import Sequence

from penwatch import _checks
from penwatch.schema import Event, RunInfo, RunStatus, StepRecord
from penwatch.schema import thresholds as th
from penwatch.sinks._base import Sink, SinkUnavailable
from penwatch.store import StoreUnavailableError, StoreWriter

_FN = "penwatch.sinks.SQLite"


class SQLite(Sink):
    """Writes every step, event and run to an SQLite store (WAL; one writer, many readers).

    Records reach the store in batches, one transaction each (``batch_size`` records, or
    whatever arrived within ``flush_interval`` seconds). When the store cannot be written
    (read-only file, disk full, database locked, directory gone) the records wait in this
    sink's outage buffer — up to ``max_pending`` records, honoured — and are all written
    when it works again; beyond that the oldest are dropped, counted, and a
    ``records_dropped`` event with the step range is stored once writing resumes. A
    record SQLite can never take is dropped alone and counted; the others are stored.
    A running monitor refreshes its run's ``updated_at`` every ``heartbeat`` seconds, so
    readers show a run whose process died as ``crashed``. A store file deleted mid-run is
    recreated at the next write (with a ``store_recreated`` event). See
    :class:`~penwatch.store.StoreWriter`.

    Args:
      path: the store file (default ``penwatch.db``); created with its directory.
      batch_size: most records per transaction.
      flush_interval: seconds a record waits at most for its batch (the dashboard's lag).
      max_pending: most records kept while the store cannot be written.
      busy_timeout: seconds to wait for another connection's lock.
      heartbeat: seconds between heartbeats (default
        :data:`penwatch.schema.thresholds.HEARTBEAT_SECONDS`).

    Example::

        monitor = pw.Monitor(run="exp1", sinks=[pw.sinks.SQLite("runs/penwatch.db")])
    """

    name = "SQLite"

    def __init__(
        self,
        path: str | os.PathLike[str] = "penwatch.db",
        *,
        batch_size: int = 512,
        flush_interval: float = 0.5,
        max_pending: int = 100_000,
        busy_timeout: float = 5.0,
        heartbeat: float = th.HEARTBEAT_SECONDS,
    ) -> None:
        self.batch_size = _checks.check_int(_FN, "batch_size", batch_size, min=1)
        self.max_delay = _checks.check_nonnegative(_FN, "flush_interval", flush_interval)
        self.max_pending = _checks.check_int(_FN, "max_pending", max_pending, min=1)
        self.flush_interval = _checks.check_positive(_FN, "heartbeat", heartbeat)
        self.writer = StoreWriter(
            path,
            batch_size=batch_size,
            flush_interval=flush_interval,
            busy_timeout=busy_timeout,
        )
        self.path = self.writer.path
        self._runs: list[tuple[str, int]] = []
        self._closed = False

    def open(self, info: RunInfo) -> None:
        """Register the run (``status='running'``); raises if the store is unwritable."""
        if (info.run, info.process) not in self._runs:
            self._runs.append((info.run, info.process))
        try:
            self.writer.open_run(info)
        except StoreUnavailableError as exc:
            raise SinkUnavailable(str(exc)) from exc

    def write_step(self, record: StepRecord) -> None:
        self._commit((record,))

    def write_steps(self, records: Sequence[StepRecord]) -> None:
        self._commit(records)

    def write_event(self, event: Event) -> None:
        self._commit((event,))

    def flush(self) -> None:
        """The heartbeat: refresh the run's ``updated_at``."""
        try:
            self.writer.heartbeat()
        except StoreUnavailableError as exc:
            raise SinkUnavailable(str(exc)) from exc

    def close(self, *, status: RunStatus = "finished") -> None:
        """Mark the run ``status`` (``finished``, ``stopped`` or ``failed``) and close."""
        if self._closed:
            return
        for run, process in self._runs:
            self.writer.finish_run(run, process, status=status)
        try:
            self.writer.close()
        except StoreUnavailableError as exc:
            raise SinkUnavailable(str(exc)) from exc
        self._closed = True

    def _commit(self, items: Sequence[StepRecord | Event]) -> None:
        try:
            self.writer.write(items)
        except StoreUnavailableError as exc:
            raise SinkUnavailable(str(exc)) from exc
