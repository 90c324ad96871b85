"""Non-finite reports on the host: the first offender, the non-finite leaves, one line.

These run in the monitor's worker on materialized numbers and a record's
:class:`~penwatch.schema.Layout`, whose slots carry each key's computation order: a NaN
propagates forwards along that order (raw penalty values, weights, weighted values, the
total, the base loss, the objective, then gradients), so the earliest non-finite slot is
the first offender, and a penalty that went NaN on its own is named before the totals
it contaminated. When the parameters themselves hold NaN every term is non-finite; the
leaf report then names the culprit, ordered by where the value entered (see
:func:`leaf_reports`), not by how many values it spoiled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from penwatch.schema._keys import Layout
from penwatch.schema._leaves import LeafCounts
from penwatch.schema._record import LeafReport, NonFinite, StepRecord

__all__ = ["describe", "find_nonfinite", "leaf_reports"]


def find_nonfinite(values: Sequence[float], layout: Layout) -> tuple[NonFinite, ...]:
    """Non-finite metrics of one step, first offender first.

    Args:
      values: materialized scalar metrics aligned with ``layout.keys``.
      layout: what each key means.

    Returns:
      One :class:`NonFinite` per non-finite metric, in computation order.
    """
    if math.isfinite(sum(values)):  # a NaN or Inf anywhere makes the sum non-finite
        return ()
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if not bad:
        return ()
    bad_set = set(bad)
    out = []
    for i in layout.first_order:
        if i in bad_set:
            slot = layout.slots[i]
            kind = "nan" if math.isnan(values[i]) else "inf"
            out.append(NonFinite(slot.key, kind, slot.source, slot.penalty))
    return tuple(out)


def leaf_reports(
    leaf_counts: Mapping[str, Mapping[str, Sequence[Any]]] | None, *, max_leaves: int = 5
) -> tuple[LeafReport, ...]:
    """The non-finite leaves nearest the source first, from ``"_leaf_nonfinite"`` counts.

    Order (SPEC section 6, "where the value entered"), by these keys in turn:

    1. leaves holding an Inf before leaves holding only NaN (an Inf is where a ``log(0)``
       or a division by zero entered; ``inf - inf`` and ``0 * inf`` then spread NaN);
    2. parameter leaves before gradient leaves (a NaN parameter is a cause, a NaN
       gradient usually its consequence), then any other tree in its given order;
    3. within a tree, the leaves' row order. penwatch train steps pack the rows *nearest
       the loss first*: the reverse of the order in which the forward pass first reads
       each parameter leaf (the output layer first), which is where a non-finite value
       enters the backward pass. Counts never reorder leaves.

    Args:
      leaf_counts: ``{tree: {path: (nan_count, inf_count)}}`` (a
        :class:`TreeLeafCounts`, or a :class:`LeafCounts` or a plain mapping per tree)
        of host numbers, or None.
      max_leaves: how many leaves to keep.

    Returns:
      Up to ``max_leaves`` :class:`LeafReport`.
    """
    if not leaf_counts:
        return ()
    tree_rank = {"params": 0, "grads": 1}
    rows = []
    for t_index, (tree, counts) in enumerate(leaf_counts.items()):
        if isinstance(counts, LeafCounts):
            table = counts.rows()  # one host read of the whole [n, 2] array
        else:
            table = [(path, int(pair[0]), int(pair[1])) for path, pair in counts.items()]
        for p_index, (path, nan_count, inf_count) in enumerate(table):
            if nan_count or inf_count:
                rank = (inf_count == 0, tree_rank.get(tree, 2 + t_index), p_index)
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
