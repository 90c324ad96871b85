"""The one shared option checker.

Every public penwatch function validates its options in Python, before any tracing, with
these helpers, so every bad option fails the same way: a ``ValueError`` whose message
names the function, the option, the bad value and what is allowed, e.g.::

    penwatch.l2: option 'clip' must be > 0, got -1.0

Each ``check_*`` returns the (normalized) value, so call sites read
``clip = check_positive("penwatch.l2", "clip", clip)``. ``fn`` is the name shown to the
user, used verbatim (``"penwatch.l2"``, ``"penwatch.Pipeline.add"``); ``label`` is the
word in front of the option name (``"option"`` by default, ``"argument"`` for positional
arguments).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "TRACED_OPTION_HELP",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_finite_real",
    "check_in_range",
    "check_int",
    "check_ndim",
    "check_nonnegative",
    "check_positive",
    "check_same_shape",
    "format_value",
    "option_error",
]

TRACED_OPTION_HELP = (
    "Options are validated in Python before tracing, so they must be concrete Python or "
    "NumPy values. Inside a jitted function, close over the value or mark the argument "
    "static (jax.jit(..., static_argnames=...)); values that change during training "
    "(weights, strengths) belong in a pipeline's weights, which are pytree leaves."
)


def format_value(value: Any) -> str:
    """Render ``value`` for an error message (NumPy/JAX scalars shown as Python ones)."""
    if isinstance(value, jax.core.Tracer):
        return f"a traced value of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    elif isinstance(value, (np.ndarray, jax.Array)):
        return f"an array of shape {tuple(np.shape(value))}"
    return repr(value)


def option_error(
    fn: str, name: str, value: Any, allowed: str, *, label: str = "option"
) -> ValueError:
    """Build the standard error: ``"{fn}: {label} '{name}' must be {allowed}, got {value}"``."""
    return ValueError(f"{fn}: {label} {name!r} must be {allowed}, got {format_value(value)}")


def check_choice(
    fn: str, name: str, value: Any, allowed: Iterable[Any], *, label: str = "option"
) -> Any:
    """Check ``value`` is one of ``allowed`` (compared by equality and type); return it."""
    allowed = tuple(allowed)
    for candidate in allowed:
        if type(value) is type(candidate) and value == candidate:
            return value
    listed = ", ".join(repr(a) for a in allowed)
    raise option_error(fn, name, value, f"one of {listed}", label=label)


def check_bool(fn: str, name: str, value: Any, *, label: str = "option") -> bool:
    """Check ``value`` is ``True`` or ``False`` (a NumPy bool is accepted); return a bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise option_error(fn, name, value, "True or False", label=label)


def _bound_text(min: float | None, max: float | None, inclusive: bool) -> str:
    lo, hi = (">=", "<=") if inclusive else (">", "<")
    if min is not None and max is not None:
        brackets = "[{}, {}]" if inclusive else "({}, {})"
        return "in " + brackets.format(min, max)
    if min is not None:
        return f"{lo} {min}"
    if max is not None:
        return f"{hi} {max}"
    return "a finite real number"


def check_finite_real(
    fn: str,
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    inclusive: bool = True,
    allow_traced: bool = False,
    label: str = "option",
) -> Any:
    """Check ``value`` is a finite real number within the optional bounds.

    Args:
      fn: function name shown in the message.
      name: option name.
      value: the value to check: a Python/NumPy real number or a concrete 0-d array.
        Booleans, strings, non-scalar arrays, NaN and ±Inf are rejected.
      min: optional lower bound.
      max: optional upper bound.
      inclusive: whether the bounds themselves are allowed.
      allow_traced: accept a traced 0-d real array (inside ``jit``/``grad``) unchecked;
        its value cannot be inspected before the computation runs.
      label: word in front of the option name in the message.

    Returns:
      The value as a Python ``float``, or the traced array itself when allowed.
    """
    allowed = _bound_text(min, max, inclusive)
    if min is not None or max is not None:
        allowed = f"a finite real number {allowed}"
    if isinstance(value, jax.core.Tracer):
        if allow_traced and value.shape == () and _is_real_dtype(value.dtype):
            return value
        raise option_error(
            fn, name, value, f"{allowed} (a concrete value; {TRACED_OPTION_HELP})", label=label
        )
    if isinstance(value, (np.ndarray, jax.Array, np.generic)):
        if np.ndim(value) != 0 or not _is_real_dtype(np.asarray(value).dtype):
            raise option_error(fn, name, value, allowed, label=label)
        value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise option_error(fn, name, value, allowed, label=label)
    number = float(value)
    ok = math.isfinite(number)
    if ok and min is not None:
        ok = number >= min if inclusive else number > min
    if ok and max is not None:
        ok = number <= max if inclusive else number < max
    if not ok:
        raise option_error(fn, name, value, allowed, label=label)
    return number


def _is_real_dtype(dtype: Any) -> bool:
    return bool(
        np.issubdtype(dtype, np.integer)
        or np.issubdtype(dtype, np.floating)
        or jax.numpy.issubdtype(dtype, jax.numpy.floating)
    ) and not np.issubdtype(dtype, np.bool_)


def check_positive(
    fn: str, name: str, value: Any, *, allow_traced: bool = False, label: str = "option"
) -> Any:
    """Check ``value`` is a finite real ``> 0``."""
    return check_finite_real(
        fn, name, value, min=0, inclusive=False, allow_traced=allow_traced, label=label
    )


def check_nonnegative(
    fn: str, name: str, value: Any, *, allow_traced: bool = False, label: str = "option"
) -> Any:
    """Check ``value`` is a finite real ``>= 0``."""
    return check_finite_real(fn, name, value, min=0, allow_traced=allow_traced, label=label)


def check_in_range(
    fn: str,
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    allow_traced: bool = False,
    label: str = "option",
) -> Any:
    """Check ``value`` is a finite real in the closed interval ``[lo, hi]``."""
    return check_finite_real(
        fn, name, value, min=lo, max=hi, allow_traced=allow_traced, label=label
    )


def check_int(
    fn: str,
    name: str,
    value: Any,
    *,
    min: int | None = None,
    max: int | None = None,
    label: str = "option",
) -> int:
    """Check ``value`` is an integer (not a bool) within the optional closed bounds."""
    allowed = "an integer"
    if min is not None or max is not None:
        allowed = f"an integer {_bound_text(min, max, True)}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral)):
        raise option_error(fn, name, value, allowed, label=label)
    number = int(value)
    if (min is not None and number < min) or (max is not None and number > max):
        raise option_error(fn, name, value, allowed, label=label)
    return number


def check_callable(fn: str, name: str, value: Any, *, label: str = "argument") -> Callable:
    """Check ``value`` is callable; return it."""
    if not callable(value):
        raise option_error(fn, name, value, "callable", label=label)
    return value


def check_same_shape(fn: str, name_a: str, a: Any, name_b: str, b: Any) -> tuple[int, ...]:
    """Check two arrays have the same shape; the message names both shapes."""
    shape_a, shape_b = tuple(np.shape(a)), tuple(np.shape(b))
    if shape_a != shape_b:
        raise ValueError(
            f"{fn}: {name_a!r} and {name_b!r} must have the same shape, "
            f"got {name_a} {shape_a} and {name_b} {shape_b}"
        )
    return shape_a


def check_ndim(
    fn: str, name: str, x: Any, *, min_ndim: int = 0, allowed: Sequence[int] | None = None
) -> int:
    """Check ``x.ndim >= min_ndim`` (and, when given, ``x.ndim in allowed``); return ndim."""
    ndim = int(np.ndim(x))
    if ndim < min_ndim or (allowed is not None and ndim not in allowed):
        need = f"at least {min_ndim}" if allowed is None else " or ".join(map(str, allowed))
        raise ValueError(
            f"{fn}: argument {name!r} must have {need} dimensions, "
            f"got shape {tuple(np.shape(x))} ({ndim} dimensions)"
        )
    return ndim
