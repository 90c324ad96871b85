"""Non-finite detection: which metric went NaN/Inf first, and which leaves hold it.

Two halves:

* :func:`leaf_nonfinite` runs *inside* a compiled train step and returns per-leaf
  NaN/Inf counts as int32 device scalars (the ``"_leaf_nonfinite"`` metric, see
  ``docs/ARCHITECTURE.md`` seam 1). Nothing is read back there.
* :func:`find_nonfinite`, :func:`leaf_reports` and :func:`describe` run on the host, in
  the monitor's worker, on already-materialized Python numbers.

First offender. A step computes, in this order: each penalty's raw value (pipeline
order), its weight, its weighted value, the pipeline ``total``, the base loss
``base_loss``, the objective ``loss``, then gradients (input-gradient norms,
``total_grad_norm``, parameter-gradient norms, shares, cosines). A NaN propagates
forwards along that order, so the earliest non-finite metric in it is reported first: a
penalty that went NaN on its own is named before the totals it contaminated. When the
parameters themselves hold NaN every term is non-finite; the leaf report (parameter
leaves before gradient leaves, largest counts first) then names the culprit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from penwatch.penalties import leaf_finite_counts
from penwatch.telemetry._record import LeafReport, NonFinite, StepRecord

__all__ = ["describe", "find_nonfinite", "leaf_nonfinite", "leaf_reports"]

# Rank groups in computation order (see the module docstring).
_RAW, _WEIGHT, _WEIGHTED, _TOTAL, _BASE, _LOSS = 0, 1, 2, 3, 4, 5
_INPUT_GRAD, _PARAM_GRAD, _SHARE, _COSINE, _OTHER = 6, 7, 8, 9, 10


def leaf_nonfinite(**trees: Any) -> dict[str, dict[str, tuple[jax.Array, jax.Array]]]:
    """Per-leaf NaN and Inf counts of pytrees, for use inside a compiled step.

    Args:
      **trees: named pytrees, conventionally ``params=...`` and ``grads=...``.

    Returns:
      ``{name: {path: (nan_count, inf_count)}}`` with int32 scalar arrays, paths from
      ``jax.tree_util.keystr``. Non-floating leaves are left out. Put it in the step's
      metrics under ``"_leaf_nonfinite"``; the monitor reads it asynchronously.

    Example:
      >>> import jax.numpy as jnp
      >>> out = leaf_nonfinite(params={"w": jnp.array([1.0, jnp.nan])})
      >>> [int(c) for c in out["params"]["['w']"]]
      [1, 0]
    """
    return {name: leaf_finite_counts(tree) for name, tree in trees.items()}


def _key_table(
    penalties: Sequence[str], terms: Sequence[str]
) -> dict[str, tuple[int, int, str, str | None]]:
    """key -> (group, index within group, source, penalty name)."""
    table: dict[str, tuple[int, int, str, str | None]] = {}
    for i, p in enumerate(penalties):
        table[p] = (_RAW, i, "penalty", p)
        table[p + "_weight"] = (_WEIGHT, i, "penalty", p)
        table[p + "_weighted"] = (_WEIGHTED, i, "penalty", p)
        table[p + "_grad_norm"] = (_INPUT_GRAD, i, "gradient", p)
    table["total"] = (_TOTAL, 0, "total", None)
    table["base_loss"] = (_BASE, 0, "loss", None)
    table["loss"] = (_LOSS, 0, "loss", None)
    table["total_grad_norm"] = (_INPUT_GRAD, len(penalties), "gradient", None)
    table["grad_norm"] = (_PARAM_GRAD, len(terms), "gradient", None)  # global norm
    for i, t in enumerate(terms):
        name = None if t == "base" else t
        table[t + "_param_grad_norm"] = (_PARAM_GRAD, i, "gradient", name)
        table[t + "_grad_share"] = (_SHARE, i, "gradient", name)
        table[t + "_grad_cosine"] = (_COSINE, i, "gradient", name)
    return table


def find_nonfinite(
    values: Mapping[str, float], penalties: Sequence[str], terms: Sequence[str]
) -> tuple[NonFinite, ...]:
    """Non-finite metrics of one step, first offender first (see the module docstring).

    Args:
      values: materialized scalar metrics.
      penalties: penalty names in pipeline order.
      terms: gradient-diagnostic term names.

    Returns:
      One :class:`NonFinite` per non-finite metric, in computation order; NaN wins over
      Inf only in the sense that each metric is one or the other.
    """
    bad = [(k, v) for k, v in values.items() if not math.isfinite(v)]
    if not bad:
        return ()
    table = _key_table(penalties, terms)
    order = {k: i for i, k in enumerate(values)}
    found = []
    for key, value in bad:
        group, index, source, penalty = table.get(key, (_OTHER, order[key], "other", None))
        kind = "nan" if math.isnan(value) else "inf"
        found.append(((group, index, order[key]), NonFinite(key, kind, source, penalty)))
    found.sort(key=lambda pair: pair[0])
    return tuple(nf for _, nf in found)


def leaf_reports(
    leaf_counts: Mapping[str, Mapping[str, Sequence[Any]]] | None, *, max_leaves: int = 5
) -> tuple[LeafReport, ...]:
    """The top non-finite leaves from materialized ``"_leaf_nonfinite"`` counts.

    Parameter leaves come before gradient leaves (a NaN parameter is a cause, a NaN
    gradient usually its consequence); within a tree, largest counts first.

    Args:
      leaf_counts: ``{tree: {path: (nan_count, inf_count)}}`` of host numbers, or None.
      max_leaves: how many leaves to keep.

    Returns:
      Up to ``max_leaves`` :class:`LeafReport`.
    """
    if not leaf_counts:
        return ()
    tree_rank = {"params": 0, "grads": 1}
    rows = []
    for t_index, (tree, counts) in enumerate(leaf_counts.items()):
        for p_index, (path, pair) in enumerate(counts.items()):
            nan_count, inf_count = int(pair[0]), int(pair[1])
            if nan_count or inf_count:
                rank = (tree_rank.get(tree, 2 + t_index), -(nan_count + inf_count), p_index)
                rows.append((rank, LeafReport(tree, path, nan_count, inf_count)))
    rows.sort(key=lambda r: r[0])
    return tuple(r for _, r in rows[:max_leaves])


def describe(record: StepRecord) -> str:
    """One human-readable line naming the first offender and the non-finite leaves."""
    parts = [f"run {record.run!r} step {record.step} (pipeline {record.pipeline!r}):"]
    first = record.first_offender
    if first is not None:
        what = {
            "penalty": f"penalty {first.penalty!r}",
            "gradient": f"gradient of {first.penalty or 'base'!r}",
            "loss": "the loss",
            "total": "the pipeline total",
            "other": "metric",
        }[first.source]
        others = [nf.key for nf in record.nonfinite[1:6]]
        more = len(record.nonfinite) - 1 - len(others)
        tail = f"; then {', '.join(others)}" + (f" and {more} more" if more > 0 else "")
        parts.append(
            f"first non-finite metric {first.key!r} ({first.kind}, {what})"
            + (tail if others else "")
        )
    else:
        parts.append("all metrics finite")
    if record.leaves:
        leaves = ", ".join(
            f"{leaf.tree}{leaf.path} ({leaf.nan_count} nan, {leaf.inf_count} inf)"
            for leaf in record.leaves
        )
        return " ".join(parts) + f"; non-finite leaves: {leaves}"
    return " ".join(parts)
