"""The built-in penalty tables and eager option checks shared by both pipeline kinds."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from penwatch import _checks
from penwatch.penalties import (
    consistency,
    elastic_net,
    entropy,
    js_divergence,
    kl_divergence,
    l1,
    l2,
    orthogonality,
    output_magnitude_penalty,
)

SINGLE_INPUT: Mapping[str, Callable[..., jax.Array]] = {
    "l1": l1,
    "l2": l2,
    "elastic_net": elastic_net,
    "entropy": entropy,
    "orthogonality": orthogonality,
    "output_magnitude": output_magnitude_penalty,
}
"""Names accepted by ``pw.pipeline([...])``: one input each."""

MULTI_INPUT: Mapping[str, Callable[..., jax.Array]] = {
    "kl": kl_divergence,
    "js": js_divergence,
    "consistency": consistency,
}
"""Two-input names accepted by ``pw.multi_pipeline([...])`` (besides the one-input ones)."""

_ARITY: dict[Callable[..., Any], int] = {
    **{fn: 1 for fn in SINGLE_INPUT.values()},
    **{fn: 2 for fn in MULTI_INPUT.values()},
}

# A shape every built-in accepts: a batch of 4 rows over 3 classes/features.
_EXAMPLE = jax.ShapeDtypeStruct((4, 3), jnp.float32)


def builtin_arity(fn: Callable[..., Any]) -> int | None:
    """Number of array inputs of a built-in penalty, or None for a user function."""
    try:
        return _ARITY.get(fn)
    except TypeError:  # unhashable callable
        return None


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def check_options(
    where: str, name: str, fn: Callable[..., Any], options: Mapping[str, Any], n_inputs: int
) -> None:
    """Reject options ``fn`` cannot take, before anything is traced or compiled.

    Every function: the option names must bind to its signature (after ``n_inputs``
    positional arrays). Built-ins: evaluated abstractly (``jax.eval_shape``, no FLOPs) on
    an example input, which runs their own eager option validation.

    Raises:
      ValueError: naming ``where``, the penalty, the option and the problem.
    """
    arity = builtin_arity(fn)
    if arity is not None and arity != n_inputs:
        raise ValueError(
            f"{where}: penalty {name!r} uses {_fn_name(fn)}, which takes {arity} input(s), "
            f"but {n_inputs} input(s) were given"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        signature = None
    if signature is not None:
        try:
            signature.bind(*([None] * n_inputs), **options)
        except TypeError as err:
            raise ValueError(
                f"{where}: penalty {name!r} cannot call {_fn_name(fn)} with "
                f"{n_inputs} input(s) and options {dict(options)!r}: {err}"
            ) from None
    if arity is None:
        return
    try:
        jax.eval_shape(lambda *xs: fn(*xs, **options), *([_EXAMPLE] * arity))
    except ValueError as err:
        raise ValueError(f"{where}: penalty {name!r}: {err}") from None


def freeze_options(
    where: str, name: str, options: Mapping[str, Any]
) -> tuple[tuple[str, Any], ...]:
    """Options as static, hashable aux data: sorted ``(name, value)`` pairs."""
    frozen = tuple(sorted(options.items()))
    for key, value in frozen:
        if isinstance(value, (jax.Array, np.ndarray)):
            raise ValueError(
                f"{where}: option {key!r} of penalty {name!r} must be a Python or NumPy "
                f"scalar, got {_checks.format_value(value)}. {_checks.TRACED_OPTION_HELP}"
            )
        try:
            hash(value)
        except TypeError:
            raise ValueError(
                f"{where}: option {key!r} of penalty {name!r} must be hashable (options "
                f"are static pipeline structure), got {_checks.format_value(value)}; use a "
                "tuple instead of a list, and pass arrays as inputs or close over them"
            ) from None
    return frozen
