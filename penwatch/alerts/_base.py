"""The alert interface and the once-per-episode bookkeeping every alert shares.

An alert is evaluated by the monitor's worker on every :class:`StepRecord` and returns
the :class:`Event` s it fires; the monitor sends them to every sink (the
``penwatch_alerts_total`` counter, an OpenTelemetry span event, the SQLite ``events``
table, a log line). An alert fires once per *episode*: when its condition has held long
enough, and not again until the condition clears (it then re-arms).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from penwatch.schema import Event, EventKind, Severity, StepRecord

__all__ = ["Alert", "Episodes"]


class Alert(abc.ABC):
    """A rule over records. ``evaluate`` runs on the monitor's worker thread, in order."""

    name: str = "Alert"

    @abc.abstractmethod
    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        """Events fired by this record (usually none)."""

    def take_error(self) -> BaseException | None:
        """An exception to raise on the training thread, handed over once (default none).

        The monitor asks after every evaluation and raises the first one it gets at the
        next ``record``/``flush``/``close`` call (``NonFinite(action="raise")``).
        """
        return None

    def _event(
        self,
        record: StepRecord,
        message: str,
        *,
        kind: EventKind = "alert",
        severity: Severity = "warning",
        attributes: Mapping[str, Any] | None = None,
    ) -> Event:
        return Event(
            run=record.run,
            process=record.process,
            step=record.step,
            wall_time=record.wall_time,
            kind=kind,
            name=self.name,
            message=message,
            severity=severity,
            attributes={"alert": self.name, "pipeline": record.pipeline, **(attributes or {})},
        )


@dataclasses.dataclass
class _Episode:
    streak: int = 0
    fired: bool = False


class Episodes:
    """Once-per-episode state for conditions observed under keys (pipeline, penalty, ...).

    Args:
      patience: consecutive observations of the condition needed to fire.
    """

    def __init__(self, patience: int = 1) -> None:
        self.patience = patience
        self._state: dict[Hashable, _Episode] = {}

    def update(self, key: Hashable, condition: bool) -> bool:
        """Observe ``condition`` under ``key``; True exactly when the episode fires now."""
        ep = self._state.get(key)
        if ep is None:  # not setdefault: no _Episode built per observation
            ep = self._state[key] = _Episode()
        if not condition:
            ep.streak, ep.fired = 0, False
            return False
        ep.streak += 1
        if ep.streak >= self.patience and not ep.fired:
            ep.fired = True
            return True
        return False

    def active(self, key: Hashable) -> bool:
        """Whether the episode under ``key`` has fired and not cleared yet."""
        ep = self._state.get(key)
        return bool(ep and ep.fired)
