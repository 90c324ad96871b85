"""Helpers shared by the penalty modules: dtypes, reductions, safe elementwise ops.

Dtype policy: floating inputs keep their dtype in the output (bf16/f16/f32/f64);
16-bit floats are computed in float32 internally (accumulation and transcendental ops)
and the result cast back. Integer and boolean inputs are promoted to JAX's default float
dtype (float32, or float64 when x64 is enabled). Complex inputs are rejected.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from penwatch import _checks

REDUCTIONS = ("sum", "mean", "none")

NORM_FLOOR = 1e-8


def as_float(fn: str, name: str, x: Any) -> jax.Array:
    """Return ``x`` as a real floating array (integers/bools promoted to the default float)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(
            f"{fn}: argument {name!r} must be a real array (floating, integer or bool), "
            f"got dtype {x.dtype}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def compute_dtype(dtype: Any) -> Any:
    """The dtype to compute in: float32 for 16-bit floats, the dtype itself otherwise."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def upcast(x: jax.Array) -> jax.Array:
    """Cast a 16-bit float array to float32 (other dtypes unchanged)."""
    return x.astype(compute_dtype(x.dtype))


def reduce(values: jax.Array, reduction: str) -> jax.Array:
    """Apply ``"sum"``, ``"mean"`` (over all elements) or ``"none"``."""
    if reduction == "sum":
        return jnp.sum(values)
    if reduction == "mean":
        return jnp.mean(values)
    return values


def scale(value: jax.Array, strength: Any) -> jax.Array:
    """``strength * value`` without letting ``strength`` change the dtype of ``value``."""
    if isinstance(strength, float) and strength == 1.0:
        return value
    return value * jnp.asarray(strength, dtype=value.dtype)


@jax.custom_jvp
def abs_(x: jax.Array) -> jax.Array:
    """``|x|`` whose derivative at 0 is ``sign(0) = 0`` (``jnp.abs`` gives 1)."""
    return jnp.abs(x)


@abs_.defjvp
def _abs_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * t


def floored_norm(x: jax.Array, axis: Any = -1, keepdims: bool = False) -> jax.Array:
    """``max(‖x‖₂, 1e-8)`` along ``axis`` with a finite gradient everywhere (double where).

    Below the floor the norm is the constant 1e-8, so its gradient there is 0; ``sqrt`` is
    never evaluated at 0.
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    big = sq > NORM_FLOOR**2
    return jnp.where(big, jnp.sqrt(jnp.where(big, sq, 1.0)), jnp.asarray(NORM_FLOOR, sq.dtype))


def safe_norm(x: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """``‖x‖₂`` along ``axis`` whose gradient at ``x = 0`` is 0 instead of NaN."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0).astype(sq.dtype)


def check_reduction(fn: str, reduction: Any, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    return _checks.check_choice(fn, "reduction", reduction, allowed)


def check_strength(fn: str, strength: Any) -> Any:
    return _checks.check_finite_real(fn, "strength", strength, allow_traced=True)
