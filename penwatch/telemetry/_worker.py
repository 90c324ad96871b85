"""The monitor's asynchronous machinery: a bounded queue, two ordered threads, sink guards.

``record`` on the training thread only appends device arrays to a bounded queue. Two
daemon threads then keep the records in order (compare ``clu``'s ``AsyncWriter`` and
OpenTelemetry's ``BatchProcessor``):

* the *ready* thread waits for each record's arrays with ``jax.block_until_ready`` and
  stamps the moment they became ready (device time, measured without blocking the
  training thread; a separate thread so a slow sink never delays the stamp);
* the *writer* thread materializes, checks, evaluates alerts and fans out to sinks.

The queue holds at most ``max_queue`` records across both stages; when full, the oldest
record is dropped (and counted), so memory stays bounded and ``record`` never blocks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from penwatch.sinks._base import Sink

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["Item", "SinkGuard", "Worker"]


@dataclasses.dataclass(eq=False)
class Item:
    """One queued record (or a flush/stop marker) travelling through the worker."""

    payload: Any = None
    step: Any = 0
    pipeline: str = "default"
    kind: str | None = None
    wall_time: float = 0.0
    dispatched_at_ns: int = 0
    ready_at_ns: int | None = None
    error: BaseException | None = None
    marker: str | None = None  # None (a record), "flush" or "stop"
    done: threading.Event | None = None


class Worker:
    """Bounded drop-oldest queue served in order by a ready thread and a writer thread.

    Args:
      handle: called on the writer thread with each record :class:`Item`.
      on_flush: called on the writer thread for flush markers and periodically.
      on_stop: called on the writer thread once, after the last record.
      on_start: called on the writer thread once, before the first record.
      max_queue: records held at most (both stages together).
      flush_interval: seconds between periodic ``on_flush`` calls while records flow.
      name: thread name prefix.
    """

    def __init__(
        self,
        *,
        handle: Callable[[Item], None],
        on_flush: Callable[[], None],
        on_stop: Callable[[], None],
        on_start: Callable[[], None] | None = None,
        max_queue: int,
        flush_interval: float,
        name: str = "penwatch",
    ) -> None:
        self._handle, self._on_flush, self._on_stop = handle, on_flush, on_stop
        self._on_start = on_start
        self._max_queue = max_queue
        self._flush_interval = flush_interval
        self._cond = threading.Condition()  # guards both deques; wakes the ready thread
        self._ready_cond = threading.Condition(self._cond._lock)  # wakes the writer
        self._ready_markers = 0  # flush/stop markers waiting in the ready deque
        self._ready_since: float | None = None  # when the oldest ready record arrived
        self._incoming: collections.deque[Item] = collections.deque()
        self._ready: collections.deque[Item] = collections.deque()
        self._pending = 0  # records (not markers) in both deques
        self._stopping = False
        self.dropped = 0
        self._ready_thread = threading.Thread(
            target=self._ready_loop, name=f"{name}-ready", daemon=True
        )
        self._writer_thread = threading.Thread(
            target=self._writer_loop, name=f"{name}-writer", daemon=True
        )
        self._ready_thread.start()
        self._writer_thread.start()

    @property
    def pending(self) -> int:
        """Records queued and not yet handed to the writer."""
        return self._pending

    @property
    def stopped(self) -> bool:
        return self._stopping

    def put(self, item: Item) -> bool:
        """Queue a record; returns False when it was refused (worker stopping)."""
        with self._cond:
            if self._stopping:
                return False
            if self._pending >= self._max_queue:
                self._drop_oldest()
            self._incoming.append(item)
            self._pending += 1
            self._cond.notify()
        return True

    def _drop_oldest(self) -> None:
        # Caller holds the lock. The ready stage holds the older records.
        for dq in (self._ready, self._incoming):
            for i, it in enumerate(dq):
                if it.marker is None:
                    del dq[i]
                    self._pending -= 1
                    self.dropped += 1
                    return

    def _marker(self, marker: str, timeout: float | None) -> bool:
        done = threading.Event()
        with self._cond:
            if self._stopping:
                stopped = True
            else:
                stopped = False
                if marker == "stop":
                    self._stopping = True
                self._incoming.append(Item(marker=marker, done=done))
                self._cond.notify_all()
        if stopped:
            self._writer_thread.join(timeout)
            return not self._writer_thread.is_alive()
        return done.wait(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued before this call went to the sinks, and they
        were flushed. Returns False on timeout."""
        if threading.current_thread() is self._writer_thread:
            return False  # a sink or alert callback flushing would deadlock
        return self._marker("flush", timeout)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain, flush, run ``on_stop`` and end the threads. Returns False on timeout."""
        if threading.current_thread() is self._writer_thread:
            with self._cond:
                self._stopping = True
            return False
        return self._marker("stop", timeout)

    def request_stop(self) -> None:
        """Like :meth:`stop` without waiting (for garbage collection)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._incoming.append(Item(marker="stop", done=threading.Event()))
            self._cond.notify_all()

    def _ready_loop(self) -> None:
        _lower_priority()
        while True:
            with self._cond:
                while not self._incoming:
                    self._cond.wait()
                item = self._incoming.popleft()
                if item.marker is None:
                    self._pending -= 1  # held here: not droppable
            if item.marker is None:
                try:
                    jax.block_until_ready(item.payload)
                except Exception as exc:  # deleted/donated buffers, a failed computation
                    item.error = exc
                item.ready_at_ns = time.time_ns()
            with self._cond:
                if item.marker is None:
                    self._pending += 1
                else:
                    self._ready_markers += 1
                if not self._ready:
                    self._ready_since = time.monotonic()
                self._ready.append(item)
                # The writer takes records in batches (fewer wake-ups competing with the
                # training step for the CPU): the first record starts its batch timer,
                # markers and full batches wake it at once.
                if item.marker is not None or len(self._ready) in (1, WRITER_BATCH):
                    self._ready_cond.notify()
            if item.marker == "stop":
                return

    def _writer_loop(self) -> None:
        _lower_priority()
        if self._on_start is not None:
            self._safe(self._on_start)
        last_flush, dirty = time.monotonic(), False
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._ready and (
                        self._ready_markers
                        or len(self._ready) >= WRITER_BATCH
                        or now - self._ready_since >= WRITER_DELAY
                    ):
                        break
                    due = self._flush_interval - (now - last_flush)
                    if dirty and due <= 0 and not self._ready:
                        break
                    if self._ready:  # a partial batch: its timer (flushing follows it)
                        timeout = WRITER_DELAY - (now - self._ready_since)
                    else:
                        timeout = due if dirty else None
                    self._ready_cond.wait(timeout=timeout)
                batch = list(self._ready)
                self._ready.clear()
                self._ready_markers = 0
                self._pending -= sum(1 for item in batch if item.marker is None)
            if not batch:  # the periodic flush
                self._safe(self._on_flush)
                last_flush, dirty = time.monotonic(), False
                continue
            for item in batch:
                if item.marker == "flush":
                    self._safe(self._on_flush)
                    last_flush, dirty = time.monotonic(), False
                    if item.done is not None:
                        item.done.set()
                elif item.marker == "stop":
                    self._safe(self._on_stop)
                    if item.done is not None:
                        item.done.set()
                    return
                else:
                    self._safe(self._handle, item)
                    # Free the device arrays here and now: arrays still referenced by the
                    # batch when close() returns would be freed on this thread while the
                    # interpreter exits, which aborts the process.
                    item.payload = None
                    dirty = True
            if dirty and time.monotonic() - last_flush >= self._flush_interval:
                self._safe(self._on_flush)
                last_flush, dirty = time.monotonic(), False

    @staticmethod
    def _safe(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # never let the writer thread die
            logger.exception("penwatch telemetry worker: internal error (record skipped)")


WRITER_BATCH = 32
"""Ready records that wake the writer thread at once (fewer wake-ups per record)."""

WRITER_DELAY = 0.05
"""Seconds a ready record waits at most for the writer (the records' visible latency)."""

WORKER_NICE = 10
"""Niceness added to the worker threads (Linux): telemetry yields the CPU to training."""


def _lower_priority() -> None:
    # On Linux a thread is a task with its own nice value. The worker is latency-tolerant
    # (it only needs to keep up on average), the training step's compute threads are not.
    with contextlib.suppress(AttributeError, OSError):  # not Linux / not permitted
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)


class SinkGuard:
    """Isolates one sink: errors are logged once, counted, and retried with backoff.

    After a failure the sink is left alone until a retry time that doubles with each
    consecutive failure (``initial_backoff`` up to ``max_backoff``); a sink whose
    ``open`` failed is re-opened then (a port freed, a collector back). Steps and events
    arriving meanwhile wait in a bounded retry buffer (``retry_buffer`` items, oldest
    evicted) and are replayed in order at the next successful try, so a short outage
    loses nothing; the failed item itself is retried too. Records evicted from the
    buffer, or still in it when the sink is closed, are counted in :attr:`lost`. The first
    error is logged with its traceback, later ones at most once per ``log_every`` seconds.
    """

    def __init__(
        self,
        sink: Sink,
        name: str,
        *,
        initial_backoff: float = 0.1,
        max_backoff: float = 30.0,
        log_every: float = 60.0,
        retry_buffer: int = 256,
    ) -> None:
        self.sink, self.name = sink, name
        self.errors = 0
        self.lost = 0
        self._initial, self._max, self._log_every = initial_backoff, max_backoff, log_every
        self._buffer: collections.deque[tuple[str, Any]] = collections.deque()
        self._buffer_size = retry_buffer
        self._failures = 0
        self._retry_at = 0.0
        self._opened = False
        self._info: Any = None
        self._last_log = -float("inf")
        self._unlogged = 0

    @property
    def healthy(self) -> bool:
        return self._opened and not self._failures

    @property
    def buffered(self) -> int:
        """Items waiting in the retry buffer."""
        return len(self._buffer)

    def open(self, info: Any) -> None:
        self._info = info
        self._opened = self._try("open", info)

    def _available(self, *, force: bool = False) -> bool:
        if self._failures and not force and time.monotonic() < self._retry_at:
            return False
        if not self._opened:
            self._opened = self._try("open", self._info)
        return self._opened

    def _drain(self) -> bool:
        while self._buffer:
            method, arg = self._buffer[0]
            if not self._try(method, arg):
                return False
            self._buffer.popleft()
        return True

    def _keep(self, method: str, arg: Any) -> None:
        if len(self._buffer) >= self._buffer_size:
            old_method, _ = self._buffer.popleft()
            self.lost += old_method == "write_step"
        if self._buffer_size > 0:
            self._buffer.append((method, arg))
        else:
            self.lost += method == "write_step"

    def write(self, method: str, arg: Any) -> bool:
        """``sink.write_step(arg)``/``write_event(arg)``, buffered while the sink fails.

        Returns whether it was written now."""
        if self._available() and self._drain() and self._try(method, arg):
            return True
        self._keep(method, arg)
        return False

    def call(self, method: str, *args: Any) -> bool:
        """Call ``sink.method(*args)`` (after replaying the buffer) unless backing off."""
        if not (self._available() and self._drain()):
            return False
        return self._try(method, *args)

    def call_value(self, method: str, *args: Any) -> Any:
        """Call a method with a result (None when skipped or failed; not buffered)."""
        if self._buffer or not self._available():
            return None
        box: list[Any] = [None]

        def run() -> None:
            box[0] = getattr(self.sink, method)(*args)

        return box[0] if self._try(run) else None

    def close(self) -> None:
        """Replay what is buffered (one try, ignoring backoff), flush and close once."""
        if self._available(force=True) and self._drain():
            self._try("flush")
        self.lost += sum(m == "write_step" for m, _ in self._buffer)
        self._buffer.clear()
        if self._opened:
            self._opened = False
            self._try("close")

    def _try(self, method: str | Callable[[], None], *args: Any) -> bool:
        try:
            if callable(method):
                method()
            else:
                getattr(self.sink, method)(*args)
        except Exception as exc:
            self._failed(method if isinstance(method, str) else "call", exc)
            return False
        if self._failures:
            logger.warning(
                "penwatch sink %s recovered after %d consecutive failures (%d records lost so far)",
                self.name,
                self._failures,
                self.lost,
            )
            self._failures = 0
        return True

    def _failed(self, method: str, exc: Exception) -> None:
        self.errors += 1
        self._failures += 1
        delay = min(self._initial * 2 ** (self._failures - 1), self._max)
        now = time.monotonic()
        self._retry_at = now + delay
        if self.errors == 1:
            logger.error(
                "penwatch sink %s failed in %s(): %s: %s. Training continues; this sink's "
                "records are buffered (up to %d, then counted as lost) and retried with "
                "exponential backoff (next try in %.1fs). Further errors are logged at most "
                "every %.0fs.",
                self.name,
                method,
                type(exc).__name__,
                exc,
                self._buffer_size,
                delay,
                self._log_every,
                exc_info=exc,
            )
            self._last_log = now
        elif now - self._last_log >= self._log_every:
            logger.error(
                "penwatch sink %s still failing in %s(): %s: %s (%d errors since the last "
                "message, %d in all; next try in %.1fs)",
                self.name,
                method,
                type(exc).__name__,
                exc,
                self._unlogged + 1,
                self.errors,
                delay,
            )
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1
