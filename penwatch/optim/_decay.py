"""Weight-decay gradient transformations that optax lacks: L1 and elastic net.

optax ships L2 decay (:func:`optax.add_decayed_weights`); penwatch adds the L1 and
elastic-net counterparts, each in two forms:

* **coupled** (:func:`l1_decay`, :func:`elastic_net_decay`): the decay term is added to
  the *gradient*, so it is placed *before* the optimizer in an :func:`optax.chain` and
  goes through the optimizer's rescaling (Adam divides it by ``sqrt(v)``);
* **decoupled** (:func:`decoupled_l1_decay`, :func:`decoupled_l2_decay`,
  :func:`decoupled_elastic_net_decay`, AdamW style): the decay is added to the
  optimizer's *update*, scaled by the learning rate only, so it is placed *after* the
  optimizer and every parameter decays at the same rate whatever its gradient history.

For plain SGD the two forms give the same update; for adaptive optimizers they differ.

Conventions (``w`` the parameter, ``λ`` the decay, ``r`` the L1 ratio):

* L2: ``g + λ·w`` — the gradient of ``λ/2·‖w‖²`` (optax's convention). The penalty
  ``penwatch.l2(w, strength=s) = s·Σw²`` has gradient ``2·s·w``, so L2 decay ``λ``
  equals the ``l2`` penalty with ``strength = λ/2``.
* L1: ``g + λ·sign(w)``, ``sign(0) = 0`` — the gradient of ``penwatch.l1(w,
  strength=λ)``.
* elastic net: ``g + λ·(r·sign(w) + (1 - r)·w)`` — the gradient of
  ``λ·(r·‖w‖₁ + (1 - r)/2·‖w‖²)``. The penalty ``penwatch.elastic_net(w, strength=s,
  l1_ratio=r) = s·(r·Σ|w| + (1 - r)·Σw²)`` has gradient ``s·(r·sign(w) + 2(1 - r)·w)``:
  the L1 parts agree for ``λ = s``, the L2 part of the decay is half the penalty's
  (the same factor 1/2 as the L2 convention above).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from penwatch import _checks

__all__ = [
    "DecoupledDecayState",
    "decoupled_elastic_net_decay",
    "decoupled_l1_decay",
    "decoupled_l2_decay",
    "elastic_net_decay",
    "l1_decay",
]

LearningRate = float | Callable[[jax.Array], jax.Array]
Mask = Any  # a pytree of bools matching params, or a callable params -> such a pytree


class DecoupledDecayState(NamedTuple):
    """State of a decoupled decay: the number of updates applied so far."""

    count: jax.Array  # int32 scalar; the learning-rate schedule is evaluated at it


def check_learning_rate(fn: str, learning_rate: Any) -> LearningRate:
    """Check a learning rate: a finite real ``> 0`` or a schedule (callable of the step)."""
    if callable(learning_rate):
        return learning_rate
    return _checks.check_finite_real(
        fn,
        "learning_rate",
        learning_rate,
        min=0,
        inclusive=False,
    )


def _require_params(fn_name: str, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"{fn_name}: `params` is required: the decay depends on the parameters, so "
            "call `update(updates, state, params)` with the current parameters."
        )


def _l1_direction(w: jax.Array) -> jax.Array:
    return jnp.sign(w)


def _l2_direction(w: jax.Array) -> jax.Array:
    return w


def _elastic_direction(l1_ratio: float) -> Callable[[jax.Array], jax.Array]:
    def direction(w: jax.Array) -> jax.Array:
        return l1_ratio * jnp.sign(w) + (1.0 - l1_ratio) * w

    return direction


def _maybe_mask(tx: optax.GradientTransformation, mask: Mask | None):
    return tx if mask is None else optax.masked(tx, mask)


def _coupled(
    fn_name: str, decay: float, direction: Callable[[jax.Array], jax.Array], mask: Mask | None
) -> optax.GradientTransformation:
    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None):
        _require_params(fn_name, params)
        updates = jax.tree.map(
            lambda g, w: g + (decay * direction(w)).astype(g.dtype), updates, params
        )
        return updates, state

    return _maybe_mask(optax.GradientTransformation(init_fn, update_fn), mask)


def _decoupled(
    fn_name: str,
    decay: float,
    direction: Callable[[jax.Array], jax.Array],
    learning_rate: LearningRate,
    mask: Mask | None,
) -> optax.GradientTransformation:
    def init_fn(params: Any) -> DecoupledDecayState:
        del params
        return DecoupledDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: DecoupledDecayState, params: Any = None):
        _require_params(fn_name, params)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree.map(
            lambda u, w: u - (lr * decay * direction(w)).astype(u.dtype), updates, params
        )
        return updates, DecoupledDecayState(count=optax.safe_increment(state.count))

    return _maybe_mask(optax.GradientTransformation(init_fn, update_fn), mask)


def l1_decay(decay: float = 0.001, *, mask: Mask | None = None) -> optax.GradientTransformation:
    """Coupled L1 decay: add ``decay·sign(w)`` to the gradient.

    .. math:: g \\leftarrow g + \\lambda\\,\\operatorname{sign}(w),
       \\qquad \\operatorname{sign}(0) = 0

    This is the (sub)gradient of ``penwatch.l1(w, strength=decay)``. Place it before the
    optimizer (``optax.chain(l1_decay(1e-3), optax.adam(1e-3))``), or use
    :func:`penwatch.optim.add_l1_decay`.

    Args:
      decay: ``λ ≥ 0``, finite.
      mask: optional pytree of bools (or a callable ``params -> pytree``) selecting the
        leaves to decay, as in :func:`optax.masked`.

    Returns:
      An :class:`optax.GradientTransformation`; its ``update`` requires ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, penwatch as pw
      >>> tx = pw.optim.l1_decay(0.1)
      >>> w = {"a": jnp.array([-2.0, 0.0, 3.0])}
      >>> u, _ = tx.update({"a": jnp.zeros(3)}, tx.init(w), w)
      >>> u["a"].tolist()
      [-0.10000000149011612, 0.0, 0.10000000149011612]

    References:
      Tibshirani, "Regression Shrinkage and Selection via the Lasso", 1996.
    """
    decay = _checks.check_nonnegative("penwatch.optim.l1_decay", "decay", decay)
    return _coupled("penwatch.optim.l1_decay", float(decay), _l1_direction, mask)


def elastic_net_decay(
    decay: float = 0.01, l1_ratio: float = 0.5, *, mask: Mask | None = None
) -> optax.GradientTransformation:
    """Coupled elastic-net decay: add ``decay·(l1_ratio·sign(w) + (1 - l1_ratio)·w)``.

    .. math:: g \\leftarrow g + \\lambda\\,\\big(r\\,\\operatorname{sign}(w) + (1-r)\\,w\\big)

    This is the gradient of ``λ·(r·‖w‖₁ + (1-r)/2·‖w‖²)``: ``l1_ratio=1`` is
    :func:`l1_decay`, ``l1_ratio=0`` is :func:`optax.add_decayed_weights`. Compared with
    the *penalty* ``penwatch.elastic_net(w, strength=λ, l1_ratio=r)``, whose gradient is
    ``λ·(r·sign(w) + 2(1-r)·w)``, the L2 part here is half as strong (optax's ``λ/2·w²``
    convention for decay).

    Args:
      decay: ``λ ≥ 0``, finite.
      l1_ratio: ``r`` in ``[0, 1]``.
      mask: optional leaf mask, as in :func:`optax.masked`.

    Returns:
      An :class:`optax.GradientTransformation`; its ``update`` requires ``params``.

    References:
      Zou & Hastie, "Regularization and variable selection via the elastic net", 2005.
    """
    decay = _checks.check_nonnegative("penwatch.optim.elastic_net_decay", "decay", decay)
    l1_ratio = _checks.check_in_range(
        "penwatch.optim.elastic_net_decay", "l1_ratio", l1_ratio, 0.0, 1.0
    )
    return _coupled(
        "penwatch.optim.elastic_net_decay", float(decay), _elastic_direction(float(l1_ratio)), mask
    )


def decoupled_l2_decay(
    decay: float, learning_rate: LearningRate, *, mask: Mask | None = None
) -> optax.GradientTransformation:
    """Decoupled (AdamW-style) L2 decay: ``u ← u - lr_t·decay·w``, placed after the optimizer.

    .. math:: u \\leftarrow u - \\eta_t\\,\\lambda\\,w

    ``η_t`` is ``learning_rate`` (a float, or an optax schedule evaluated at the number of
    updates applied so far, as :func:`optax.scale_by_learning_rate` does).
    ``optax.chain(optax.adam(lr), decoupled_l2_decay(λ, lr))`` is ``optax.adamw(lr,
    weight_decay=λ)``.

    Args:
      decay: ``λ ≥ 0``, finite.
      learning_rate: the optimizer's learning rate (float > 0 or schedule).
      mask: optional leaf mask, as in :func:`optax.masked`.

    Returns:
      An :class:`optax.GradientTransformation` with :class:`DecoupledDecayState`.

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019.
    """
    decay = _checks.check_nonnegative("penwatch.optim.decoupled_l2_decay", "decay", decay)
    check_learning_rate("penwatch.optim.decoupled_l2_decay", learning_rate)
    return _decoupled(
        "penwatch.optim.decoupled_l2_decay", float(decay), _l2_direction, learning_rate, mask
    )


def decoupled_l1_decay(
    decay: float, learning_rate: LearningRate, *, mask: Mask | None = None
) -> optax.GradientTransformation:
    """Decoupled L1 decay: ``u ← u - lr_t·decay·sign(w)``, placed after the optimizer.

    Args:
      decay: ``λ ≥ 0``, finite.
      learning_rate: the optimizer's learning rate (float > 0 or schedule).
      mask: optional leaf mask, as in :func:`optax.masked`.

    Returns:
      An :class:`optax.GradientTransformation` with :class:`DecoupledDecayState`.
    """
    decay = _checks.check_nonnegative("penwatch.optim.decoupled_l1_decay", "decay", decay)
    check_learning_rate("penwatch.optim.decoupled_l1_decay", learning_rate)
    return _decoupled(
        "penwatch.optim.decoupled_l1_decay", float(decay), _l1_direction, learning_rate, mask
    )


def decoupled_elastic_net_decay(
    decay: float,
    l1_ratio: float,
    learning_rate: LearningRate,
    *,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    """Decoupled elastic-net decay: ``u ← u - lr_t·decay·(r·sign(w) + (1 - r)·w)``.

    Args:
      decay: ``λ ≥ 0``, finite.
      l1_ratio: ``r`` in ``[0, 1]``.
      learning_rate: the optimizer's learning rate (float > 0 or schedule).
      mask: optional leaf mask, as in :func:`optax.masked`.

    Returns:
      An :class:`optax.GradientTransformation` with :class:`DecoupledDecayState`.
    """
    fn = "penwatch.optim.decoupled_elastic_net_decay"
    decay = _checks.check_nonnegative(fn, "decay", decay)
    l1_ratio = _checks.check_in_range(fn, "l1_ratio", l1_ratio, 0.0, 1.0)
    check_learning_rate(fn, learning_rate)
    return _decoupled(fn, float(decay), _elastic_direction(float(l1_ratio)), learning_rate, mask)
