"""``GradientDominance`` and ``GradientConflict``: alerts on the SPEC section 4 figures.

Both read the gradient-diagnostic keys of a record (``<term>_grad_share``,
``<term>_grad_cosine``); records without them (steps where diagnostics did not run) leave
the streaks untouched, so ``patience`` counts consecutive *diagnostic* records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from penwatch import _checks
from penwatch.alerts._base import Alert, Episodes
from penwatch.schema import BASE_TERM, Event, StepRecord
from penwatch.schema import thresholds as th

__all__ = ["GradientConflict", "GradientDominance"]


class GradientDominance(Alert):
    """Fires when one penalty's share of the update exceeds ``threshold`` for a while.

    The share is ``⟨g_i, g⟩ / ‖g‖²`` (SPEC section 4): shares of all terms sum to 1, so a
    penalty above 0.5 contributes more of the update than every other term together.

    Args:
      threshold: the share above which a penalty dominates.
      patience: consecutive diagnostic records above ``threshold`` before firing.
    """

    name = "GradientDominance"

    def __init__(
        self, threshold: float = th.DOMINANCE_SHARE, patience: int = th.DOMINANCE_PATIENCE
    ) -> None:
        fn = "penwatch.alerts.GradientDominance"
        self.threshold = _checks.check_finite_real(fn, "threshold", threshold)
        self.patience = _checks.check_int(fn, "patience", patience, min=1)
        self._episodes = Episodes(self.patience)

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        events = []
        for values in record.term_values:
            term, share = values.name, values.grad_share
            if term == BASE_TERM or share is None:
                continue
            if self._episodes.update((record.pipeline, term), share > self.threshold):
                events.append(
                    self._event(
                        record,
                        f"penalty {term!r} dominates the gradient: grad share {share:.3g} > "
                        f"{self.threshold:g} for {self.patience} consecutive diagnostic "
                        f"records (step {record.step})",
                        attributes={
                            "penalty": term,
                            "grad_share": share,
                            "threshold": self.threshold,
                            "patience": self.patience,
                        },
                    )
                )
        return events

    def __repr__(self) -> str:
        return f"GradientDominance(threshold={self.threshold}, patience={self.patience})"


class GradientConflict(Alert):
    """Fires when a penalty's gradient points against the task loss's for a while.

    Uses ``<term>_grad_cosine``, the cosine between the penalty's parameter gradient and
    the base-loss gradient (SPEC section 4). A NaN cosine (e.g. a zero gradient) never
    counts as a conflict.

    Args:
      cosine_below: the cosine under which a penalty conflicts with the task, in [-1, 1].
      patience: consecutive diagnostic records below ``cosine_below`` before firing.
    """

    name = "GradientConflict"

    def __init__(
        self, cosine_below: float = th.CONFLICT_COSINE, patience: int = th.CONFLICT_PATIENCE
    ) -> None:
        fn = "penwatch.alerts.GradientConflict"
        self.cosine_below = _checks.check_in_range(fn, "cosine_below", cosine_below, -1.0, 1.0)
        self.patience = _checks.check_int(fn, "patience", patience, min=1)
        self._episodes = Episodes(self.patience)

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        events = []
        for values in record.term_values:
            term, cosine = values.name, values.grad_cosine
            if term == BASE_TERM or cosine is None:
                continue
            conflict = math.isfinite(cosine) and cosine < self.cosine_below
            if self._episodes.update((record.pipeline, term), conflict):
                events.append(
                    self._event(
                        record,
                        f"penalty {term!r} conflicts with the task loss: gradient cosine "
                        f"{cosine:.3g} < {self.cosine_below:g} for {self.patience} "
                        f"consecutive diagnostic records (step {record.step})",
                        attributes={
                            "penalty": term,
                            "grad_cosine": cosine,
                            "cosine_below": self.cosine_below,
                            "patience": self.patience,
                        },
                    )
                )
        return events

    def __repr__(self) -> str:
        return f"GradientConflict(cosine_below={self.cosine_below}, patience={self.patience})"
