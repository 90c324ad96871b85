"""``Logging``: one log line per step (or every N-th step) and one per event."""

from __future__ import annotations

import logging

from penwatch import _checks
from penwatch.schema import Event, PenaltyValues, StepRecord
from penwatch.sinks._base import Sink

__all__ = ["Logging"]

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}


class Logging(Sink):
    """Writes records and events to a :mod:`logging` logger.

    A step line reads ``run=r step=10 pipeline=default loss=0.52 total=0.031 |
    l1=0.0012 l2=0.03 ... | 3.1ms``: the penalties' *weighted* values, then the device
    duration. Records with non-finite values are always logged (at WARNING); events are
    logged at INFO, WARNING or ERROR by severity.

    Args:
      logger: a logger or its name (default ``"penwatch"``).
      level: level of the step lines.
      every: log the steps that are multiples of ``every`` (as the OpenTelemetry sink
        traces them: the same steps in every process and pipeline, after a resume too).
    """

    name = "Logging"

    def __init__(
        self,
        logger: logging.Logger | str | None = None,
        *,
        level: int = logging.INFO,
        every: int = 1,
    ) -> None:
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or "penwatch")
        self.logger = logger
        self.level = _checks.check_int("penwatch.sinks.Logging", "level", level, min=0)
        self.every = _checks.check_int("penwatch.sinks.Logging", "every", every, min=1)

    def write_step(self, record: StepRecord) -> None:
        bad = record.has_nonfinite
        if record.step % self.every and not bad:
            return
        level = max(self.level, logging.WARNING) if bad else self.level
        if not self.logger.isEnabledFor(level):
            return
        head = f"run={record.run} step={record.step} pipeline={record.pipeline}"
        if record.loss is not None:
            head += f" loss={record.loss:.4g}"
        if record.total is not None:
            head += f" total={record.total:.4g}"
        pens = " ".join(f"{p.name}={_shown(p):.4g}" for p in record.penalty_values)
        tail = (
            "" if record.duration_seconds is None else f" | {record.duration_seconds * 1e3:.2f}ms"
        )
        offenders = [nf.key for nf in record.nonfinite]
        offenders += [f"{leaf.tree}{leaf.path}" for leaf in record.leaves]
        report = f" | non-finite: {', '.join(offenders)}" if bad else ""
        self.logger.log(level, "%s | %s%s%s", head, pens, tail, report)

    def write_event(self, event: Event) -> None:
        self.logger.log(
            _LEVELS.get(event.severity, logging.WARNING),
            "penwatch %s %s (run=%s step=%d): %s",
            event.kind,
            event.name,
            event.run,
            event.step,
            event.message,
        )


def _shown(p: PenaltyValues) -> float:
    """A penalty's weighted value, else its raw value, else NaN."""
    if p.weighted is not None:
        return p.weighted
    return p.value if p.value is not None else float("nan")
