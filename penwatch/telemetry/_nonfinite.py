"""In-step non-finite leaf counts: the device half of the non-finite report.

:func:`leaf_nonfinite` runs *inside* a compiled train step and returns per-leaf NaN/Inf
counts as one int32 array for all the trees (the :data:`penwatch.schema.LEAF_COUNTS` entry). Nothing
is read back there; the monitor's worker reads them asynchronously and
:func:`penwatch.schema.leaf_reports` turns them into the report.
"""

from __future__ import annotations

from typing import Any

from penwatch.penalties import leaf_finite_counts
from penwatch.schema import TreeLeafCounts

__all__ = ["leaf_nonfinite"]


def leaf_nonfinite(**trees: Any) -> TreeLeafCounts:
    """Per-leaf NaN and Inf counts of pytrees, for use inside a compiled step.

    Args:
      **trees: named pytrees, conventionally ``params=...`` and ``grads=...``.

    Returns:
      a :class:`~penwatch.schema.TreeLeafCounts`: reads as ``{name: LeafCounts}``,
      each ``{path: (nan_count, inf_count)}`` (paths from ``jax.tree_util.keystr``),
      over one ``int32[n, 2]`` array for all the trees, in the order given. Non-floating
      leaves are left out. Put it in the step's metrics under ``"_leaf_nonfinite"``;
      the monitor reads it asynchronously (one host copy per step).

    Example:
      >>> import jax.numpy as jnp
      >>> out = leaf_nonfinite(params={"w": jnp.array([1.0, jnp.nan])})
      >>> [int(c) for c in out["params"]["['w']"]]
      [1, 0]
    """
    return TreeLeafCounts.pack({name: leaf_finite_counts(tree) for name, tree in trees.items()})
