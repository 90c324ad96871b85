"""``NonFinite``: a metric or a parameter/gradient leaf became NaN or Inf."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from penwatch import _checks
from penwatch.alerts._base import Alert, Episodes
from penwatch.penalties import NonFiniteError, Validation
from penwatch.schema import Event, StepRecord, describe

__all__ = ["NonFinite", "NonFiniteDetected"]

logger = logging.getLogger("penwatch.alerts")
_FN = "penwatch.alerts.NonFinite"


class NonFiniteDetected(NonFiniteError):
    """Raised on the training thread by ``Monitor.record``/``close`` after a
    ``NonFinite(action="raise")`` alert fired. A :class:`penwatch.NonFiniteError`.

    Attributes:
      record: the :class:`StepRecord` that fired (``record.nonfinite``, ``record.leaves``).
      kind, nan_count, inf_count, path: as in :class:`penwatch.NonFiniteError`: the first
        offender's kind, how many metrics were NaN / Inf, and the first non-finite leaf
        path (or the first non-finite metric key when no leaf report was given).
    """

    def __init__(self, record: StepRecord) -> None:
        first = record.first_offender
        nan = sum(nf.kind == "nan" for nf in record.nonfinite)
        inf = sum(nf.kind == "inf" for nf in record.nonfinite)
        if first is not None:
            kind = first.kind
        else:
            kind = "nan" if any(leaf.nan_count for leaf in record.leaves) else "inf"
        path = record.leaves[0].tree + record.leaves[0].path if record.leaves else None
        if path is None and first is not None:
            path = first.key
        super().__init__(Validation(False, kind, nan, inf, path))
        self.record = record
        self.args = (f"penwatch.Monitor: non-finite values at {describe(record)}",)

    def __str__(self) -> str:
        return self.args[0]


class NonFinite(Alert):
    """Fires when a record holds a NaN/Inf metric or non-finite leaves.

    Once per episode and pipeline label: it fires on the first non-finite record and
    re-arms after a fully finite one. The event (kind ``"nonfinite"``, severity
    ``"critical"``) names the first offending metric and the top non-finite leaves.

    Args:
      action: ``"warn"`` logs a warning (logger ``penwatch.alerts``); ``"raise"`` also
        raises :class:`NonFiniteDetected` on the training thread at the *next*
        ``Monitor.record``/``flush``/``close`` call (the worker thread never raises into
        training; a step may have run in between); ``"callback"`` calls
        ``callback(event, record)`` on the worker thread (exceptions are logged).
      callback: the function for ``action="callback"``.
    """

    name = "NonFinite"

    def __init__(
        self, action: str = "warn", *, callback: Callable[[Event, StepRecord], Any] | None = None
    ) -> None:
        self.action = _checks.check_choice(_FN, "action", action, ("warn", "raise", "callback"))
        if action == "callback":
            _checks.check_callable(_FN, "callback", callback, label="option")
        elif callback is not None:
            raise _checks.option_error(_FN, "callback", callback, "None unless action='callback'")
        self.callback = callback
        self._episodes = Episodes(patience=1)
        self._error: NonFiniteDetected | None = None

    def take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        bad = bool(record.nonfinite or record.leaves)
        if not self._episodes.update(record.pipeline, bad):
            return ()
        message = describe(record)
        first = record.first_offender
        attributes: dict[str, Any] = {
            "action": self.action,
            "metric": first.key if first else None,
            "kind": first.kind if first else None,
            "source": first.source if first else "leaf",
            "penalty": first.penalty if first else None,
            "metrics": [nf.key for nf in record.nonfinite],
            "leaves": [
                {"tree": lf.tree, "path": lf.path, "nan": lf.nan_count, "inf": lf.inf_count}
                for lf in record.leaves
            ],
        }
        if self.action == "raise" and self._error is None:
            self._error = NonFiniteDetected(record)  # an earlier unraised one stays first
        event = self._event(
            record, message, kind="nonfinite", severity="critical", attributes=attributes
        )
        logger.warning("non-finite values at %s", message)
        if self.action == "callback":
            try:
                self.callback(event, record)  # type: ignore[misc]
            except Exception:
                logger.exception("penwatch NonFinite callback raised; ignored")
        return (event,)

    def __repr__(self) -> str:
        return f"NonFinite(action={self.action!r})"
