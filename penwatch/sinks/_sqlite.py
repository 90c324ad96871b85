"""``pw.sinks.SQLite``: the embedded run store that the dashboard reads."""

from __future__ import annotations

import os

from penwatch.schema import Event, RunInfo, StepRecord
from penwatch.sinks._base import Sink


class SQLite(Sink):
    """Writes every step, event and run to an SQLite store (WAL; one writer, many readers).

    Records are batched: one transaction per ``flush()`` or per ``batch_size`` records or
    every ``flush_interval`` seconds, whichever comes first. When the store cannot be
    written (read-only file, disk full, database locked, directory gone) ``write_step``,
    ``write_event`` and ``flush`` raise :class:`~penwatch.store.StoreUnavailableError`
    for the monitor to count and retry, and keep the records buffered: nothing is lost
    until ``max_pending`` records wait, after which the oldest are dropped and a
    ``store_records_dropped`` event records how many (and which steps) once writing
    works again. Retrying ``write_step`` with the same record never duplicates it. A
    store file deleted mid-run is recreated at the next flush (with a ``store_recreated``
    event). See :class:`~penwatch.store.StoreWriter`.

    Args:
      path: the store file (default ``penwatch.db``); created with its directory.
      batch_size: commit after this many buffered records.
      flush_interval: commit when a record arrives this many seconds after the last commit.
      max_pending: most records kept while the store cannot be written.
      busy_timeout: seconds to wait for another connection's lock.

    Example::

        monitor = pw.Monitor(run="exp1", sinks=[pw.sinks.SQLite("runs/penwatch.db")])
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "penwatch.db",
        *,
        batch_size: int = 512,
        flush_interval: float = 0.5,
        max_pending: int = 100_000,
        busy_timeout: float = 5.0,
    ) -> None:
        # Imported here: penwatch.store imports penwatch.telemetry, whose package imports
        # the monitor and the sinks (a cycle at module level).
        from penwatch.store._writer import StoreWriter

        self.writer = StoreWriter(
            path,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_pending=max_pending,
            busy_timeout=busy_timeout,
        )
        self.path = self.writer.path
        self._runs: list[tuple[str, int]] = []
        self._closed = False

    def open(self, info: RunInfo) -> None:
        """Register the run (``status='running'``); raises if the store is unwritable."""
        self._runs.append((info.run, info.process))
        self.writer.open_run(info)

    def write_step(self, record: StepRecord) -> None:
        self.writer.add_step(record)

    def write_event(self, event: Event) -> None:
        self.writer.add_event(event)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, *, status: str = "finished") -> None:
        """Mark the run ``status`` (default ``finished``), flush and close the file."""
        if self._closed:
            return
        for run, process in self._runs:
            self.writer.finish_run(run, process, status=status)
        self.writer.close()
        self._closed = True

    @property
    def dropped(self) -> int:
        """Records dropped because the store stayed unwritable past ``max_pending``."""
        return self.writer.dropped

    @property
    def pending(self) -> int:
        """Records buffered, not yet committed."""
        return self.writer.pending
