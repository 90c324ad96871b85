"""``pw.sinks.TensorBoard``: every record as TensorBoard event-file summaries.

A bridge for people who keep their runs in TensorBoard (needs the ``tensorboard``
extra: tensorboardX writes the protocol buffers; view with ``tensorboard --logdir``).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from penwatch import _checks, _extras
from penwatch.schema import Event, RunInfo, RunStatus, StepRecord
from penwatch.sinks._base import Sink, SinkUnavailable
from penwatch.sinks._tracker import event_text, hparam_values

__all__ = ["TensorBoard"]

_FN = "penwatch.sinks.TensorBoard"
_FEATURE = "pw.sinks.TensorBoard"


class TensorBoard(Sink):
    """Writes every step, event and the run configuration to a TensorBoard event file.

    * every metric of a step as a scalar ``<pipeline>/<key>`` at that step (NaN and Inf
      kept: TensorBoard shows them), and the device time as ``penwatch/duration_seconds``;
    * a step with non-finite values also as text ``penwatch/nonfinite`` (the keys, first
      offender first); every event (non-finite report, alert, dropped records) as text
      ``penwatch/<kind>/<name>`` (``step 10 [warning] NonFinite: ...``), at the latest
      step already written when the event's own step is older (TensorBoard's reader
      takes a step going back for a restart and discards what follows);
    * the run configuration and identity as hyperparameters (the HParams tab), and how
      the run ended as text ``penwatch/status``.

    Writes are synchronous, one ``write`` per batch onto an unbuffered file: a batch that
    cannot be written (disk full, directory gone) is cut back off the file and raised as
    :class:`~penwatch.sinks.SinkUnavailable`, so the monitor keeps it in this sink's
    outage buffer and retries without duplicating anything. Each process (and each open)
    writes a file of its own: ``events.out.tfevents.<time>.<host>.<pid>.<process>``.

    Args:
      logdir: the directory (created); point ``tensorboard --logdir`` at it or at its
        parent.
      batch_size: most records per write.
      max_delay: seconds a record waits at most for its batch.
      max_pending: most records kept while the directory cannot be written.

    Example::

        monitor = pw.Monitor("exp1", sinks=[pw.sinks.TensorBoard("tb/exp1")])
    """

    name = "TensorBoard"

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        batch_size: int = 256,
        max_delay: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        if not isinstance(logdir, str | os.PathLike) or not os.fspath(logdir):
            raise _checks.option_error(_FN, "logdir", logdir, "a directory path", label="argument")
        self._tbx = _tbx()
        self.logdir = os.fspath(logdir)
        self.batch_size = _checks.check_int(_FN, "batch_size", batch_size, min=1)
        self.max_delay = _checks.check_nonnegative(_FN, "max_delay", max_delay)
        self.max_pending = _checks.check_int(_FN, "max_pending", max_pending, min=1)
        self.path: str | None = None
        self._file: Any = None
        self._last_step = 0

    # -- the sink hooks ----------------------------------------------------------------

    def open(self, info: RunInfo) -> None:
        """Create the directory and the event file; write the version and hyperparameters."""
        if self._file is not None:
            return
        os.makedirs(self.logdir, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{info.process}"
        )
        path = os.path.join(self.logdir, name)
        file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        header = self._tbx.event(wall_time=time.time(), step=0, file_version="brain.Event:2")
        exp, ssi, _ = self._tbx.summary.hparams(hparam_values(info), {})
        events = [header] + [
            self._tbx.event(wall_time=info.started_at, step=0, summary=s) for s in (exp, ssi)
        ]
        try:
            _write_all(file, b"".join(_frame(e.SerializeToString()) for e in events))
        except OSError:
            file.close()
            os.remove(path)
            raise
        self._file, self.path = file, path

    def write_step(self, record: StepRecord) -> None:
        self.write_steps((record,))

    def write_steps(self, records: Sequence[StepRecord]) -> None:
        self._write([e for r in records for e in self._step_events(r)])
        if records:
            self._last_step = max(self._last_step, *(r.step for r in records))

    def write_event(self, event: Event) -> None:
        tag = f"penwatch/{event.kind}/{event.name}"
        # never at a step below one already written: TensorBoard's reader takes a step
        # going back for a restart and purges everything after it (the text names the step)
        step = max(event.step, self._last_step)
        self._write([self._text(tag, event_text(event), step, event.wall_time)])

    def close(self, *, status: RunStatus = "finished") -> None:
        """Write how the run ended (``penwatch/status``) and close the file."""
        if self._file is None:
            return
        text = self._text("penwatch/status", f"run ended: {status}", self._last_step, time.time())
        try:
            self._write([text])
        finally:
            self._file.close()
            self._file = None

    # -- helpers -----------------------------------------------------------------------

    def _step_events(self, record: StepRecord) -> list[Any]:
        value = self._tbx.Summary.Value
        values = [
            value(tag=f"{record.pipeline}/{key}", simple_value=float(v))
            for key, v in record.values.items()
        ]
        if record.duration_seconds is not None:
            values.append(
                value(tag="penwatch/duration_seconds", simple_value=record.duration_seconds)
            )
        out = [
            self._tbx.event(
                wall_time=record.wall_time,
                step=record.step,
                summary=self._tbx.Summary(value=values),
            )
        ]
        if record.nonfinite:
            keys = ", ".join(f"{n.key} ({n.kind})" for n in record.nonfinite)
            out.append(
                self._text(
                    "penwatch/nonfinite",
                    f"step {record.step}: non-finite {keys}; first offender "
                    f"{record.nonfinite[0].key}",
                    record.step,
                    record.wall_time,
                )
            )
        return out

    def _text(self, tag: str, text: str, step: int, wall_time: float) -> Any:
        summary = self._tbx.summary.text(tag, text)
        summary.value[0].tag = tag  # tensorboardX appends "/text_summary"
        return self._tbx.event(wall_time=wall_time, step=step, summary=summary)

    def _write(self, events: list[Any]) -> None:
        if self._file is None:
            raise SinkUnavailable(f"{_FN}: the event file is not open")
        blob = b"".join(_frame(e.SerializeToString()) for e in events)  # a bad value raises here
        start = self._file.tell()
        try:
            _write_all(self._file, blob)
        except OSError as exc:
            try:  # cut the partial batch off, so the retry does not duplicate it
                self._file.truncate(start)
            except OSError:
                self._file.close()
                self._file = None  # a new file at the next open
            raise SinkUnavailable(f"{_FN}: cannot write {self.path}: {exc}") from exc


class _TensorboardX:
    """The few tensorboardX pieces the sink uses (imported once, with the extra check)."""

    def __init__(self) -> None:
        _extras.require("tensorboardX", extra="tensorboard", feature=_FEATURE)
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event as EventProto
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import masked_crc32c

        self.summary, self.Summary, self.event, self.crc = (
            summary,
            Summary,
            EventProto,
            masked_crc32c,
        )


_TBX: list[_TensorboardX] = []


def _tbx() -> _TensorboardX:
    if not _TBX:
        _TBX.append(_TensorboardX())
    return _TBX[0]


def _frame(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
    crc = _tbx().crc
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", crc(header)) + data + struct.pack("<I", crc(data))


def _write_all(file: Any, blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        written = file.write(view)
        if not written:
            raise OSError("short write")
        view = view[written:]
