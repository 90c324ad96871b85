"""The dashboard's "dominance" section, as pure functions (SPEC sections 7 and 12).

From one diagnostics step's figures — read from a step's stored values with
:func:`step_from_values` — this module builds, in the order the page shows them:

1. :func:`sentences`: the answer in words first ("hidden holds the task back: ‖g‖ ratio
   0.85, cosine -0.9; suggested weight 0.4 (now 5.0)");
2. :func:`what_if_table`: the figures under slider weights (``pw.diagnostics.what_if``);
3. :func:`heatmap`: the term × layer heat map of per-group gradient norms, every label
   shown;
4. :func:`share_table`: gradient vs update shares.

Sentences are plain text holding user names (penalties, layers): the page must show
them escaped (``md_escape``) or as text, never as raw Markdown. Charts carry names as
data only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import altair as alt
import pandas as pd

from penwatch.diagnostics import suggest_weights, what_if
from penwatch.schema import BASE_TERM, layout_of, penalty_key
from penwatch.schema import thresholds as th

__all__ = [
    "DominanceStep",
    "heatmap",
    "sentences",
    "share_table",
    "slider_options",
    "step_from_values",
    "suggestion_note",
    "weight_label",
    "what_if_table",
]

SLIDER_STOPS = 8
"""What-if slider stops per decade of weight."""

SLIDER_DECADES = 3
"""Decades either side of the current weight that a what-if slider spans."""


@dataclasses.dataclass(frozen=True)
class DominanceStep:
    """One diagnostics step's figures, as the dominance section needs them.

    Attributes:
      step: the training step.
      terms: term names, ``base`` first.
      weights: ``term -> weight`` (``base`` 1; a term without a recorded weight: 1).
      gram: the unweighted term Gram matrix (rows/columns in ``terms`` order), or None.
      grad_share, grad_cosine, param_grad_norm: SPEC §4 figures per term.
      update_share: ``term -> update-space share`` (empty without a preconditioner).
      suggested_weight: ``penalty -> suggested weight`` (empty when none was feasible).
      group_norms: ``(term, group) -> ‖g_term‖`` over that parameter group.
      groups: parameter groups in record order.
    """

    step: int
    terms: tuple[str, ...]
    weights: dict[str, float]
    gram: list[list[float]] | None
    grad_share: dict[str, float]
    grad_cosine: dict[str, float]
    param_grad_norm: dict[str, float]
    update_share: dict[str, float] = dataclasses.field(default_factory=dict)
    suggested_weight: dict[str, float] = dataclasses.field(default_factory=dict)
    group_norms: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    groups: tuple[str, ...] = ()


def step_from_values(step: int, values: Mapping[str, float]) -> DominanceStep | None:
    """The figures of a diagnostics step from its scalar values (a store row's
    ``values``, a ``StepRecord.values``), or None when the step ran no diagnostics."""
    layout = layout_of(values)
    terms = layout.terms
    if not terms or terms[0] != BASE_TERM:
        return None

    def per_term(quantity: str) -> dict[str, float]:
        out = {}
        for t in terms:
            key = layout.term_keys(t).get(quantity)
            if key is not None:
                out[t] = float(values[key])
        return out

    weights = {t: float(values.get(penalty_key(t, "weight"), 1.0)) for t in terms}
    weights[BASE_TERM] = 1.0
    keys = layout.gram_keys
    gram = None
    if all((a, b) in keys for a in terms for b in terms):
        gram = [[float(values[keys[(a, b)]]) for b in terms] for a in terms]
    return DominanceStep(
        step=int(step),
        terms=terms,
        weights=weights,
        gram=gram,
        grad_share=per_term("grad_share"),
        grad_cosine=per_term("grad_cosine"),
        param_grad_norm=per_term("param_grad_norm"),
        update_share=per_term("update_share"),
        suggested_weight={t: w for t, w in per_term("suggested_weight").items() if t != BASE_TERM},
        group_norms={tg: float(values[k]) for tg, k in layout.group_keys.items()},
        groups=layout.groups,
    )


def _g(x: float) -> str:
    return f"{x:.2g}" if abs(x) < 10 else f"{x:.3g}"


def _suggestion(step: DominanceStep, term: str) -> str:
    if term in step.suggested_weight:
        return (
            f"; suggested weight {_g(step.suggested_weight[term])} (now {_g(step.weights[term])})"
        )
    return ""


def sentences(step: DominanceStep) -> list[str]:
    """The answer in words, one sentence per penalty that needs one, worst first.

    In order of precedence per penalty (thresholds from ``penwatch.schema.thresholds``):

    * dead term: ``‖g_i‖ = 0`` at a nonzero weight;
    * tug of war: ``‖g_i‖/‖g_0‖ ≥ TUG_RATIO`` and ``cos(g_i, g_0) < TUG_COSINE`` —
      "holds the task back";
    * dominance: ``grad_share > DOMINANCE_SHARE`` — "dominates the update";
    * conflict: ``cos < CONFLICT_COSINE`` — "pushes against the task (weakly)";
    * update share: ``|update_share - grad_share| > 0.25`` — the optimizer changes the
      picture ("takes 0.6 of the update under the optimizer, 0.05 of the gradient").

    When no penalty needs a sentence, one sentence says so with the base's share.
    """
    out: list[str] = []
    base_norm = step.param_grad_norm.get(BASE_TERM, 0.0)
    for term in step.terms[1:]:
        norm = step.param_grad_norm.get(term)
        share = step.grad_share.get(term)
        cosine = step.grad_cosine.get(term)
        if norm is None or share is None or cosine is None:
            continue
        ratio = norm / base_norm if base_norm > 0 else math.inf
        if norm == 0 and step.weights.get(term, 1.0) != 0:
            out.append(
                f"{term} is a dead term: its parameter gradient is zero, so its weight "
                "changes nothing (stop_gradient or the wrong subtree?)"
            )
        elif ratio >= th.TUG_RATIO and cosine < th.TUG_COSINE:
            out.append(
                f"{term} holds the task back: ‖g‖ ratio {_g(ratio)}, cosine {_g(cosine)}"
                + _suggestion(step, term)
            )
        elif share > th.DOMINANCE_SHARE:
            out.append(
                f"{term} dominates the update: gradient share {_g(share)}" + _suggestion(step, term)
            )
        elif cosine < th.CONFLICT_COSINE:
            out.append(
                f"{term} pushes against the task, weakly: ‖g‖ ratio {_g(ratio)}, cosine "
                f"{_g(cosine)}"
            )
        update = step.update_share.get(term)
        if update is not None and abs(update - share) > 0.25:
            out.append(
                f"under the optimizer {term} takes {_g(update)} of the update "
                f"({_g(share)} of the gradient)"
            )
    if not out:
        base = step.grad_share.get(BASE_TERM)
        carried = f": the task carries {_g(base)} of the gradient" if base is not None else ""
        out.append(f"No penalty holds the task back at step {step.step}{carried}")
    return out


def what_if_table(step: DominanceStep, weights: Mapping[str, float]) -> pd.DataFrame | None:
    """The step's figures under slider ``weights`` (``term -> weight``; unlisted terms
    keep theirs), from the Gram matrix alone; None without a Gram matrix.

    Columns: ``term``, ``weight`` (now), ``what-if weight``, ``grad share`` (now),
    ``what-if share``, ``what-if cosine``, ``what-if ‖g‖``; and a last row ``total``
    with ``‖g‖`` of the whole gradient.
    """
    if step.gram is None:
        return None
    now = what_if((step.terms, step.gram), step.weights)
    new = what_if((step.terms, step.gram), {**step.weights, **weights, BASE_TERM: 1.0})
    rows = [
        {
            "term": t,
            "weight": step.weights[t],
            "what-if weight": new.weights[t],
            "grad share": now.grad_share[t],
            "what-if share": new.grad_share[t],
            "what-if cosine": new.grad_cosine[t],
            "what-if ‖g‖": new.param_grad_norm[t],
        }
        for t in step.terms
    ]
    rows.append({"term": "total", "what-if ‖g‖": new.grad_norm})
    return pd.DataFrame(rows)


def weight_label(w: float) -> str:
    """A weight as a slider shows it (3 significant digits)."""
    return f"{w:.3g}"


def slider_options(now: float, suggested: float | None = None) -> list[float]:
    """A what-if slider's weights, ascending: ``now · 10^(k/SLIDER_STOPS)`` for ``|k| ≤
    SLIDER_STOPS · SLIDER_DECADES`` (log scale, the weight's sign kept; around 1 for a
    zero weight), with ``now`` and the ``suggested`` weight exactly; one option per
    :func:`weight_label` (the current weight wins a tie, then the suggestion)."""
    scale = abs(now) if now != 0 else 1.0
    sign = -1.0 if now < 0 else 1.0
    n = SLIDER_STOPS * SLIDER_DECADES
    grid = [sign * scale * 10 ** (k / SLIDER_STOPS) for k in range(-n, n + 1)]
    shown: dict[str, float] = {}
    for w in [now, *([] if suggested is None else [suggested]), *grid]:
        shown.setdefault(weight_label(w), w)
    return sorted(shown.values())


def suggestion_note(step: DominanceStep) -> str:
    """One line on the suggestion recomputed from the Gram matrix: the weights to try,
    or why no lowering of the weights meets the band."""
    if step.gram is None:
        return "No term Gram matrix at this step: no suggestion"
    found = suggest_weights((step.terms, step.gram), step.weights)
    if not found.feasible:
        return f"No weights meet the band: {found.reason}"
    if not found.changed:
        return "Every penalty is in the band at its current weight"
    return "Suggested: " + ", ".join(
        f"{t} {_g(found.weights[t])} (now {_g(step.weights[t])})" for t in found.changed
    )


def heatmap(step: DominanceStep) -> alt.Chart | None:
    """Term × parameter-group heat map of ``‖g_term‖`` per group (which layers each
    term acts on), each cell labeled with its value; every term and group label is
    shown (no truncation, no overlap culling). None without per-group norms."""
    if not step.group_norms:
        return None
    df = pd.DataFrame(
        [{"term": t, "group": g, "norm": v} for (t, g), v in step.group_norms.items()]
    )
    axis = alt.Axis(labelLimit=0, labelOverlap=False, labelAngle=0)
    base = alt.Chart(df).encode(
        x=alt.X("group:N", title="parameter group (layer)", sort=list(step.groups), axis=axis),
        y=alt.Y("term:N", title="term", sort=list(step.terms), axis=axis),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("norm:Q", title="‖g‖ in group", scale=alt.Scale(scheme="blues")),
        tooltip=["term:N", "group:N", alt.Tooltip("norm:Q", format=".3g")],
    )
    text = base.mark_text(baseline="middle").encode(text=alt.Text("norm:Q", format=".2g"))
    return (cells + text).properties(title=f"Where each term acts (step {step.step})")


def share_table(step: DominanceStep) -> pd.DataFrame:
    """Gradient vs update shares per term (``update share`` NaN without a
    preconditioner)."""
    return pd.DataFrame(
        [
            {
                "term": t,
                "grad share": step.grad_share.get(t, math.nan),
                "update share": step.update_share.get(t, math.nan),
            }
            for t in step.terms
        ]
    )
