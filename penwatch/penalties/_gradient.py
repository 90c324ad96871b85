"""Gradient penalties (Lipschitz / smoothness constraints) and their cheap proxy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from penwatch import _checks
from penwatch.penalties import _common

BATCH_COUPLING_WARNING = (
    "interpolated_gradient_penalty differentiates sum(fn(x_hat)) once for the whole "
    "batch; that equals the per-sample gradients only when fn treats samples "
    "independently. Layers that mix samples (batch normalization in training mode, "
    "attention or pooling across the batch) couple them and make the penalty wrong; use "
    "layer normalization in the critic, as the WGAN-GP paper recommends."
)


def _per_sample_norms(g: jax.Array) -> jax.Array:
    return _common.safe_norm(g.reshape(g.shape[0], -1), axis=-1)


def _grad_of_scalar(fn_name: str, fn: Callable, x: jax.Array) -> jax.Array:
    out, vjp = jax.vjp(fn, x)
    if jnp.shape(out) != ():
        raise ValueError(
            f"{fn_name}: 'fn' must return a scalar, got an output of shape {jnp.shape(out)}"
        )
    (g,) = vjp(jnp.ones_like(out))
    return g


def gradient_penalty(
    fn: Callable[[jax.Array], jax.Array],
    x: ArrayLike,
    *,
    target_norm: Any = 1.0,
    per_sample: bool = False,
) -> jax.Array:
    r"""Gradient-norm penalty ``(‖∇f(x)‖₂ - t)²`` (a soft Lipschitz constraint).

    .. math::
      \mathrm{gp}(f, x) = (\|\nabla_x f(x)\|_2 - t)^2

    With ``per_sample=True`` the norm is taken over all axes but the first (one norm per
    sample ``i``) and the squared deviations are averaged over the batch:
    ``mean_i (‖∇_{x_i} f(x)‖ - t)²``. The norm has a zero (not NaN) gradient at a zero
    gradient, so the penalty itself can be differentiated (double backprop).

    Computing it costs a backward pass, and differentiating it a second-order pass: apply
    it every few steps, or use :func:`output_magnitude_penalty` as a cheap proxy.

    Args:
      fn: maps ``x`` to a scalar.
      x: the input to differentiate at (rank >= 1 when ``per_sample=True``).
      target_norm: ``t >= 0`` (may be traced).
      per_sample: per-sample norms averaged over the batch (first axis).

    Returns:
      A scalar in ``x``'s floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import gradient_penalty
      >>> x = jnp.array([3.0, 4.0])
      >>> float(gradient_penalty(lambda v: jnp.sum(v**2) / 2, x))  # (5 - 1)^2
      16.0

    References:
      Gulrajani et al., *Improved Training of Wasserstein GANs*, 2017.
    """
    name = "penwatch.gradient_penalty"
    _checks.check_callable(name, "fn", fn)
    target = _checks.check_nonnegative(name, "target_norm", target_norm, allow_traced=True)
    per_sample = _checks.check_bool(name, "per_sample", per_sample)
    x = _common.as_float(name, "x", x)
    if per_sample:
        _checks.check_ndim(name, "x", x, min_ndim=1)
    g = _common.upcast(_grad_of_scalar(name, fn, x))
    t = jnp.asarray(target, g.dtype)
    if per_sample:
        out = jnp.mean((_per_sample_norms(g) - t) ** 2)
    else:
        out = (_common.safe_norm(g) - t) ** 2
    return out.astype(x.dtype)


def interpolated_gradient_penalty(
    fn: Callable[[jax.Array], jax.Array],
    fake: ArrayLike,
    real: ArrayLike,
    *,
    key: jax.Array,
    target_norm: Any = 1.0,
) -> jax.Array:
    r"""WGAN-GP gradient penalty at random interpolates of fake and real samples.

    .. math::
      \hat x_i = \epsilon_i x^{fake}_i + (1 - \epsilon_i) x^{real}_i, \quad
      \epsilon_i \sim U(0, 1), \qquad
      \mathrm{gp} = \mathrm{mean}_i (\|\nabla_{\hat x_i} f\|_2 - t)^2

    One ``ε`` per sample, drawn in float32 from ``key`` and cast to the inputs' dtype, so
    the result is reproducible for a given key (split your key every step). ``fn`` maps
    the batch to per-sample outputs ``[batch]`` (or a scalar) and penwatch differentiates
    ``sum(fn(x̂))`` once, which yields the per-sample gradients **only when fn treats
    samples independently**: batch-coupling layers (batch norm in training mode,
    cross-sample attention) break this (see ``BATCH_COUPLING_WARNING``).

    Args:
      fn: the critic, ``[batch, ...] -> [batch]`` or a scalar.
      fake: generated samples ``[batch, ...]``.
      real: real samples, same shape.
      key: a JAX PRNG key (``jax.random.key`` or ``PRNGKey``); required.
      target_norm: ``t >= 0`` (may be traced).

    Returns:
      A scalar in the inputs' floating dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from penwatch.penalties import interpolated_gradient_penalty
      >>> critic = lambda x: 2.0 * jnp.sum(x, axis=-1)  # gradient norm 2*sqrt(2)
      >>> fake, real = jnp.zeros((4, 2)), jnp.ones((4, 2))
      >>> gp = interpolated_gradient_penalty(critic, fake, real, key=jax.random.key(0))
      >>> round(float(gp), 4)  # (2*sqrt(2) - 1)^2
      3.3431

    References:
      Gulrajani et al., *Improved Training of Wasserstein GANs*, 2017.
    """
    name = "penwatch.interpolated_gradient_penalty"
    _checks.check_callable(name, "fn", fn)
    target = _checks.check_nonnegative(name, "target_norm", target_norm, allow_traced=True)
    key = _check_key(name, key)
    fake = _common.as_float(name, "fake", fake)
    real = _common.as_float(name, "real", real)
    _checks.check_same_shape(name, "fake", fake, "real", real)
    _checks.check_ndim(name, "fake", fake, min_ndim=1)
    dtype = jnp.result_type(fake.dtype, real.dtype)
    fake, real = fake.astype(dtype), real.astype(dtype)
    batch = fake.shape[0]
    eps_shape = (batch,) + (1,) * (fake.ndim - 1)
    eps = jax.random.uniform(key, eps_shape, dtype=jnp.float32).astype(dtype)
    x_hat = eps * fake + (1 - eps) * real

    def summed(z: jax.Array) -> jax.Array:
        out = fn(z)
        shape = jnp.shape(out)
        if shape not in ((), (batch,)):
            raise ValueError(
                f"{name}: 'fn' must map a batch of {batch} samples to shape ({batch},) "
                f"or a scalar, got an output of shape {shape}"
            )
        return jnp.sum(out)

    g = _common.upcast(jax.grad(summed)(x_hat))
    t = jnp.asarray(target, g.dtype)
    return jnp.mean((_per_sample_norms(g) - t) ** 2).astype(dtype)


def _check_key(fn: str, key: Any) -> jax.Array:
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        return key
    raise _checks.option_error(
        fn, "key", key, "a JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed))"
    )


def output_magnitude_penalty(
    y: ArrayLike, *, target: Any = 1.0, reduction: str = "mean"
) -> jax.Array:
    r"""Output-magnitude penalty: a cheap proxy for a gradient penalty.

    .. math::
      \mathrm{mean}: (\sqrt{\mathrm{mean}(y^2)} - t)^2, \qquad
      \mathrm{sum}: (\sqrt{\textstyle\sum y^2} - t)^2

    The square root has a zero (not NaN) gradient at ``y = 0``.

    Args:
      y: model outputs of any shape.
      target: ``t >= 0`` (may be traced).
      reduction: ``"mean"`` (RMS, default) or ``"sum"`` (Euclidean norm).

    Returns:
      A scalar in ``y``'s floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import output_magnitude_penalty
      >>> float(output_magnitude_penalty(jnp.array([3.0, 4.0]), reduction="sum"))
      16.0
    """
    fn = "penwatch.output_magnitude_penalty"
    target = _checks.check_nonnegative(fn, "target", target, allow_traced=True)
    reduction = _common.check_reduction(fn, reduction, ("mean", "sum"))
    y = _common.as_float(fn, "y", y)
    z = _common.upcast(y)
    sq = jnp.mean(z * z) if reduction == "mean" else jnp.sum(z * z)
    mag = magnitude(sq)
    return ((mag - jnp.asarray(target, z.dtype)) ** 2).astype(y.dtype)


def magnitude(sq: jax.Array) -> jax.Array:
    """``sqrt(sq)`` with a zero gradient at 0 (double where); NaN stays NaN."""
    pos = ~(sq <= 0)
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
