"""Weight-norm penalties: L1 (lasso), L2 (ridge) and elastic net."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from penwatch import _checks
from penwatch.penalties import _common


def l1(x: ArrayLike, *, strength: Any = 1.0, reduction: str = "sum") -> jax.Array:
    r"""L1 (lasso) penalty: sparsity-inducing absolute-value norm.

    .. math::
      \mathrm{l1}(x) = s \cdot \mathrm{reduce}(|x|)

    The gradient at ``x = 0`` is ``sign(0) = 0``.

    Args:
      x: array of any shape. Integer/bool input is promoted to the default float dtype.
      strength: multiplier ``s``, a finite real (negative allowed; may be traced).
      reduction: ``"sum"`` (default), ``"mean"`` or ``"none"`` (element-wise values).

    Returns:
      A scalar, or an array of ``x.shape`` for ``reduction="none"``, in ``x``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import l1
      >>> float(l1(jnp.array([1.0, -2.0, 3.0, 0.5])))
      6.5

    References:
      Tibshirani, *Regression Shrinkage and Selection via the Lasso*, 1996.
    """
    fn = "penwatch.l1"
    strength = _common.check_strength(fn, strength)
    reduction = _common.check_reduction(fn, reduction)
    x = _common.as_float(fn, "x", x)
    out = _common.reduce(_common.abs_(_common.upcast(x)), reduction)
    return _common.scale(out, strength).astype(x.dtype)


def l2(
    x: ArrayLike,
    *,
    strength: Any = 1.0,
    reduction: str = "sum",
    center: Any = None,
    clip: Any = None,
) -> jax.Array:
    r"""L2 (ridge) penalty: squared Euclidean norm, optionally centered and clipped.

    .. math::
      \mathrm{l2}(x) = s \cdot \mathrm{reduce}\big(\mathrm{clip}(x - c, -v, v)^2\big)

    Centering happens before clipping.

    Args:
      x: array of any shape. Integer/bool input is promoted to the default float dtype.
      strength: multiplier ``s``, a finite real (negative allowed; may be traced).
      reduction: ``"sum"`` (default), ``"mean"`` or ``"none"`` (element-wise values).
      center: ``None`` (no centering), ``"mean"`` (subtract the mean of all elements of
        ``x``) or a finite number ``c`` to subtract.
      clip: ``None`` or ``v > 0``: clip the (centered) values to ``[-v, v]``.

    Returns:
      A scalar, or an array of ``x.shape`` for ``reduction="none"``, in ``x``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import l2
      >>> round(float(l2(jnp.array([1.0, -2.0, 3.0, 0.5]), strength=0.01)), 6)
      0.1425

    References:
      Hoerl and Kennard, *Ridge Regression: Biased Estimation for Nonorthogonal
      Problems*, 1970.
    """
    fn = "penwatch.l2"
    strength = _common.check_strength(fn, strength)
    reduction = _common.check_reduction(fn, reduction)
    if center is not None and not (isinstance(center, str) and center == "mean"):
        if isinstance(center, str):
            raise _checks.option_error(fn, "center", center, "None, 'mean' or a finite number")
        try:
            center = _checks.check_finite_real(fn, "center", center)
        except ValueError:
            raise _checks.option_error(
                fn, "center", center, "None, 'mean' or a finite number"
            ) from None
    if clip is not None:
        clip = _checks.check_positive(fn, "clip", clip)
    x = _common.as_float(fn, "x", x)
    y = _common.upcast(x)
    if center == "mean":
        y = y - jnp.mean(y)
    elif center is not None:
        y = y - center
    if clip is not None:
        y = jnp.clip(y, -clip, clip)
    out = _common.reduce(y * y, reduction)
    return _common.scale(out, strength).astype(x.dtype)


def elastic_net(
    x: ArrayLike,
    *,
    strength: Any = 1.0,
    l1_ratio: Any = 0.5,
    reduction: str = "sum",
) -> jax.Array:
    r"""Elastic-net penalty: a convex mix of L1 and squared L2.

    .. math::
      \mathrm{en}(x) = s \cdot \big(r \cdot \mathrm{reduce}(|x|)
        + (1 - r) \cdot \mathrm{reduce}(x^2)\big)

    Args:
      x: array of any shape. Integer/bool input is promoted to the default float dtype.
      strength: multiplier ``s``, a finite real (negative allowed; may be traced).
      l1_ratio: ``r`` in ``[0, 1]``; 1 is pure L1, 0 pure squared L2 (may be traced).
      reduction: ``"sum"`` (default), ``"mean"`` or ``"none"`` (element-wise values).

    Returns:
      A scalar, or an array of ``x.shape`` for ``reduction="none"``, in ``x``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import elastic_net
      >>> float(elastic_net(jnp.array([1.0, -2.0, 3.0, 0.5]), l1_ratio=0.5))
      10.375

    References:
      Zou and Hastie, *Regularization and Variable Selection via the Elastic Net*, 2005.
    """
    fn = "penwatch.elastic_net"
    strength = _common.check_strength(fn, strength)
    l1_ratio = _checks.check_in_range(fn, "l1_ratio", l1_ratio, 0.0, 1.0, allow_traced=True)
    reduction = _common.check_reduction(fn, reduction)
    x = _common.as_float(fn, "x", x)
    y = _common.upcast(x)
    r = jnp.asarray(l1_ratio, y.dtype)
    out = r * _common.reduce(_common.abs_(y), reduction) + (1 - r) * _common.reduce(
        y * y, reduction
    )
    return _common.scale(out, strength).astype(x.dtype)
