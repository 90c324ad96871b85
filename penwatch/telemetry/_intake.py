"""The monitor's intake: a bounded queue, device time, and one dispatch thread.

``record`` on the training thread only appends device arrays to a bounded queue. Two
daemon threads then keep the records in order (compare ``clu``'s ``AsyncWriter`` and
OpenTelemetry's ``BatchProcessor``):

* the *ready* thread waits for each record's arrays with ``jax.block_until_ready``,
  stamps when they became ready and computes the step's **device time** (SPEC section
  6): a step dispatched at ``d_i`` whose results are ready at ``r_i`` started on the
  device no earlier than ``max(d_i, r_{i-1})``, so its duration is
  ``r_i - max(d_i, r_{i-1})``, not the time it spent queued behind earlier steps;
* the *dispatch* thread hands each ready record to ``handle`` (parse, alerts, fan-out to
  the sinks' own delivery workers).

The queue holds at most ``max_queue`` records across both stages; when full, the oldest
record is dropped (and counted), so memory stays bounded and ``record`` never blocks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from penwatch.schema import Metrics, TreeLeafCounts

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["WORKER_NICE", "Intake", "Item", "lower_priority"]


@dataclasses.dataclass(eq=False)
class Item:
    """One queued record (or a flush/stop marker) travelling through the intake."""

    payload: Any = None
    step: int | None = None  # known on the host (None for a device scalar)
    pipeline: str = "default"
    kind: str | None = None
    wall_time: float = 0.0
    dispatched_at_ns: int = 0
    ready_at_ns: int | None = None
    device_ns: int | None = None
    error: BaseException | None = None
    marker: str | None = None  # None (a record), "flush" or "stop"
    done: threading.Event | None = None


class Intake:
    """Bounded drop-oldest queue served in order by a ready thread and a dispatch thread.

    Args:
      handle: called on the dispatch thread with each batch of ready records (a list of
        :class:`Item`, in order).
      max_queue: records held at most (both stages together).
      name: thread name prefix.
    """

    def __init__(
        self, *, handle: Callable[[list[Item]], None], max_queue: int, name: str = "penwatch"
    ) -> None:
        self._handle = handle
        self._max_queue = max_queue
        self._cond = threading.Condition()  # guards both deques; wakes the ready thread
        self._ready_cond = threading.Condition(self._cond._lock)  # wakes the dispatcher
        self._ready_markers = 0  # flush/stop markers in the ready deque
        self._ready_since = 0.0  # when the oldest ready item arrived
        self._incoming: collections.deque[Item] = collections.deque()
        self._ready: collections.deque[Item] = collections.deque()
        self._pending = 0  # records (not markers) in both deques
        self._stopping = False
        self._sealed = False
        self._last_ready_ns = 0
        self._polling = False  # the ready thread polls (True) or waits to be woken
        self.dropped = 0
        """Records dropped because the queue was full (the oldest went)."""
        self.dropped_steps: list[int] = []
        """Steps of the dropped records not yet reported (the dispatcher takes them)."""
        self.abandoned = 0
        """Records still queued when :meth:`seal` gave up on them (close timed out)."""
        self.released = 0
        """Device buffers of dispatched records deleted without giving up the GIL."""
        self.fanout_lock = threading.Lock()
        """Held by the dispatcher while it fans one record out, so :meth:`seal` sees a
        record either delivered to every sink or to none."""
        self._ready_thread = threading.Thread(
            target=self._ready_loop, name=f"{name}-ready", daemon=True
        )
        self._dispatch_thread = threading.Thread(
            target=self._dispatch_loop, name=f"{name}-dispatch", daemon=True
        )
        self._ready_thread.start()
        self._dispatch_thread.start()

    @property
    def pending(self) -> int:
        """Records queued and not yet dispatched."""
        return self._pending

    @property
    def sealed(self) -> bool:
        return self._sealed

    def on_dispatch_thread(self) -> bool:
        return threading.current_thread() is self._dispatch_thread

    def put(self, item: Item) -> bool:
        """Queue a record; returns False when it was refused (stopping)."""
        with self._cond:
            if self._stopping:
                return False
            if self._pending >= self._max_queue:
                self._drop_oldest()
            self._incoming.append(item)
            self._pending += 1
            if not self._polling or len(self._incoming) == READY_BATCH:
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
                    if it.step is not None:
                        self.dropped_steps.append(it.step)
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
            self._dispatch_thread.join(timeout)
            return not self._dispatch_thread.is_alive()
        return done.wait(timeout)

    def drained(self, timeout: float | None = None) -> bool:
        """Wait until every record queued before this call was dispatched."""
        if self.on_dispatch_thread():
            return False  # a sink or alert callback waiting here would deadlock
        return self._marker("flush", timeout)

    def stop(self, timeout: float | None = None) -> bool:
        """Dispatch what is queued, then end the threads. Returns False on timeout."""
        if self.on_dispatch_thread():
            with self._cond:
                self._stopping = True
            return False
        return self._marker("stop", timeout)

    def seal(self) -> int:
        """Give up on what is still queued: count it as abandoned; returns the count."""
        acquired = self.fanout_lock.acquire(timeout=1.0)
        try:
            with self._cond:
                if self._sealed:
                    return 0
                self._sealed = True
                self._stopping = True
                left = self._pending
                self._incoming = collections.deque(i for i in self._incoming if i.marker)
                self._ready = collections.deque(i for i in self._ready if i.marker)
                self._pending = 0
                self.abandoned += left
                self._cond.notify_all()
                self._ready_cond.notify_all()
            return left
        finally:
            if acquired:
                self.fanout_lock.release()

    def request_stop(self) -> None:
        """Like :meth:`stop` without waiting (for garbage collection)."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._incoming.append(Item(marker="stop", done=threading.Event()))
            self._cond.notify_all()

    def _ready_loop(self) -> None:
        lower_priority()
        item: Item | None = None
        while True:
            with self._cond:
                if item is not None and self._queue_ready(item):  # waited for unlocked
                    return
                # Records already computed are stamped and moved under one lock hold
                # (no hand-off per record); the first one still computing is taken out
                # (held here, not droppable) and waited for without the lock.
                item = None
                while item is None:
                    self._await_incoming()
                    head = self._incoming[0]
                    if head.marker is None and not _computed(head.payload):
                        item = self._incoming.popleft()
                        self._pending -= 1
                        break
                    self._incoming.popleft()
                    if head.marker is None:
                        self._stamp(head, time.time_ns())
                        self._pending -= 1
                    if self._queue_ready(head):
                        return
            try:
                _wait(item.payload)
            except Exception as exc:  # deleted/donated buffers, a failed computation
                item.error = exc
            self._stamp(item, time.time_ns())

    def _await_incoming(self) -> None:
        """Wait (lock held) until a record or marker is queued.

        A busy ready thread polls every :data:`READY_POLL` seconds and the training thread
        wakes it only at :data:`READY_BATCH` queued records, so a fast loop costs one
        hand-off per batch, not one per record; an idle one is woken by the next record.
        """
        if not self._incoming and self._polling:
            self._cond.wait(READY_POLL)
        while not self._incoming:
            self._polling = False
            self._cond.wait()
        self._polling = True

    def _stamp(self, item: Item, ready: int) -> None:
        """Device time (SPEC §6): ``r_i - max(d_i, r_{i-1})``."""
        start = max(item.dispatched_at_ns, self._last_ready_ns)
        item.ready_at_ns, item.device_ns = ready, max(ready - start, 0)
        self._last_ready_ns = ready

    def _queue_ready(self, item: Item) -> bool:
        """Hand a stamped record or a marker to the dispatcher (caller holds the lock);
        True after the stop marker."""
        if item.marker is None and self._sealed:
            self.abandoned += 1  # close gave up on it while it was held here
            return False
        if item.marker is None:
            self._pending += 1
        else:
            self._ready_markers += 1
        if not self._ready:
            self._ready_since = time.monotonic()
        self._ready.append(item)
        # The dispatcher takes records in batches (fewer wake-ups competing with the
        # training thread for the GIL): the first record starts the batch's timer,
        # markers and full batches wake it at once.
        if item.marker is not None or len(self._ready) in (1, DISPATCH_BATCH):
            self._ready_cond.notify()
        return item.marker == "stop"

    def _dispatch_loop(self) -> None:
        lower_priority()
        while True:
            with self._cond:
                while True:
                    if self._ready and (
                        self._ready_markers
                        or len(self._ready) >= DISPATCH_BATCH
                        or time.monotonic() - self._ready_since >= DISPATCH_DELAY
                    ):
                        break
                    timeout = None
                    if self._ready:
                        timeout = DISPATCH_DELAY - (time.monotonic() - self._ready_since)
                    self._ready_cond.wait(timeout)
                batch = list(self._ready)
                self._ready.clear()
                self._ready_markers = 0
            records: list[Item] = []
            for item in batch:
                if item.marker is None:
                    records.append(item)
                    continue
                self._dispatch(records)  # everything before the marker first
                records = []
                if item.done is not None:
                    item.done.set()
                if item.marker == "stop":
                    return
            self._dispatch(records)

    def _dispatch(self, records: list[Item]) -> None:
        if not records:
            return
        with self._cond:
            if self._sealed:
                return  # counted as abandoned by seal()
            self._pending -= len(records)
        try:
            self._handle(records)
        except Exception:  # never let the dispatch thread die
            logger.exception("penwatch telemetry: internal error dispatching records")
        # Free the device arrays here and now: arrays still referenced when close()
        # returns would be freed while the interpreter exits, which aborts it. Buffers
        # nobody else holds are deleted first (see _release); freeing on the training
        # thread instead, in record(), took record()'s p99 from ~70 us to ~450-600 us.
        for item in records:
            payload, item.payload = item.payload, None
            self.released += _release(payload)


def _representative(payload: Any) -> jax.Array | None:
    """The one array whose readiness stands for a record's: the last packed buffer of a
    ``Metrics`` recorded without a separate loss (all its buffers come from one
    computation: the jitted step that returned it, or the one ``Metrics.pack`` runs);
    None for any other payload, whose every leaf is waited for.

    On a busy device every jaxlib call after a wake-up is expensive (cold caches): each
    further array's ``is_ready`` cost the ready thread ≈ 25 µs per step next to a
    ~10 ms jitted step, and waiting for the whole tree twice the CPU of waiting for one
    array. The dispatcher's host copy checks every buffer's readiness before reading it
    (and waits for one that is not ready), so values never depend on this choice."""
    metrics, loss, step = payload
    if type(metrics) is not Metrics or loss is not None or type(step) is not int:
        return None
    buffers = metrics.buffers
    if not buffers:
        return None
    last = buffers[-1]
    if not isinstance(last, jax.Array) or isinstance(last, jax.core.Tracer):
        return None
    return last


def _computed(payload: Any) -> bool:
    """True when a record's results are ready (``is_ready`` neither blocks nor releases
    the GIL); False when still computing, deleted, or a foreign array-like that can only
    be waited for (``block_until_ready``)."""
    last = _representative(payload)
    leaves = (last,) if last is not None else jax.tree_util.tree_leaves(payload)
    try:
        for leaf in leaves:
            if isinstance(leaf, jax.Array):
                if leaf.is_deleted() or not leaf.is_ready():  # is_ready of a deleted
                    return False  # array crashes jaxlib 0.10; block_until_ready raises
            elif hasattr(leaf, "block_until_ready"):
                return False
    except Exception:  # a deleted or donated buffer: block_until_ready reports it
        return False
    return True


def _wait(payload: Any) -> None:
    """Wait until a record's results are ready (raises for a deleted or failed array)."""
    last = _representative(payload)
    if last is not None:
        last.block_until_ready()
    else:
        jax.block_until_ready(payload)


def _release(payload: Any) -> int:
    """Delete the device arrays of a dispatched record that only the monitor holds: the
    packed buffers and a train step's leaf counts; returns how many.

    Dropping the last reference to a ``jax.Array`` releases the GIL inside jaxlib: on
    the dispatch thread, a hand-off to the training thread per buffer and a wait to get
    the GIL back (at 10,000 records/s, two per record made the dispatcher and the
    training loop take turns). ``Array.delete()`` frees the device memory without
    releasing the GIL, and the deleted array's own deallocation then costs nothing.
    Reference counts decide: a ``Metrics`` the user still holds, its ``buffers`` tuple,
    its leaf counts or an array kept anywhere are left alone (freed as usual, when the
    last reference goes).
    """
    if type(payload) is not tuple or type(payload[0]) is not Metrics:
        return 0
    metrics = payload[0]
    if sys.getrefcount(metrics) != 3:  # the payload, this name, getrefcount's argument
        return 0
    released = 0
    buffers = metrics.buffers
    if sys.getrefcount(buffers) == 3:  # the Metrics' slot, this name, the argument
        for buf in buffers:
            released += _delete_alone(buf)
    unpacked = metrics.unpacked
    if unpacked and sys.getrefcount(unpacked) == 3:
        for value in unpacked:
            if type(value) is TreeLeafCounts and sys.getrefcount(value) == 3:
                counts = value.counts
                released += _delete_alone(counts)
    return released


def _delete_alone(array: Any) -> int:
    """Delete a concrete ``jax.Array`` that nothing but its one container and the
    caller's name hold; returns 1 when deleted, else 0."""
    if (
        isinstance(array, jax.Array)
        and not isinstance(array, jax.core.Tracer)
        # the container, the caller's name, this parameter, getrefcount's argument
        and sys.getrefcount(array) == 4
        and not array.is_deleted()
    ):
        array.delete()
        return 1
    return 0


READY_POLL = 0.001
"""Seconds between the busy ready thread's looks at the queue (the most a computed
record waits to be stamped; a record still computing is waited for, not polled)."""

READY_BATCH = 32
"""Queued records that wake a polling ready thread at once."""

DISPATCH_BATCH = 64
"""Ready records that wake the dispatcher at once."""

DISPATCH_DELAY = 0.2
"""Seconds a ready record waits at most for the dispatcher (a batch's timer), as long
as a sink's own batch (``Sink.max_delay``). Each wake-up next to a busy step runs from
cold caches: at a ~10 ms step batches of ~20 records instead of ~5 (0.05 s) took the
monitor's overhead from 1.027-1.033x to 1.013-1.020x (docs/benchmarks.md)."""

WORKER_NICE = 10
"""Niceness added to the telemetry threads (Linux): telemetry yields the CPU to training."""


def lower_priority() -> None:
    # On Linux a thread is a task with its own nice value. The worker is latency-tolerant
    # (it only needs to keep up on average), the training step's compute threads are not.
    with contextlib.suppress(AttributeError, OSError):  # not Linux / not permitted
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
