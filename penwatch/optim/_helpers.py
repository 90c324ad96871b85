"""Seed-style helpers: take an optax optimizer, return it with a gradient transform added.

Each ``add_*`` helper returns ``optax.chain(transform, optimizer)``: the gradient-level
transform sees the raw gradient *before* the optimizer. Helpers compose by nesting, and
the helper applied **last** runs **first**::

    opt = add_gradient_centralization(add_l2_decay(add_gradient_clipping(adam, 1.0), 0.01))
    # gradient -> centralize -> + 0.01·w -> clip to norm 1 -> adam

The decay helpers also take ``decoupled=True`` (AdamW style): the decay is then added
*after* the optimizer, scaled by ``learning_rate`` only, instead of going through the
optimizer's rescaling. See :mod:`penwatch.optim._decay` for the formulas and when the
difference matters (adaptive optimizers: yes; plain SGD: no).
"""

from __future__ import annotations

from typing import Any

import optax

from penwatch import _checks
from penwatch.optim._decay import (
    LearningRate,
    Mask,
    check_learning_rate,
    decoupled_elastic_net_decay,
    decoupled_l1_decay,
    decoupled_l2_decay,
    elastic_net_decay,
    l1_decay,
)

__all__ = [
    "add_adaptive_gradient_clipping",
    "add_elastic_net_decay",
    "add_gradient_centralization",
    "add_gradient_clipping",
    "add_gradient_noise",
    "add_l1_decay",
    "add_l2_decay",
]

_OPTIMIZER_HELP = "an optax GradientTransformation (e.g. optax.adam(1e-3))"


def _check_optimizer(fn: str, optimizer: Any) -> optax.GradientTransformation:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise _checks.option_error(fn, "optimizer", optimizer, _OPTIMIZER_HELP, label="argument")
    return optimizer


def _decay_chain(
    fn: str,
    optimizer: optax.GradientTransformation,
    coupled: optax.GradientTransformation,
    decoupled: bool,
    make_decoupled: Any,
    learning_rate: LearningRate | None,
) -> optax.GradientTransformationExtraArgs:
    decoupled = _checks.check_bool(fn, "decoupled", decoupled)
    if decoupled:
        if learning_rate is None:
            raise ValueError(
                f"{fn}: option 'learning_rate' is required with decoupled=True (the decay "
                "is scaled by the learning rate, AdamW style), got None"
            )
        check_learning_rate(fn, learning_rate)
        return optax.chain(optimizer, make_decoupled(learning_rate))
    if learning_rate is not None:
        raise ValueError(
            f"{fn}: option 'learning_rate' only applies with decoupled=True, got "
            f"{_checks.format_value(learning_rate)} with decoupled=False"
        )
    return optax.chain(coupled, optimizer)


def add_l2_decay(
    optimizer: optax.GradientTransformation,
    decay: float = 0.01,
    *,
    decoupled: bool = False,
    learning_rate: LearningRate | None = None,
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Add L2 weight decay ``decay·w``, using :func:`optax.add_decayed_weights`.

    Coupled (default): ``g + decay·w`` is fed to the optimizer. Decoupled (AdamW):
    ``u_opt - lr·decay·w``; ``add_l2_decay(optax.adam(lr), λ, decoupled=True,
    learning_rate=lr)`` equals ``optax.adamw(lr, weight_decay=λ)``.

    Args:
      optimizer: the optax optimizer to wrap.
      decay: ``λ ≥ 0``.
      decoupled: apply the decay after the optimizer, scaled by ``learning_rate``.
      learning_rate: required with ``decoupled=True``: float or optax schedule.
      mask: optional leaf mask, as in :func:`optax.masked`.

    Returns:
      An optax transformation (``update`` needs ``params``).
    """
    fn = "penwatch.optim.add_l2_decay"
    _check_optimizer(fn, optimizer)
    decay = _checks.check_nonnegative(fn, "decay", decay)
    return _decay_chain(
        fn,
        optimizer,
        optax.add_decayed_weights(decay, mask),
        decoupled,
        lambda lr: decoupled_l2_decay(decay, lr, mask=mask),
        learning_rate,
    )


def add_l1_decay(
    optimizer: optax.GradientTransformation,
    decay: float = 0.001,
    *,
    decoupled: bool = False,
    learning_rate: LearningRate | None = None,
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Add L1 decay ``decay·sign(w)`` (sparsity), coupled or decoupled.

    Args:
      optimizer: the optax optimizer to wrap.
      decay: ``λ ≥ 0``.
      decoupled: apply the decay after the optimizer, scaled by ``learning_rate``.
      learning_rate: required with ``decoupled=True``.
      mask: optional leaf mask.

    Returns:
      An optax transformation (``update`` needs ``params``).
    """
    fn = "penwatch.optim.add_l1_decay"
    _check_optimizer(fn, optimizer)
    decay = _checks.check_nonnegative(fn, "decay", decay)
    return _decay_chain(
        fn,
        optimizer,
        l1_decay(decay, mask=mask),
        decoupled,
        lambda lr: decoupled_l1_decay(decay, lr, mask=mask),
        learning_rate,
    )


def add_elastic_net_decay(
    optimizer: optax.GradientTransformation,
    decay: float = 0.01,
    l1_ratio: float = 0.5,
    *,
    decoupled: bool = False,
    learning_rate: LearningRate | None = None,
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Add elastic-net decay ``decay·(l1_ratio·sign(w) + (1 - l1_ratio)·w)``.

    Args:
      optimizer: the optax optimizer to wrap.
      decay: ``λ ≥ 0``.
      l1_ratio: in ``[0, 1]``.
      decoupled: apply the decay after the optimizer, scaled by ``learning_rate``.
      learning_rate: required with ``decoupled=True``.
      mask: optional leaf mask.

    Returns:
      An optax transformation (``update`` needs ``params``).
    """
    fn = "penwatch.optim.add_elastic_net_decay"
    _check_optimizer(fn, optimizer)
    decay = _checks.check_nonnegative(fn, "decay", decay)
    l1_ratio = _checks.check_in_range(fn, "l1_ratio", l1_ratio, 0.0, 1.0)
    return _decay_chain(
        fn,
        optimizer,
        elastic_net_decay(decay, l1_ratio, mask=mask),
        decoupled,
        lambda lr: decoupled_elastic_net_decay(decay, l1_ratio, lr, mask=mask),
        learning_rate,
    )


def add_gradient_clipping(
    optimizer: optax.GradientTransformation, max_norm: float = 1.0
) -> optax.GradientTransformationExtraArgs:
    """Clip the gradient to global norm ``max_norm`` (:func:`optax.clip_by_global_norm`).

    .. math:: g \\leftarrow g \\cdot \\min\\big(1, \\text{max\\_norm} / \\lVert g \\rVert_2\\big)

    Args:
      optimizer: the optax optimizer to wrap.
      max_norm: ``> 0``; the global ℓ2 norm over all leaves never exceeds it.

    Returns:
      An optax transformation.
    """
    fn = "penwatch.optim.add_gradient_clipping"
    _check_optimizer(fn, optimizer)
    max_norm = _checks.check_positive(fn, "max_norm", max_norm)
    return optax.chain(optax.clip_by_global_norm(max_norm), optimizer)


def add_gradient_noise(
    optimizer: optax.GradientTransformation,
    variance: float = 0.01,
    decay: float = 0.55,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Add annealed Gaussian noise to the gradient (:func:`optax.add_noise`).

    .. math:: g_t \\leftarrow g_t + \\mathcal{N}\\big(0,\\ \\sigma^2_t\\big), \\qquad
       \\sigma^2_t = \\frac{\\text{variance}}{(1 + t)^{\\text{decay}}}

    with ``t = 0`` at the first update. The noise stream is fixed by ``seed``: the same
    seed and gradients give the same updates.

    Args:
      optimizer: the optax optimizer to wrap.
      variance: base variance ``η ≥ 0``.
      decay: annealing exponent ``γ ≥ 0`` (0.55 in the paper).
      seed: integer PRNG seed.

    Returns:
      An optax transformation.

    References:
      Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep
      Networks", 2015.
    """
    fn = "penwatch.optim.add_gradient_noise"
    _check_optimizer(fn, optimizer)
    variance = _checks.check_nonnegative(fn, "variance", variance)
    decay = _checks.check_nonnegative(fn, "decay", decay)
    seed = _checks.check_int(fn, "seed", seed)
    return optax.chain(optax.add_noise(variance, decay, key=seed), optimizer)


def add_adaptive_gradient_clipping(
    optimizer: optax.GradientTransformation,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive gradient clipping (AGC, :func:`optax.adaptive_grad_clip`).

    Unit-wise (per output unit of each leaf, the whole leaf for scalars/vectors):

    .. math:: g_u \\leftarrow g_u \\cdot \\min\\Big(1,\\
       \\frac{c\\,\\max(\\lVert w_u\\rVert, \\epsilon)}{\\lVert g_u \\rVert}\\Big)

    so every unit's gradient norm is at most ``clip_factor·max(‖w_u‖, eps)``.

    Args:
      optimizer: the optax optimizer to wrap.
      clip_factor: ``c > 0``.
      eps: ``> 0``; floor on the parameter norm (zero-initialised parameters).

    Returns:
      An optax transformation (``update`` needs ``params``).

    References:
      Brock et al., "High-Performance Large-Scale Image Recognition Without
      Normalization", 2021.
    """
    fn = "penwatch.optim.add_adaptive_gradient_clipping"
    _check_optimizer(fn, optimizer)
    clip_factor = _checks.check_positive(fn, "clip_factor", clip_factor)
    eps = _checks.check_positive(fn, "eps", eps)
    return optax.chain(optax.adaptive_grad_clip(clip_factor, eps), optimizer)


def add_gradient_centralization(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Gradient centralization (:func:`optax.centralize`).

    For every leaf with ``ndim > 1``, subtract the mean over all axes but the first:
    ``g[i] ← g[i] - mean(g[i])``; vectors and scalars are left unchanged.

    Args:
      optimizer: the optax optimizer to wrap.

    Returns:
      An optax transformation.

    References:
      Yong et al., "Gradient Centralization: A New Optimization Technique for Deep
      Neural Networks", 2020.
    """
    _check_optimizer("penwatch.optim.add_gradient_centralization", optimizer)
    return optax.chain(optax.centralize(), optimizer)
