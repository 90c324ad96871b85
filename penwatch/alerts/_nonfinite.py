"""``NonFinite``: a metric or a parameter/gradient leaf became NaN or Inf."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from penwatch import _checks
from penwatch.alerts._base import Alert, Episodes
from penwatch.forensics import CapsuleWriter, capsule_dir_name, replay_command
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
    ``"critical"``) names the first offending metric and the non-finite leaves nearest
    the source; its attributes also carry ``first_step`` (the episode's first step),
    ``episode`` (its number, from 1) and ``nonfinite_steps`` (non-finite steps so far,
    this one included), and with ``capsules`` set, ``capsule`` (the capsule directory
    of that step) and ``replay`` (the ``penwatch replay`` command to run on it).

    Args:
      action: ``"warn"`` logs a warning (logger ``penwatch.alerts``); ``"raise"`` also
        raises :class:`NonFiniteDetected` on the training thread at the first
        ``Monitor.record``/``flush``/``close`` call after the monitor's worker has seen
        the record (it never raises into training, and takes ready records in batches of
        up to 0.2 s: steps may have run in between); ``"callback"`` calls
        ``callback(event, record)`` on the worker thread (exceptions are logged).
      callback: the function for ``action="callback"``.
      capsules: the :class:`penwatch.forensics.CapsuleWriter` of the train step
        (``step_fn.capsules``) or its directory: the event, its log line and the
        dashboard then point to the capsule and print the replay command.
    """

    name = "NonFinite"

    def __init__(
        self,
        action: str = "warn",
        *,
        callback: Callable[[Event, StepRecord], Any] | None = None,
        capsules: CapsuleWriter | str | os.PathLike[str] | None = None,
    ) -> None:
        self.action = _checks.check_choice(_FN, "action", action, ("warn", "raise", "callback"))
        if action == "callback":
            _checks.check_callable(_FN, "callback", callback, label="option")
        elif callback is not None:
            raise _checks.option_error(_FN, "callback", callback, "None unless action='callback'")
        self.callback = callback
        if capsules is not None and not isinstance(capsules, CapsuleWriter | str | os.PathLike):
            raise _checks.option_error(
                _FN, "capsules", capsules, "None, a CapsuleWriter or a directory path"
            )
        self.capsules = capsules
        self.nonfinite_steps = 0
        self.episodes = 0
        self._episodes = Episodes(patience=1)
        self._error: NonFiniteDetected | None = None

    def take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        bad = record.has_nonfinite
        self.nonfinite_steps += bad
        if not self._episodes.update(record.pipeline, bad):
            return ()
        self.episodes += 1
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
            "first_step": record.step,
            "episode": self.episodes,
            "nonfinite_steps": self.nonfinite_steps,
        }
        if self.capsules is not None:
            capsule, replay = self._capsule(record.step)
            attributes["capsule"], attributes["replay"] = capsule, replay
            message += f"; capsule {capsule}; replay: {replay}"
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

    def _capsule(self, step: int) -> tuple[str, str]:
        if isinstance(self.capsules, CapsuleWriter):
            return str(self.capsules.path_for(step)), self.capsules.replay_command(step)
        path = Path(self.capsules) / capsule_dir_name(step)  # type: ignore[arg-type]
        return str(path), replay_command(path)

    def __repr__(self) -> str:
        return f"NonFinite(action={self.action!r})"
