"""Closed-form value and gradient of parameter-only penalty terms (L1, L2, elastic net).

A term that depends on the parameters alone needs no backward pass: its gradient is known
in closed form (``strength·sign(θ)``, ``2·strength·θ``, …). :func:`l1_term`, :func:`l2_term`
and :func:`elastic_net_term` build such terms for
:func:`penwatch.diagnostics.gradient_diagnostics`. They match ``penwatch.penalties``'
``l1`` / ``l2`` / ``elastic_net`` with ``reduction="sum"``, summed over the selected leaves.

A term is a JAX pytree: its ``weight`` (and ``l1_ratio``) are leaves, so a jitted function
that receives it does not recompile when the weight changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from penwatch import penalties
from penwatch._checks import check_finite_real, check_in_range

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None

_KINDS = ("l1", "l2", "elastic_net")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ParamTerm:
    """A weighted penalty of the parameters alone, with a closed-form gradient.

    .. math::
        T(θ) = w · \\sum_{k \\in mask} \\big(r |θ_k| + (1 - r) θ_k^2\\big)

    with ``r = 1`` for L1, ``r = 0`` for L2 and ``r = l1_ratio`` for elastic net. The
    gradient is ``w · (r · sign(θ) + 2 (1 - r) θ)`` on the selected entries, 0 elsewhere;
    ``sign(0) = 0`` (the subgradient that ``penwatch.penalties`` uses).

    Build one with :func:`l1_term`, :func:`l2_term` or :func:`elastic_net_term`.

    Attributes:
      weight: the strength ``w`` (a pytree leaf: data, not structure).
      l1_ratio: the mixing ratio ``r`` (a leaf; ``None`` for L1 and L2).
      mask: ``None`` (every floating leaf), or a pytree of booleans (or boolean arrays,
        broadcast element-wise) that is a prefix of the parameters (a leaf).
      kind: ``"l1"``, ``"l2"`` or ``"elastic_net"`` (static).
      mask_fn: a callable ``params -> mask`` (static), as in ``optax.masked``.
    """

    weight: jax.Array | float
    l1_ratio: jax.Array | float | None = None
    mask: PyTree = None
    kind: Literal["l1", "l2", "elastic_net"] = dataclasses.field(
        default="l2", metadata={"static": True}
    )
    mask_fn: Callable[[PyTree], PyTree] | None = dataclasses.field(
        default=None, metadata={"static": True}
    )

    def _ratio(self) -> jax.Array | float:
        if self.kind == "l1":
            return 1.0
        if self.kind == "l2":
            return 0.0
        return self.l1_ratio

    def _leaf_masks(self, params: PyTree) -> list[Any]:
        """One mask per parameter leaf: ``True``/``False`` or a boolean array."""
        leaves = jax.tree.leaves(params)
        mask = self.mask_fn(params) if self.mask_fn is not None else self.mask
        if mask is None:
            return [True] * len(leaves)
        try:
            full = jax.tree.broadcast(mask, params)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{self.kind}_term: mask must be a pytree of booleans whose structure is a "
                f"prefix of the parameters' structure {jax.tree.structure(params)}; "
                f"got {jax.tree.structure(mask)}"
            ) from err
        return jax.tree.leaves(full)

    def value(self, params: PyTree) -> jax.Array:
        """The term's value ``T(θ)`` (a scalar)."""
        return self.value_and_grad(params)[0]

    def grad(self, params: PyTree) -> PyTree:
        """The term's gradient, a pytree shaped like ``params`` (no autodiff)."""
        return self.value_and_grad(params)[1]

    def value_and_grad(self, params: PyTree) -> tuple[jax.Array, PyTree]:
        """The value and closed-form gradient, computed element-wise in one sweep."""
        leaves, treedef = jax.tree.flatten(params)
        masks = self._leaf_masks(params)
        ratio = self._ratio()
        total = None
        grads = []
        for leaf, m in zip(leaves, masks, strict=True):
            leaf = jnp.asarray(leaf)
            if not jnp.issubdtype(leaf.dtype, jnp.inexact) or (m is False):
                grads.append(_zero_grad(leaf))
                continue
            w = jnp.asarray(self.weight, leaf.dtype)
            r = jnp.asarray(ratio, leaf.dtype)
            keep = jnp.asarray(m, bool)
            kept = jnp.where(keep, leaf, 0)  # the value is autodiff-consistent too
            val_k = jnp.zeros((), leaf.dtype)
            grad_k = jnp.zeros_like(leaf)
            if self.kind != "l2":
                val_k = val_k + r * penalties.l1(kept)
                grad_k = grad_k + r * jnp.sign(leaf)
            if self.kind != "l1":
                val_k = val_k + (1 - r) * penalties.l2(kept)
                grad_k = grad_k + 2 * (1 - r) * leaf
            grads.append(jnp.where(keep, w * grad_k, 0).astype(leaf.dtype))
            val_k = w * val_k
            total = val_k if total is None else total + val_k
        if total is None:
            total = jnp.zeros((), jnp.result_type(float))
        return total, jax.tree.unflatten(treedef, grads)


def _zero_grad(leaf: jax.Array) -> jax.Array:
    """A zero cotangent: float0 for integer leaves (as ``jax.vjp`` gives), else zeros."""
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


def _split_mask(mask: Mask) -> tuple[PyTree, Callable[[PyTree], PyTree] | None]:
    """A callable mask is static structure; a pytree mask is data."""
    if callable(mask) and not isinstance(mask, jax.Array | np.ndarray | bool):
        return None, mask
    return mask, None


def l1_term(weight: jax.typing.ArrayLike, *, mask: Mask = None) -> ParamTerm:
    """An L1 penalty of the parameters, ``weight · Σ|θ|``, with gradient ``weight·sign(θ)``.

    Args:
      weight: the strength (a finite real; negative allowed).
      mask: ``None`` (all floating leaves), a pytree of booleans / boolean arrays that is
        a prefix of the parameters, or a callable ``params -> mask`` (as ``optax.masked``),
        e.g. ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)`` for matrices only.

    Returns:
      A :class:`ParamTerm`.
    """
    check_finite_real(
        "penwatch.diagnostics.l1_term", "weight", weight, allow_traced=True, label="argument"
    )
    data, mask_fn = _split_mask(mask)
    return ParamTerm(weight=weight, mask=data, kind="l1", mask_fn=mask_fn)


def l2_term(weight: jax.typing.ArrayLike, *, mask: Mask = None) -> ParamTerm:
    """An L2 penalty of the parameters, ``weight · Σθ²``, with gradient ``2·weight·θ``.

    Args:
      weight: the strength (a finite real; negative allowed).
      mask: as in :func:`l1_term`.

    Returns:
      A :class:`ParamTerm`.
    """
    check_finite_real(
        "penwatch.diagnostics.l2_term", "weight", weight, allow_traced=True, label="argument"
    )
    data, mask_fn = _split_mask(mask)
    return ParamTerm(weight=weight, mask=data, kind="l2", mask_fn=mask_fn)


def elastic_net_term(
    weight: jax.typing.ArrayLike, l1_ratio: jax.typing.ArrayLike = 0.5, *, mask: Mask = None
) -> ParamTerm:
    """An elastic-net penalty ``weight · (r Σ|θ| + (1 - r) Σθ²)`` of the parameters.

    The gradient is ``weight · (r·sign(θ) + 2(1 - r)·θ)``.

    Args:
      weight: the strength (a finite real; negative allowed).
      l1_ratio: ``r`` in ``[0, 1]``.
      mask: as in :func:`l1_term`.

    Returns:
      A :class:`ParamTerm`.
    """
    fn = "penwatch.diagnostics.elastic_net_term"
    check_finite_real(fn, "weight", weight, allow_traced=True, label="argument")
    check_in_range(fn, "l1_ratio", l1_ratio, 0.0, 1.0, allow_traced=True, label="argument")
    data, mask_fn = _split_mask(mask)
    return ParamTerm(
        weight=weight, l1_ratio=l1_ratio, mask=data, kind="elastic_net", mask_fn=mask_fn
    )
