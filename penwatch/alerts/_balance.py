"""``GradientTugOfWar``, ``ActivityCollapse`` and ``FirstStepLint`` (SPEC section 12).

The share-based alerts cannot see a penalty that is too strong once training has
settled: at the balance point the penalty and the task cancel, shares oscillate around 0
and the penalty sets where training stops. These alerts read what can: the ratio of
gradient norms with the cosine (tug of war), the dead units of captured activations
(collapse), and the very first diagnostics step (lint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from penwatch import _checks
from penwatch.alerts._base import Alert, Episodes
from penwatch.schema import BASE_TERM, Event, StepRecord
from penwatch.schema import thresholds as th

__all__ = ["ActivityCollapse", "FirstStepLint", "GradientTugOfWar"]


def _weight_note(record: StepRecord, term: str) -> tuple[str, dict[str, float]]:
    """``"; suggested weight 0.4 (now 5.0)"`` and its attributes, when recorded."""
    values = record.term(term)
    weight = record.penalty(term).weight
    attrs: dict[str, float] = {}
    if weight is not None:
        attrs["weight"] = weight
    if values.suggested_weight is not None:
        attrs["suggested_weight"] = values.suggested_weight
        now = f" (now {weight:.3g})" if weight is not None else ""
        return f"; suggested weight {values.suggested_weight:.3g}{now}", attrs
    return "", attrs


class GradientTugOfWar(Alert):
    """Fires when a penalty's gradient is large against the task's and opposes it.

    The condition, on a diagnostics record: ``‖g_i‖ / ‖g_0‖ ≥ ratio_above`` and
    ``cos(g_i, g_0) < cosine_below`` for ``patience`` consecutive diagnostic records.
    That is the state in which a too-strong penalty decides where training settles while
    its gradient share oscillates around 0 (``GradientDominance`` cannot see it). The
    event also reports the weighted-value-to-task-loss ratio and, when the record has
    it, ``<penalty>_suggested_weight``.

    Args:
      ratio_above: the gradient-norm ratio at or above which the penalty is strong.
      cosine_below: the cosine below which it opposes the task, in [-1, 1].
      patience: consecutive diagnostic records before firing.
    """

    name = "GradientTugOfWar"

    def __init__(
        self,
        ratio_above: float = th.TUG_RATIO,
        cosine_below: float = th.TUG_COSINE,
        patience: int = th.TUG_PATIENCE,
    ) -> None:
        fn = "penwatch.alerts.GradientTugOfWar"
        self.ratio_above = _checks.check_finite_real(fn, "ratio_above", ratio_above)
        if self.ratio_above <= 0:
            raise ValueError(f"{fn}: argument 'ratio_above' must be > 0, got {ratio_above}")
        self.cosine_below = _checks.check_in_range(fn, "cosine_below", cosine_below, -1.0, 1.0)
        self.patience = _checks.check_int(fn, "patience", patience, min=1)
        self._episodes = Episodes(self.patience)

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        terms = record.term_values
        if not terms or terms[0].name != BASE_TERM:
            return []
        base_norm = terms[0].param_grad_norm
        if base_norm is None:
            return []
        events = []
        for values in terms[1:]:
            norm, cosine = values.param_grad_norm, values.grad_cosine
            if norm is None or cosine is None:
                continue
            ratio = norm / base_norm if base_norm > 0 else math.inf
            tug = (
                math.isfinite(cosine)
                and base_norm > 0
                and ratio >= self.ratio_above
                and cosine < self.cosine_below
            )
            if not self._episodes.update((record.pipeline, values.name), tug):
                continue
            term = values.name
            weighted = record.penalty(term).weighted
            loss = record.values.get("base_loss", record.loss)
            attrs: dict[str, float | str | int] = {
                "penalty": term,
                "grad_norm_ratio": ratio,
                "grad_cosine": cosine,
                "ratio_above": self.ratio_above,
                "cosine_below": self.cosine_below,
                "patience": self.patience,
            }
            value_note = ""
            if weighted is not None and loss:
                attrs["value_ratio"] = weighted / loss
                value_note = f", weighted value {weighted / loss:.3g}x the task loss"
            note, extra = _weight_note(record, term)
            attrs.update(extra)
            events.append(
                self._event(
                    record,
                    f"penalty {term!r} holds the task back (tug of war): ‖g‖ ratio "
                    f"{ratio:.3g} >= {self.ratio_above:g}, cosine {cosine:.3g} < "
                    f"{self.cosine_below:g}{value_note}{note}, for {self.patience} "
                    f"consecutive diagnostic records (step {record.step})",
                    attributes=attrs,
                )
            )
        return events

    def __repr__(self) -> str:
        return (
            f"GradientTugOfWar(ratio_above={self.ratio_above}, "
            f"cosine_below={self.cosine_below}, patience={self.patience})"
        )


class ActivityCollapse(Alert):
    """Fires when a captured activation's dead fraction exceeds ``dead_above``.

    Reads ``<capture>_dead_fraction`` (the fraction of units zero for the whole batch,
    written by ``build_activity_train_step`` for every ``pw.capture``), so a sparsity
    penalty that kills a layer is named even after its own gradient has vanished.

    Args:
      dead_above: the dead fraction above which the layer has collapsed, in [0, 1).
      patience: consecutive records above it before firing.
    """

    name = "ActivityCollapse"

    def __init__(
        self,
        dead_above: float = th.COLLAPSE_DEAD_FRACTION,
        patience: int = th.COLLAPSE_PATIENCE,
    ) -> None:
        fn = "penwatch.alerts.ActivityCollapse"
        self.dead_above = _checks.check_in_range(fn, "dead_above", dead_above, 0.0, 1.0)
        self.patience = _checks.check_int(fn, "patience", patience, min=1)
        self._episodes = Episodes(self.patience)

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        events = []
        for capture, dead in record.dead_fractions().items():
            collapsed = math.isfinite(dead) and dead > self.dead_above
            if not self._episodes.update((record.pipeline, capture), collapsed):
                continue
            attrs: dict[str, float | str | int] = {
                "capture": capture,
                "dead_fraction": dead,
                "dead_above": self.dead_above,
                "patience": self.patience,
            }
            penalty = ""
            if capture in record.penalties:
                attrs["penalty"] = capture
                weight = record.penalty(capture).weight
                penalty = f" under penalty {capture!r}" + (
                    f" (weight {weight:.3g})" if weight is not None else ""
                )
            events.append(
                self._event(
                    record,
                    f"activation {capture!r} collapsed{penalty}: {dead:.0%} of its units are "
                    f"zero for the whole batch (> {self.dead_above:.0%}) (step {record.step})",
                    severity="critical",
                    attributes=attrs,
                )
            )
        return events

    def __repr__(self) -> str:
        return f"ActivityCollapse(dead_above={self.dead_above}, patience={self.patience})"


class FirstStepLint(Alert):
    """Reports, at the first diagnostics record of each pipeline, what is wrong at once.

    * a **dead term**: a penalty whose parameter gradient is exactly zero (it is behind
      ``stop_gradient`` or reads the wrong subtree: its weight changes nothing);
    * a penalty whose gradient share exceeds ``share_above`` (it drowns the task from
      the start).

    No ``patience``: the first diagnostics step decides.

    Args:
      share_above: the share above which a penalty is reported.
    """

    name = "FirstStepLint"

    def __init__(self, share_above: float = th.LINT_SHARE) -> None:
        fn = "penwatch.alerts.FirstStepLint"
        self.share_above = _checks.check_finite_real(fn, "share_above", share_above)
        self._seen: set[str] = set()

    def evaluate(self, record: StepRecord) -> Sequence[Event]:
        terms = record.term_values
        if not terms or record.pipeline in self._seen:
            return []
        self._seen.add(record.pipeline)
        events = []
        for values in terms:
            term = values.name
            if term == BASE_TERM:
                continue
            if values.param_grad_norm == 0.0 and record.penalty(term).weight != 0.0:
                events.append(
                    self._event(
                        record,
                        f"penalty {term!r} is a dead term: its parameter gradient is zero at "
                        "the first diagnostics step (behind stop_gradient, or reading the "
                        f"wrong subtree?), so its weight changes nothing (step {record.step})",
                        attributes={"penalty": term, "lint": "dead_term", "param_grad_norm": 0.0},
                    )
                )
            share = values.grad_share
            if share is not None and math.isfinite(share) and share > self.share_above:
                note, extra = _weight_note(record, term)
                events.append(
                    self._event(
                        record,
                        f"penalty {term!r} takes {share:.3g} of the gradient at the first "
                        f"diagnostics step (> {self.share_above:g}){note} (step {record.step})",
                        attributes={
                            "penalty": term,
                            "lint": "share",
                            "grad_share": share,
                            "share_above": self.share_above,
                            **extra,
                        },
                    )
                )
        return events

    def __repr__(self) -> str:
        return f"FirstStepLint(share_above={self.share_above})"
