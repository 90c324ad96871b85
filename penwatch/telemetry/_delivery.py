"""Per-sink delivery: one thread, one outage buffer, exact accounting (SPEC section 11).

Each sink gets a :class:`SinkWorker` (compare OpenTelemetry's ``BatchProcessor``: a
bounded ``deque`` that drops the oldest and counts, an event to wake its thread, a
bounded shutdown). The monitor's dispatch thread only appends to it, so a slow, hung or
failing sink never delays another sink or the training step.

* **Outage buffer**: while the sink cannot write (it raises :class:`SinkUnavailable` or an
  ``OSError``) its records wait here, at most ``sink.max_pending``; the batch is retried
  after a short backoff (``initial_backoff`` doubling up to ``max_backoff``), at once on
  ``flush``/``close``. Overflow drops the oldest, counted as ``overflow``, and the sink
  receives a ``records_dropped`` event with the step range once it writes again.
* **Poison records**: any other exception means a record the sink can never write; the
  batch is written one record at a time and a record that still fails alone is dropped,
  counted as ``poison`` and logged once; the sink goes on.
* **Accounting**: for every step record handed in, exactly one of ``written`` or
  ``lost[reason]`` grows (``overflow``, ``poison``, ``unfinished``: still buffered or in
  flight when ``close`` gave up waiting). Counts are sealed at close: a hung write that
  returns later changes nothing.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from penwatch.schema import Event, RunInfo, RunStatus, StepRecord
from penwatch.sinks import Sink, SinkUnavailable
from penwatch.telemetry._gaps import Gap
from penwatch.telemetry._intake import lower_priority
from penwatch.telemetry._stats import LOSS_REASONS, SinkStats

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["LOSS_REASONS", "SinkWorker", "is_outage"]


def is_outage(exc: BaseException) -> bool:
    """Whether an exception means "cannot write now" (retry) rather than a bad record."""
    return isinstance(exc, SinkUnavailable | OSError)


class SinkWorker:
    """Delivers records to one sink from a thread of its own.

    Args:
      sink: the sink.
      name: its unique name in counters and logs.
      info: the run, for ``sink.open``.
      initial_backoff, max_backoff: seconds between retries after an outage (doubling).
      log_every: seconds between repeated error logs of this sink.
    """

    def __init__(
        self,
        sink: Sink,
        name: str,
        info: RunInfo,
        *,
        initial_backoff: float = 0.05,
        max_backoff: float = 1.0,
        log_every: float = 60.0,
    ) -> None:
        self.sink, self.name, self.info = sink, name, info
        self.max_pending = int(sink.max_pending)
        self.batch_size = max(1, int(sink.batch_size))
        self.max_delay = float(sink.max_delay)
        self.flush_interval = float(sink.flush_interval)
        # A sink with its own write_steps writes a batch whole or not at all; others get
        # one record per call, so a failure in the middle never rewrites the first ones.
        self._batched = type(sink).write_steps is not Sink.write_steps
        self._initial, self._max_backoff, self._log_every = initial_backoff, max_backoff, log_every
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[StepRecord | Event] = collections.deque()
        self._queued_since = 0.0  # when the oldest queued item arrived
        self._flush_requests: list[threading.Event] = []
        self._closing: tuple[RunStatus, threading.Event] | None = None
        self._sealed = False
        self._force = False
        self._gap = Gap()
        self.received = self.written = self.errors = 0
        self.events_written = self.events_lost = 0
        self.lost = dict.fromkeys(LOSS_REASONS, 0)
        self.loss_version = 0  # grows with every loss (the dispatcher's cache key)
        self._opened = False
        self._failures = 0
        self._retry_at = 0.0
        self._logged: set[str] = set()
        self._last_log = -float("inf")
        self.started = threading.Event()
        """Set once the first ``open`` returned (or failed)."""
        self._thread = threading.Thread(target=self._run, name=f"penwatch-sink-{name}", daemon=True)
        self._thread.start()

    # -- the dispatch thread -----------------------------------------------------------

    def put(self, item: StepRecord | Event) -> None:
        """Queue a record or event; drops the oldest (counted) when the buffer is full."""
        self.put_many([item])

    def put_many(self, items: list[StepRecord | Event]) -> None:
        """Queue records and events in order, under one lock; past ``max_pending`` the
        oldest are dropped, counted as ``overflow`` and remembered for the gap event."""
        with self._lock:
            before = len(self._queue)
            for item in items:
                if isinstance(item, StepRecord):
                    self.received += 1
                if self._sealed:
                    self._lose(item, "unfinished")
                    continue
                if not self._queue:
                    self._queued_since = time.monotonic()
                self._queue.append(item)
            while len(self._queue) > self.max_pending:
                old = self._queue.popleft()
                self._lose(old, "overflow")
                self._gap.add(old.step, event=isinstance(old, Event))
            after = len(self._queue)
            if before == 0 < after or before < self.batch_size <= after:
                self._wake.notify()

    def begin_flush(self) -> threading.Event:
        """Ask the thread to write everything queued so far (or count it lost) and flush
        the sink; the event is set when it has (at once when closing or sealed)."""
        done = threading.Event()
        with self._lock:
            if self._closing is not None or self._sealed:
                done.set()
                return done
            self._flush_requests.append(done)
            self._force = True
            self._wake.notify()
        return done

    def begin_close(self, status: RunStatus) -> threading.Event:
        """Ask the thread to write what is left, then close the sink."""
        done = threading.Event()
        with self._lock:
            if self._closing is None:
                self._closing = (status, done)
                self._force = True
                self._wake.notify()
            else:
                done = self._closing[1]
        return done

    def seal(self) -> None:
        """Stop counting: whatever is still queued or in flight is lost as ``unfinished``."""
        with self._lock:
            if self._sealed:
                return
            self._sealed = True
            while self._queue:  # in-flight records are still at its head
                self._lose(self._queue.popleft(), "unfinished")
            for done in self._flush_requests:
                done.set()
            self._flush_requests = []
            self._wake.notify()

    def stats(self) -> SinkStats:
        with self._lock:
            pending = sum(isinstance(i, StepRecord) for i in self._queue)
            return SinkStats(
                name=self.name,
                received=self.received,
                written=self.written,
                lost=dict(self.lost),
                pending=pending,
                errors=self.errors,
                events_written=self.events_written,
                events_lost=self.events_lost,
                healthy=self._opened and not self._failures,
            )

    def _lose(self, item: StepRecord | Event, reason: str) -> None:
        # Caller holds the lock.
        self.loss_version += 1
        if isinstance(item, StepRecord):
            self.lost[reason] += 1
        else:
            self.events_lost += 1

    # -- the sink's own thread ---------------------------------------------------------

    def _run(self) -> None:
        lower_priority()  # telemetry yields the CPU to the training step's threads
        try:
            self._ensure_open()
        finally:
            self.started.set()
        last_flush = time.monotonic()
        while True:
            with self._lock:
                while True:
                    if self._sealed:
                        break
                    now = time.monotonic()
                    urgent = self._closing is not None or bool(self._flush_requests)
                    backing_off = self._failures and now < self._retry_at and not self._force
                    if (
                        self._queue
                        and not backing_off
                        and (
                            urgent
                            or len(self._queue) >= self.batch_size
                            or now - self._queued_since >= self.max_delay
                        )
                    ):
                        break
                    if not self._queue and (urgent or now - last_flush >= self.flush_interval):
                        break
                    waits = [last_flush + self.flush_interval - now]
                    if self._queue:
                        waits.append(
                            self._retry_at - now
                            if backing_off
                            else self._queued_since + self.max_delay - now
                        )
                    self._wake.wait(max(min(waits), 0.001))
                if self._sealed:  # close gave up waiting: close the sink if we can, stop
                    closing = self._closing
                    break
                batch = [self._queue[i] for i in range(min(self.batch_size, len(self._queue)))]
                requests, self._flush_requests = self._flush_requests, []
                closing = self._closing
                self._force = False  # a flush or close retries at once, then backs off
            if batch:
                self._deliver(batch)
            else:
                self._call("flush")
                last_flush = time.monotonic()
                for done in requests:
                    done.set()
                if closing is not None:
                    self._finish(closing)
                    return
                continue
            with self._lock:
                for done in requests:  # not yet empty: ask again with the next round
                    self._flush_requests.append(done)
                if self._queue:
                    self._queued_since = min(self._queued_since, time.monotonic())
        if closing is not None:
            self._finish(closing)

    def _deliver(self, batch: list[StepRecord | Event]) -> None:
        if not self._ensure_open():
            return
        with self._lock:
            gap, self._gap = self._gap, Gap()
        if gap:
            event = gap.event(
                self.info,
                at=gap.last_step or 0,
                sink=self.name,
                reason="overflow",
                why=f"its outage buffer (max_pending={self.max_pending}) overflowed",
            )
            if not self._call("write_event", event):
                with self._lock:
                    self._gap.merge(gap)
                return
        # Runs of steps go as one write_steps call (one transaction for the store),
        # events one by one, in order; each chunk leaves the queue once written, so a
        # retry after a failure never writes it twice.
        chunks: list[list[StepRecord | Event]] = []
        for item in batch:
            if (
                self._batched
                and chunks
                and isinstance(item, StepRecord)
                and isinstance(chunks[-1][0], StepRecord)
            ):
                chunks[-1].append(item)
            else:
                chunks.append([item])
        for index, chunk in enumerate(chunks):
            try:
                if isinstance(chunk[0], StepRecord):
                    self.sink.write_steps(chunk)  # type: ignore[arg-type]
                else:
                    self.sink.write_event(chunk[0])  # type: ignore[arg-type]
            except Exception as exc:
                if is_outage(exc):  # the rest stays at the queue head for the next try
                    self._failed("write", exc)
                    return
                self._failed("write", exc, outage=False)
                self._one_by_one([i for c in chunks[index:] for i in c])
                return
            self._done(chunk, written=chunk)
        self._succeeded()

    def _one_by_one(self, batch: list[StepRecord | Event]) -> None:
        written: list[StepRecord | Event] = []
        poison: list[StepRecord | Event] = []
        for index, item in enumerate(batch):
            try:
                if isinstance(item, StepRecord):
                    self.sink.write_steps([item])
                else:
                    self.sink.write_event(item)
            except Exception as exc:
                if is_outage(exc):  # the rest stays at the queue head for the next try
                    self._failed("write", exc)
                    self._done(batch[:index], written=written, poison=poison)
                    return
                self.errors += 1
                self._log_once(
                    "poison",
                    "penwatch sink %s could not write %s at step %d (%s: %s); dropped and "
                    "counted as poison, the sink goes on (logged once)",
                    self.name,
                    "a step record" if isinstance(item, StepRecord) else f"event {item.name!r}",
                    item.step,
                    type(exc).__name__,
                    exc,
                )
                poison.append(item)
                continue
            written.append(item)
        self._succeeded()
        self._done(batch, written=written, poison=poison)

    def _done(
        self,
        batch: list[StepRecord | Event],
        *,
        written: list[StepRecord | Event],
        poison: list[StepRecord | Event] = (),  # type: ignore[assignment]
    ) -> None:
        """Pop ``batch`` from the queue head and count it (unless sealed meanwhile)."""
        with self._lock:
            if self._sealed:
                return
            for _ in batch:
                self._queue.popleft()
            for item in written:
                if isinstance(item, StepRecord):
                    self.written += 1
                else:
                    self.events_written += 1
            for item in poison:
                self._lose(item, "poison")

    def _ensure_open(self) -> bool:
        if self._opened:
            return True
        try:
            self.sink.open(self.info)
        except Exception as exc:
            self._failed("open", exc)
            return False
        self._opened = True
        return True

    def _call(self, method: str, *args: Any) -> bool:
        if not self._ensure_open():
            return False
        try:
            getattr(self.sink, method)(*args)
        except Exception as exc:
            self._failed(method, exc)
            return False
        if method != "flush":
            self._succeeded()
        return True

    def _finish(self, closing: tuple[RunStatus, threading.Event]) -> None:
        status, done = closing
        try:
            if self._opened:
                try:
                    self.sink.close(status=status)
                except Exception as exc:
                    self._failed("close", exc)
        finally:
            self.seal()
            done.set()

    def _succeeded(self) -> None:
        if self._failures:
            with self._lock:
                pending = len(self._queue)
                lost = sum(self.lost.values())
            logger.warning(
                "penwatch sink %s recovered after %d consecutive failures (%d records still "
                "buffered, %d lost in all)",
                self.name,
                self._failures,
                pending,
                lost,
            )
            self._failures = 0

    def _failed(self, method: str, exc: BaseException, *, outage: bool = True) -> None:
        self.errors += 1
        if not outage:
            return
        self._failures += 1
        delay = min(self._initial * 2 ** (self._failures - 1), self._max_backoff)
        now = time.monotonic()
        self._retry_at = now + delay
        with self._lock:
            buffered = len(self._queue)
        if self._failures == 1 or now - self._last_log >= self._log_every:
            logger.error(
                "penwatch sink %s cannot write (%s(): %s: %s); training continues, %d records "
                "buffered (up to max_pending=%d, then the oldest are dropped and counted), "
                "retrying every %.2gs at most",
                self.name,
                method,
                type(exc).__name__,
                exc,
                buffered,
                self.max_pending,
                self._max_backoff,
                exc_info=exc if self.errors == 1 else None,
            )
            self._last_log = now

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        logger.error(message, *args)
