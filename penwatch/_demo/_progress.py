"""The demo's terminal output: one progress line instead of a log line per step.

On a terminal the line is rewritten in place (at most ``refresh`` times a second) and log
records (warnings, alerts) are printed above it; elsewhere (a pipe, a log file) a plain
line is printed every ``every_seconds`` seconds. The line is fed by a
:class:`penwatch.sinks.Callback`, so it shows what the monitor recorded (never blocking
the training thread to read a value).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import TextIO

import penwatch as pw
from penwatch.schema import Event, StepRecord

__all__ = ["Progress"]


class Progress:
    """A single, self-updating status line of a run.

    Args:
      total: the step count when bounded, else None (runs until Ctrl-C).
      stream: where the line goes (default ``sys.stdout``).
      refresh: most redraws per second on a terminal.
      every_seconds: seconds between plain lines when ``stream`` is not a terminal.
    """

    def __init__(
        self,
        total: int | None,
        *,
        stream: TextIO | None = None,
        refresh: float = 4.0,
        every_seconds: float = 30.0,
    ) -> None:
        self.total = total
        self.stream = sys.stdout if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._min_gap = 1.0 / refresh if self.tty else every_seconds
        self._lock = threading.Lock()
        self._first: float | None = None  # when the first record arrived (after compiling)
        self._last_draw = -math.inf
        self._shown = ""
        self.steps = 0
        self.last: StepRecord | None = None
        self.nonfinite_steps = 0
        self.alerts = 0

    def sink(self) -> pw.sinks.Callback:
        """The sink that feeds the line (add it to the monitor's sinks)."""
        sink = pw.sinks.Callback(self._on_record, on_event=self._on_event)
        sink.name = "progress"
        sink.max_delay = 0.1
        return sink

    def line(self) -> str:
        """The current status text."""
        rec = self.last
        if rec is None:
            return "penwatch demo: compiling the train step..."
        elapsed = time.monotonic() - (self._first or 0.0)
        rate = (self.steps - 1) / elapsed if self.steps > 1 and elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        parts = [f"step {rec.step + 1}{of}", f"{rate:.1f} steps/s"]
        if rec.loss is not None:
            parts.append(f"loss {rec.loss:.4g}")
        if rec.total is not None:
            parts.append(f"penalties {rec.total:.4g}")
        parts.append(f"non-finite steps {self.nonfinite_steps}")
        parts.append(f"alerts {self.alerts}")
        tail = "" if self.total else "  (Ctrl-C to stop)"
        return "penwatch demo: " + " | ".join(parts) + tail

    def draw(self, *, force: bool = False) -> None:
        """Redraw the line (rate-limited unless ``force``)."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_draw < self._min_gap:
                return
            self._last_draw = now
            text = self.line()
            if self.tty:
                self.stream.write("\r\x1b[K" + text)
                self._shown = text
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        """Erase the line on a terminal (before other output)."""
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = ""

    def finish(self) -> None:
        """Draw the last state and end the line."""
        self.draw(force=True)
        if self.tty:
            with self._lock:
                self.stream.write("\n")
                self.stream.flush()
                self._shown = ""

    def log_handler(self, *, level: int = logging.WARNING) -> logging.Handler:
        """A stderr log handler that clears the line before a record and redraws it after."""
        return _AboveTheLine(self, level=level)

    def _on_record(self, record: StepRecord) -> None:
        if self._first is None:
            self._first = time.monotonic()
        self.steps += 1
        self.last = record
        if not record.ok:
            self.nonfinite_steps += 1
        self.draw()

    def _on_event(self, event: Event) -> None:
        if event.kind == "alert":
            self.alerts += 1


class _AboveTheLine(logging.StreamHandler):
    def __init__(self, progress: Progress, *, level: int) -> None:
        super().__init__(sys.stderr)
        self.progress = progress
        self.setLevel(level)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.clear()
        super().emit(record)
        if self.progress.tty:
            self.progress.draw(force=True)
