"""Per-penalty input-gradient norms in one pass: one forward, vectorized backward passes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["grad_norms"]


def _accumulation_dtype(dtype: Any) -> Any:
    # Sums of squares of bf16/f16 gradients are accumulated in (at least) float32.
    return jnp.promote_types(dtype, jnp.float32)


def grad_norms(
    fns: Sequence[Callable[[Any], ArrayLike]],
    inputs: Any,
    *,
    weights: ArrayLike | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array | None]:
    r"""Values of scalar functions and the norms of their gradients, in one pass.

    With :math:`v(x) = (f_1(x), \dots, f_k(x))` one forward pass builds the VJP of
    :math:`v`; the VJP is then ``vmap``-ed over the identity basis :math:`e_1..e_k` of
    cotangents (plus the row :math:`w` when weights are given), which gives every
    :math:`\nabla f_i(x)` and :math:`\sum_i w_i \nabla f_i(x)` from one vectorized
    backward pass:

    .. math::
      n_i = \lVert \nabla_x f_i(x) \rVert_2, \qquad
      n_{\mathrm{total}} = \Big\lVert \sum_i w_i \nabla_x f_i(x) \Big\rVert_2

    The total needs no separate backward pass: the VJP is linear in its cotangent, so the
    weighted combination of the per-function gradients is its value at :math:`w`, one
    more row of the same batch. Norms run over every inexact (floating) leaf of ``inputs``
    together; integer/bool leaves are treated as constants. Norms are accumulated in at
    least float32.

    Args:
      fns: ``k >= 1`` functions, each mapping ``inputs`` to a scalar.
      inputs: an array or a pytree of arrays.
      weights: optional ``[k]`` weights for the combined norm.

    Returns:
      ``(values, norms, total_norm)``: the ``k`` values (each in its function's own dtype),
      a ``[k]`` array of gradient norms, and the norm of the weighted sum of the gradients
      (None when ``weights`` is None).

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.pipeline import grad_norms
      >>> x = jnp.array([3.0, 4.0])
      >>> values, norms, total = grad_norms(
      ...     [lambda x: jnp.sum(x**2), lambda x: jnp.sum(x)], x, weights=jnp.array([1.0, 0.0]))
      >>> [round(float(n), 4) for n in norms], round(float(total), 4)
      ([10.0, 1.4142], 10.0)
    """
    fns = tuple(fns)
    if not fns:
        raise ValueError("penwatch.pipeline.grad_norms: argument 'fns' must not be empty")
    leaves, treedef = jax.tree.flatten(inputs)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    diff_pos = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.inexact)]

    def stacked(diff_leaves: list[jax.Array]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        full = list(leaves)
        for pos, leaf in zip(diff_pos, diff_leaves, strict=True):
            full[pos] = leaf
        xs = jax.tree.unflatten(treedef, full)
        values = tuple(jnp.asarray(fn(xs)) for fn in fns)
        for i, value in enumerate(values):
            if value.shape != ():
                raise ValueError(
                    f"penwatch.pipeline.grad_norms: function {i} returned shape "
                    f"{value.shape}; every function must return a scalar"
                )
        dtype = jnp.result_type(*values)
        return jnp.stack([v.astype(dtype) for v in values]), values

    diff_leaves = [leaves[i] for i in diff_pos]
    vector, vjp_fn, values = jax.vjp(stacked, diff_leaves, has_aux=True)
    k = len(fns)
    basis = jnp.eye(k, dtype=vector.dtype)
    if weights is not None:
        w = jnp.asarray(weights)
        if w.shape != (k,):
            raise ValueError(
                f"penwatch.pipeline.grad_norms: argument 'weights' must have shape ({k},), "
                f"got {w.shape}"
            )
        # The VJP is linear in the cotangent: at cotangent w it is sum_i w_i grad_i, the
        # gradient of the weighted total, computed as one more row of the same batch.
        basis = jnp.concatenate([basis, w.astype(vector.dtype)[None, :]], axis=0)
    (grads,) = jax.vmap(vjp_fn)(basis)  # each leaf: [rows, *leaf.shape]
    acc = _accumulation_dtype(vector.dtype)
    # One reduction per row (not one [rows, n] reduction): XLA fuses each row's read.
    sq = [jnp.zeros((), acc) for _ in range(basis.shape[0])]
    for g in grads:
        g = g.astype(jnp.promote_types(g.dtype, acc))
        for row in range(basis.shape[0]):
            sq[row] = sq[row] + jnp.sum(jnp.square(g[row]))
    row_norms = jnp.sqrt(jnp.stack(sq))
    if weights is None:
        return values, row_norms, None
    return values, row_norms[:k], row_norms[k]
