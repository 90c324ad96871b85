r"""Closed-form input gradients of the element-wise built-in penalties.

For ``l1``, ``l2`` (``center``/``clip``), ``elastic_net``, ``entropy``
(``temperature``/``normalize``/``mode``) and ``output_magnitude_penalty`` the gradient
with respect to the input is an element-wise expression of the input and a few scalars
(a mean, per-row sums), so its squared norm is one more reduction over the input, most
of it the penalty's own forward reductions:

.. math::
  \lVert\nabla\,\mathrm{l1}\rVert^2 = c^2\,\#\{x \ne 0\}, \quad
  \lVert\nabla\,\mathrm{en}\rVert^2 = c^2\big(r^2\,\#\{x \ne 0\}
    + 4r(1-r)\textstyle\sum|x| + 4(1-r)^2\sum x^2\big), \quad
  \lVert\nabla\,\mathrm{om}\rVert = 2\,|m - t| / \sqrt{N_{\mathrm{mean}}}

with ``c`` the strength (over ``N`` for ``reduction="mean"``). No gradient is
materialized: :class:`InputGrad` carries the sums of the squared norm and the gradient
as scalars times element-wise bases. ``sign(x)`` and ``x`` are bases shared by
``l1``, ``l2``, ``elastic_net`` and ``output_magnitude``, so a weighted total adds their
coefficients first: its reduction computes ``A sign(x) + B x + ...``, one multiply per
basis instead of one chain per penalty (on XLA:CPU the total's fusion over
``[1024, 256]`` log-probabilities went from ≈ 167 to ≈ 73 µs).

Subgradients follow autodiff through the penalty itself: ``sign(0) = 0``; on the clipping
boundary ``|x - c| = v`` half the gradient passes (``jnp.clip``'s min/max split a tie);
masked entropy terms (``logprob <= -50``) and a zero output magnitude have zero gradient.
Non-finite inputs outside entropy's masked log-probabilities are not covered: there the
closed form's norm can be finite where autodiff's is NaN (the value is non-finite anyway,
which ``P_finite`` reports).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from penwatch.penalties import _common
from penwatch.penalties._divergences import entropy, entropy_mask
from penwatch.penalties._gradient import magnitude, output_magnitude_penalty
from penwatch.penalties._norms import elastic_net, l1, l2

__all__ = ["InputGrad", "has_input_grad", "input_grad"]


SIGN = "sign"
"""A shared basis: ``sign`` of the (upcast) input."""
INPUT = "input"
"""A shared basis: the (upcast) input itself."""

Basis = str | jax.Array
"""One element-wise factor of a gradient: :data:`SIGN`, :data:`INPUT`, or the
penalty's own input-shaped expression."""


def basis_array(basis: Basis, y: jax.Array) -> jax.Array:
    """The array a basis stands for on the (upcast) input ``y``."""
    if isinstance(basis, str):
        return jnp.sign(y) if basis == SIGN else y
    return basis


class InputGrad(NamedTuple):
    r"""A penalty's input gradient in closed form.

    The gradient is a linear combination :math:`\nabla_x f = \sum_k a_k b_k` of scalars
    :math:`a_k` and element-wise expressions :math:`b_k` of the input (``parts``). A caller
    combining several penalties on one input adds the coefficients of the shared bases
    (:data:`SIGN`, :data:`INPUT`) first, so the weighted total's gradient costs one
    multiply per basis in its reduction, not one per penalty. The squared norm is
    ``finish(sums)`` where ``sums`` are the totals of the element-wise expressions
    ``terms()``: a caller sums them next to its other expressions over the same input
    (``penwatch.pipelines.fused_grad_norms``: one reduction each, fused with its
    producer; sums equal to a forward reduction's are shared with it by XLA).

    Attributes:
      input: the (upcast) input the bases are taken of.
      terms: builds the element-wise expressions to sum (input-shaped, compute dtype).
      finish: maps their sums to :math:`\lVert \nabla_x f(x) \rVert_2^2`.
      parts: builds the ``(coefficient, basis)`` pairs of the gradient.
    """

    input: jax.Array
    terms: Callable[[], tuple[jax.Array, ...]]
    finish: Callable[[tuple[jax.Array, ...]], jax.Array]
    parts: Callable[[], tuple[tuple[jax.Array, Basis], ...]]

    def grad(self) -> jax.Array:
        r""":math:`\nabla_x f(x)` as an element-wise expression (compute dtype); call it
        only where it feeds a reduction, so that it is never materialized."""
        return sum(
            (a * basis_array(b, self.input) for a, b in self.parts()),
            jnp.zeros((), self.input.dtype),
        )

    @property
    def sq_norm(self) -> jax.Array:
        r""":math:`\lVert \nabla_x f(x) \rVert_2^2`, reduced on its own."""
        return self.finish(tuple(jnp.sum(t) for t in self.terms()))


def _linear(y: jax.Array, coef: jax.Array, basis: Basis) -> InputGrad:
    """The gradient ``coef * basis``: its squared norm is ``coef² Σ basis²``."""
    b = basis_array(basis, y)
    return InputGrad(
        y, lambda: (b * b,), lambda sums: coef * coef * sums[0], lambda: ((coef, basis),)
    )


def _options(fn: Callable[..., Any], x: jax.Array, options: Mapping[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(fn).bind(x, **options)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])


def _scale(strength: Any, reduction: str, size: int, dtype: Any) -> jax.Array:
    c = jnp.asarray(strength, dtype)
    return c / size if reduction == "mean" else c


def _nonzero(y: jax.Array) -> jax.Array:
    """1 where ``y != 0``, 0 at zeros (NaN at NaN, as autodiff's ``sign``): spelled with
    ``sign`` so that it shares the total's :data:`SIGN` basis (XLA:CPU fuses a ``sign``
    into a reduction, a comparison it writes out as an input-sized array first)."""
    return jnp.square(jnp.sign(y))


def _l1(y: jax.Array, o: dict[str, Any]) -> InputGrad:
    c = _scale(o["strength"], o["reduction"], y.size, y.dtype)
    return InputGrad(y, lambda: (_nonzero(y),), lambda sums: c * c * sums[0], lambda: ((c, SIGN),))


def _l2(y: jax.Array, o: dict[str, Any]) -> InputGrad:
    c = _scale(o["strength"], o["reduction"], y.size, y.dtype)
    center, clip = o["center"], o["clip"]
    if center is None and clip is None:
        # Σ (2c y)² = 4c² Σ y², the forward's own sum
        return _linear(y, 2 * c, INPUT)
    if isinstance(center, str):  # "mean"
        z = y - jnp.mean(y)
    elif center is not None:
        z = y - center
    else:
        z = y
    # d/dz clip(z)^2 = 2 z inside |z| < v, z on |z| = v (autodiff through jnp.clip's
    # min/max splits a tie's gradient in half), 0 outside
    if clip is not None:
        v = jnp.asarray(clip, z.dtype)
        u = jnp.where(jnp.abs(z) < v, z, jnp.where(jnp.abs(z) == v, z / 2, 0))
    else:
        u = z
    if isinstance(center, str):
        # the centering's Jacobian I - 11ᵀ/N subtracts the mean of the inner gradient
        u = u - jnp.mean(u)
    return _linear(y, 2 * c, u)


def _elastic_net(y: jax.Array, o: dict[str, Any]) -> InputGrad:
    c = _scale(o["strength"], o["reduction"], y.size, y.dtype)
    r = jnp.asarray(o["l1_ratio"], y.dtype)

    def terms() -> tuple[jax.Array, ...]:
        return (_nonzero(y), jnp.abs(y), y * y)

    def finish(sums: tuple[jax.Array, ...]) -> jax.Array:
        nonzero, abs_sum, sq_sum = sums
        return c * c * (r * r * nonzero + 4 * r * (1 - r) * abs_sum + 4 * (1 - r) ** 2 * sq_sum)

    return InputGrad(y, terms, finish, lambda: ((c * r, SIGN), (2 * c * (1 - r), INPUT)))


def _entropy(lp: jax.Array, o: dict[str, Any]) -> InputGrad:
    n = lp.shape[-1]
    rows = lp.size // n if n else 0
    c = jnp.asarray(1.0 if o["mode"] == "penalty" else -1.0, lp.dtype)
    if o["normalize"]:
        c = c / math.log(n) if n > 1 else jnp.zeros((), lp.dtype)
    if o["reduction"] == "mean":
        c = c / max(rows, 1)
    temperature = o["temperature"]
    y = lp
    if temperature != 1.0:
        lp = jax.nn.log_softmax(lp / temperature, axis=-1)
    mask = entropy_mask(lp)
    safe = jnp.where(mask, lp, 0.0)
    p = jnp.exp(safe)
    # d/d lp of -p log p = -p (log p + 1); masked terms are constants (double where)
    v = jnp.where(mask, -p * (safe + 1), 0.0)
    if temperature == 1.0:
        return _linear(y, c, v)
    # back through log_softmax(z / T): (v - softmax(z) · Σ_row v) / T
    row_sum = jnp.sum(v, axis=-1, keepdims=True)
    return _linear(y, c / temperature, v - jnp.exp(lp) * row_sum)


def _output_magnitude(z: jax.Array, o: dict[str, Any]) -> InputGrad:
    n = z.size if o["reduction"] == "mean" else 1
    sq = jnp.mean(z * z) if o["reduction"] == "mean" else jnp.sum(z * z)
    pos = ~(sq <= 0)  # NaN kept, as in magnitude()
    mag = magnitude(sq)
    err = mag - jnp.asarray(o["target"], z.dtype)
    # ∇ = 2 (m - t) z / (n m): its norm is 2 |m - t| / sqrt(n); zero at z = 0
    sq_norm = jnp.where(pos, 4 * err * err / n, 0.0)
    inv = jnp.where(pos, 2 * err / (n * jnp.where(pos, mag, 1.0)), 0.0)
    return InputGrad(z, lambda: (), lambda sums: sq_norm, lambda: ((inv, INPUT),))


_TABLE: dict[Callable[..., Any], Callable[[jax.Array, dict[str, Any]], InputGrad]] = {
    l1: _l1,
    l2: _l2,
    elastic_net: _elastic_net,
    entropy: _entropy,
    output_magnitude_penalty: _output_magnitude,
}


def has_input_grad(fn: Callable[..., Any], x: Any, options: Mapping[str, Any]) -> bool:
    """Whether :func:`input_grad` covers ``fn(x, **options)`` (nothing is computed).

    True for the element-wise built-ins on a floating array, except per-element values
    (``reduction="none"``, which a pipeline rejects anyway) and an ``entropy`` of a 0-d
    input (which the penalty rejects).
    """
    try:
        rule = _TABLE.get(fn)
    except TypeError:  # an unhashable callable
        return False
    if rule is None or not isinstance(x, jax.Array):
        return False
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return False
    if fn is entropy and x.ndim < 1:
        return False
    return _options(fn, x, options).get("reduction") != "none"


def input_grad(
    fn: Callable[..., Any], x: jax.Array, options: Mapping[str, Any]
) -> InputGrad | None:
    """The closed-form input gradient of ``fn(x, **options)``, or None.

    None where :func:`has_input_grad` is False (not an element-wise built-in, not a
    floating array, per-element values): the caller then takes a VJP.

    Args:
      fn: the penalty function (a built-in is recognized by identity).
      x: its one input array.
      options: its keyword options (validated by the penalty itself).
    """
    if not has_input_grad(fn, x, options):
        return None
    return _TABLE[fn](_common.upcast(x), _options(fn, x, options))
