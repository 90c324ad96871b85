"""Transactional writes to the SQLite run store.

:meth:`StoreWriter.write` commits a batch of step records and events in one transaction;
it is what ``pw.sinks.SQLite`` calls, whose outage buffer is the monitor's per-sink
delivery worker (one buffer, sized by the user: this module keeps none). A commit that
cannot happen now (read-only file, disk full, database locked, directory gone) is rolled
back and raised as :class:`StoreUnavailableError`; any other failure (a value SQLite
cannot bind) is rolled back and raised as it is, for the caller to isolate the record.
For scripts and tests, :meth:`StoreWriter.add_step` / :meth:`~StoreWriter.add_event`
buffer records and commit every ``batch_size`` records or ``flush_interval`` seconds
(and on :meth:`~StoreWriter.flush`); after a failed commit the records stay buffered.

A store file deleted while the writer runs is detected at the next flush (the path no
longer exists or is a different file): the writer opens a fresh store at the same path
(recreating the directory if needed), registers its runs again and writes a
``store_recreated`` event; what was committed to the deleted file is gone with it.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import pathlib
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from penwatch.schema import RUN_STATUSES, Event, RunInfo, StepRecord
from penwatch.store import _packed
from penwatch.store._packed import STEP_KEYS
from penwatch.store._rows import StepColumns, insert_rows, key_parts
from penwatch.store._schema import ROLLUP_WIDTHS, StoreUnavailableError, writer_connection

logger = logging.getLogger(__name__)

_WRITABLE_STATUSES = tuple(s for s in RUN_STATUSES if s != "crashed")  # crashed: a verdict


class StoreWriter:
    """Writes runs, step records and events to a store file, in batches.

    Not thread-safe: call it from one thread (the monitor's worker).

    Args:
      path: the store file (created with its directory when missing).
      batch_size: commit automatically once this many records are buffered.
      flush_interval: commit automatically when a record arrives this many seconds after
        the last commit (so a live dashboard sees data within about this delay).
      busy_timeout: seconds to wait for a lock held by another connection.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_size: int = 512,
        flush_interval: float = 0.5,
        busy_timeout: float = 5.0,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"StoreWriter: batch_size must be an int >= 1, got {batch_size!r}")
        for name, value in (("flush_interval", flush_interval), ("busy_timeout", busy_timeout)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"StoreWriter: {name} must be a finite number >= 0, got {value!r}")
        self.path = pathlib.Path(path)
        self.batch_size = batch_size
        self.flush_interval = float(flush_interval)
        self.busy_timeout = float(busy_timeout)
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None
        self._infos: dict[tuple[str, int], RunInfo] = {}
        self._finished: dict[tuple[str, int], tuple[str, float]] = {}
        self._run_ids: dict[tuple[str, int], int] = {}
        self._series_ids: dict[tuple[int, str, str], int] = {}
        self._layouts: dict[tuple[int, str, Any], int] = {}
        self._buckets: dict[tuple[int, int], tuple[int, dict[str, Any]]] = {}
        # (layout, width) -> the highest bucket in the file (read once, then kept up to
        # date): a batch's buckets above it are new, so no query is needed for them
        self._top_bucket: dict[tuple[int, int], float] = {}
        self._pending: collections.deque[StepRecord | Event] = collections.deque()
        self._pending_ids: set[int] = set()
        self._notes: list[Event] = []
        self._last_flush = time.monotonic()
        self._failing = False
        self._heartbeat = False
        self._last_step: dict[tuple[str, int], int] = {}
        self.recreated = 0
        """Times the store file vanished and was recreated."""

    # --- buffering -------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records buffered and not yet committed."""
        return len(self._pending)

    def open_run(self, info: RunInfo) -> None:
        """Register a run (``status='running'``) and commit it now."""
        self._infos[(info.run, info.process)] = info
        self._finished.pop((info.run, info.process), None)
        self.flush()

    def finish_run(self, run: str, process: int = 0, *, status: str = "finished") -> None:
        """Mark a run finished (or ``'failed'``) at the next flush."""
        if status not in _WRITABLE_STATUSES:
            raise ValueError(
                f"StoreWriter.finish_run: status must be one of {_WRITABLE_STATUSES}, "
                f"got {status!r}"
            )
        self._finished[(run, process)] = (status, time.time())

    def add_step(self, record: StepRecord) -> None:
        """Buffer one step record; commits when a batch is due (may raise, record kept).

        Calling it again with the same record object (a retry) does not duplicate it.
        """
        self._add(record)

    def add_event(self, event: Event) -> None:
        """Buffer one event; commits when a batch is due (may raise, event kept)."""
        self._add(event)

    def _add(self, item: StepRecord | Event) -> None:
        if id(item) not in self._pending_ids:
            key = (item.run, item.process)
            self._last_step[key] = max(item.step, self._last_step.get(key, item.step))
            self._pending.append(item)
            self._pending_ids.add(id(item))
        due = len(self._pending) >= self.batch_size or (
            time.monotonic() - self._last_flush >= self.flush_interval
        )
        if due:
            self.flush()

    # --- committing ------------------------------------------------------------------

    def flush(self) -> None:
        """Commit everything buffered in one transaction.

        Raises:
          StoreUnavailableError: the store could not be written; the records stay
            buffered for the next flush.
        """
        self._last_flush = time.monotonic()
        batch = list(self._pending)
        self._commit(batch)
        for _ in batch:
            self._pending_ids.discard(id(self._pending.popleft()))

    def write(self, items: Sequence[StepRecord | Event]) -> None:
        """Commit ``items`` (and any runs/status changes) in one transaction, now.

        The unbuffered path of ``pw.sinks.SQLite``, whose outage buffer is the monitor's
        per-sink delivery worker: on failure nothing of ``items`` is kept here.

        Raises:
          StoreUnavailableError: the store cannot be written now (locked, read-only, disk
            full, directory gone): retry later.
          Exception: anything else (a value SQLite cannot bind) means ``items`` holds a
            record that can never be written; the transaction was rolled back.
        """
        for item in items:
            key = (item.run, item.process)
            self._last_step[key] = max(item.step, self._last_step.get(key, item.step))
        self._commit(items)

    def heartbeat(self) -> None:
        """Refresh ``updated_at`` of this writer's running runs (readers tell a live run
        from a crashed one by it); commits at once."""
        self._heartbeat = True
        self._commit(())

    def _commit(self, batch: Sequence[StepRecord | Event]) -> None:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._write_runs(conn)
                self._write_notes(conn)
                self._write_batch(conn, list(batch))
                if self._heartbeat:
                    self._write_heartbeat(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.OperationalError, OSError) as exc:
            # Start the next try from a fresh connection: permissions, locks or the file
            # itself may have changed, and ids assigned in the rolled-back transaction are void.
            self._reset()
            if not self._failing:
                logger.warning("penwatch store %s: write failed (%s); will retry", self.path, exc)
            self._failing = True
            raise StoreUnavailableError(
                f"penwatch store {str(self.path)!r}: write failed ({exc}); "
                f"{len(self._pending)} buffered records kept for retry"
            ) from exc
        except BaseException:
            self._reset()  # a record SQLite cannot take: ids of the rollback are void
            raise
        self._notes.clear()
        self._finished.clear()
        self._heartbeat = False
        if self._failing:
            logger.warning("penwatch store %s: writing again", self.path)
        self._failing = False

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._forget_file()

    def _forget_file(self) -> None:
        """Drop what was learned from or assigned in the file (ids, open buckets)."""
        self._run_ids.clear()
        self._series_ids.clear()
        self._layouts.clear()
        self._buckets.clear()
        self._top_bucket.clear()

    def _write_heartbeat(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        for run, process in self._infos:
            conn.execute(
                "UPDATE runs SET updated_at = max(updated_at, ?) WHERE id = ? AND status = "
                "'running'",
                (now, self._run_id(conn, run, process, now)),
            )

    def close(self) -> None:
        """Commit what is buffered and close the file (raises like :meth:`flush`)."""
        try:
            self.flush()
        finally:
            if self._conn is not None and not self._pending:
                self._conn.close()
                self._conn = None

    def _connection(self) -> sqlite3.Connection:
        """The open connection, reopened when the file was deleted or replaced."""
        if self._conn is not None:
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._file_id
            except FileNotFoundError:
                same = False
            if same:
                return self._conn
            logger.warning("penwatch store %s: file was deleted or replaced; recreating", self.path)
            self._conn.close()
            self._conn = None
            self.recreated += 1
            self._forget_file()
            now = time.time()
            for run, process in self._infos:
                self._notes.append(
                    Event(
                        run,
                        process,
                        self._last_step.get((run, process), 0),
                        now,
                        "info",
                        "store_recreated",
                        f"the store file {self.path} was deleted or replaced while the "
                        "run was writing; earlier records are not in this file",
                        severity="warning",
                    )
                )
        conn = writer_connection(self.path, busy_timeout=self.busy_timeout)
        st = os.stat(self.path)
        self._conn, self._file_id = conn, (st.st_dev, st.st_ino)
        return conn

    def _run_id(self, conn: sqlite3.Connection, run: str, process: int, wall: float) -> int:
        key = (run, process)
        run_id = self._run_ids.get(key)
        if run_id is not None:
            return run_id
        info = self._infos.get(key)
        started = info.started_at if info else wall
        row = conn.execute(
            "INSERT INTO runs (name, process, started_at, updated_at, status, version, backend,"
            " devices, config) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)"
            " ON CONFLICT (name, process) DO UPDATE SET status = 'running', finished_at = NULL,"
            " version = coalesce(excluded.version, version),"
            " backend = coalesce(excluded.backend, backend),"
            " devices = coalesce(excluded.devices, devices),"
            " config = coalesce(excluded.config, config) RETURNING id",
            (
                run,
                process,
                started,
                time.time(),
                info.version if info else None,
                info.backend if info else None,
                info.devices if info else None,
                json.dumps(dict(info.config), default=str) if info else None,
            ),
        ).fetchone()
        self._run_ids[key] = row[0]
        return row[0]

    def _write_runs(self, conn: sqlite3.Connection) -> None:
        for (run, process), info in self._infos.items():
            self._run_id(conn, run, process, info.started_at)
        for (run, process), (status, when) in self._finished.items():
            run_id = self._run_id(conn, run, process, when)
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                (status, when if status != "running" else None, when, run_id),
            )

    def _write_notes(self, conn: sqlite3.Connection) -> None:
        for note in self._notes:
            self._insert_event(conn, note)

    def _insert_event(self, conn: sqlite3.Connection, event: Event) -> None:
        run_id = self._run_id(conn, event.run, event.process, event.wall_time)
        conn.execute(
            "INSERT INTO events (run_id, step, wall_time, kind, name, severity, message,"
            " attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                event.step,
                event.wall_time,
                event.kind,
                event.name,
                event.severity,
                event.message,
                json.dumps(dict(event.attributes), default=str, allow_nan=True),
            ),
        )

    def _write_batch(self, conn: sqlite3.Connection, batch: list[StepRecord | Event]) -> None:
        records: list[StepRecord] = []
        for item in batch:
            if isinstance(item, Event):
                self._insert_event(conn, item)
            else:
                records.append(item)
        if not records:
            return
        run_ids = [self._run_id(conn, r.run, r.process, r.wall_time) for r in records]
        layout_ids = [
            self._layout_id(conn, run_id, r) for run_id, r in zip(run_ids, records, strict=True)
        ]
        columns = StepColumns.of(records)
        blobs: list[bytes] = [b""] * len(records)
        groups: dict[int, list[int]] = {}  # layout id -> positions in the batch
        for i, layout_id in enumerate(layout_ids):
            groups.setdefault(layout_id, []).append(i)
        for layout_id, positions in groups.items():
            values = np.array([list(records[i].values.values()) for i in positions], np.float64)
            values = values.reshape(len(positions), -1)
            for i, blob in zip(positions, _packed.encode_values(values), strict=True):
                blobs[i] = blob
            self._write_rollups(conn, layout_id, columns.take(positions), values)
        insert_rows(  # in write order: readers take steps by id
            conn,
            "INSERT INTO steps (run_id, step, pipeline, wall_time, loss, total,"
            " duration_seconds, nonfinite, trace_id, report, layout_id, vals) VALUES",
            columns.rows(run_ids, layout_ids, blobs),
        )
        last_step: dict[int, tuple[int, float]] = {}
        for run_id, step, wall in zip(run_ids, columns.step, columns.wall_time, strict=True):
            prev = last_step.get(run_id)
            last_step[run_id] = (step if prev is None else max(step, prev[0]), wall)
        for run_id, (step, wall) in last_step.items():
            conn.execute(
                "UPDATE runs SET updated_at = max(updated_at, ?),"
                " last_step = max(coalesce(last_step, ?), ?) WHERE id = ?",
                (wall, step, step, run_id),
            )

    def _write_rollups(
        self, conn: sqlite3.Connection, layout_id: int, columns: StepColumns, values: np.ndarray
    ) -> None:
        """Merge the steps of one layout into its rollup buckets at every width."""
        step_values, present = columns.step_series()
        entries = np.concatenate([step_values, values], axis=1)
        present = np.concatenate([present, np.ones(values.shape, dtype=bool)], axis=1)
        steps = np.array(columns.step, dtype=np.int64)
        order = np.argsort(steps, kind="stable")
        steps, entries, present = steps[order], entries[order], present[order]
        agg, last = _packed.bucket_sums(steps, entries, present, ROLLUP_WIDTHS[0]), ROLLUP_WIDTHS[0]
        for width in ROLLUP_WIDTHS:
            if width != last:  # each coarser width from the one below (small arrays)
                agg, last = _packed.coarsen(agg, width // last), width
            parts = _packed.split_buckets(agg)
            held = self._buckets.get((layout_id, width))
            stored = self._stored_buckets(
                conn, layout_id, width, [b for b, _ in parts if held is None or b != held[0]]
            )
            rows = []
            for bucket, part in parts:
                old = held[1] if held is not None and held[0] == bucket else stored.get(bucket)
                merged = part if old is None else _packed.merge_bucket(old, part)
                rows.append((layout_id, width, bucket, *_packed.encode_bucket(merged)))
            # the open bucket (the batch's last) is kept here: read from the file once
            self._buckets[(layout_id, width)] = (parts[-1][0], merged)
            top = self._top_bucket[(layout_id, width)]
            self._top_bucket[(layout_id, width)] = max(top, parts[-1][0])
            insert_rows(
                conn,
                "INSERT INTO rollups (layout_id, width, bucket, step_lo, step_hi, n, n_nan,"
                " n_inf, vmin, vmax, vsum) VALUES",
                rows,
                tail="ON CONFLICT (layout_id, width, bucket) DO UPDATE SET"
                " step_lo = excluded.step_lo, step_hi = excluded.step_hi, n = excluded.n,"
                " n_nan = excluded.n_nan, n_inf = excluded.n_inf, vmin = excluded.vmin,"
                " vmax = excluded.vmax, vsum = excluded.vsum",
            )

    def _stored_buckets(
        self, conn: sqlite3.Connection, layout_id: int, width: int, buckets: list[int]
    ) -> dict[int, dict[str, Any]]:
        """The stored rows among ``buckets`` (sorted) of one layout and width.

        One query for the file's highest bucket the first time, then one only when some
        of ``buckets`` lie at or below it (a resumed run over steps written before, or
        steps arriving out of order): a run writing forward queries nothing per batch.
        """
        key = (layout_id, width)
        top = self._top_bucket.get(key)
        if top is None:
            (highest,) = conn.execute(
                "SELECT max(bucket) FROM rollups WHERE layout_id = ? AND width = ?", key
            ).fetchone()
            top = self._top_bucket[key] = -math.inf if highest is None else highest
        known = [b for b in buckets if b <= top]
        if not known:
            return {}
        rows = conn.execute(
            "SELECT bucket, step_lo, step_hi, n, n_nan, n_inf, vmin, vmax, vsum FROM rollups"
            " WHERE layout_id = ? AND width = ? AND bucket BETWEEN ? AND ?",
            (layout_id, width, known[0], known[-1]),
        ).fetchall()
        return {row[0]: _packed.decode_bucket(row[1:]) for row in rows}

    def _layout_id(self, conn: sqlite3.Connection, run_id: int, record: StepRecord) -> int:
        """The stored layout of a record's keys (registered once per run and pipeline)."""
        cache_key = (run_id, record.pipeline, record.layout)
        layout_id = self._layouts.get(cache_key)
        if layout_id is not None:
            return layout_id
        if len(self._layouts) >= 1024:  # keys that change every step
            self._layouts.clear()
        for key in STEP_KEYS:
            self._sid(conn, run_id, record, key)
        sids = [self._sid(conn, run_id, record, key) for key in record.values]
        signature = ",".join(map(str, sids))
        conn.execute(
            "INSERT OR IGNORE INTO layouts (run_id, pipeline, size, signature) VALUES (?, ?, ?, ?)",
            (run_id, record.pipeline, len(sids), signature),
        )
        layout_id = conn.execute(
            "SELECT id FROM layouts WHERE run_id = ? AND pipeline = ? AND signature = ?",
            (run_id, record.pipeline, signature),
        ).fetchone()[0]
        conn.executemany(
            "INSERT OR IGNORE INTO layout_series (layout_id, idx, series_id) VALUES (?, ?, ?)",
            [(layout_id, i, sid) for i, sid in enumerate(sids)],
        )
        self._layouts[cache_key] = layout_id
        return layout_id

    def _sid(self, conn: sqlite3.Connection, run_id: int, record: StepRecord, key: str) -> int:
        sid = self._series_ids.get((run_id, record.pipeline, key))
        return self._series_id(conn, run_id, record, key) if sid is None else sid

    def _series_id(
        self, conn: sqlite3.Connection, run_id: int, record: StepRecord, key: str
    ) -> int:
        name, quantity = key_parts(record, key)
        conn.execute(
            "INSERT OR IGNORE INTO series (run_id, pipeline, name, quantity, key)"
            " VALUES (?, ?, ?, ?, ?)",
            (run_id, record.pipeline, name, quantity, key),
        )
        sid = conn.execute(
            "SELECT id FROM series WHERE run_id = ? AND pipeline = ? AND key = ?",
            (run_id, record.pipeline, key),
        ).fetchone()[0]
        self._series_ids[(run_id, record.pipeline, key)] = sid
        return sid
