"""NaN/Inf checks: ``validate`` on the host, ``finite_report`` inside compiled code."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from penwatch import _checks

HOST_ONLY_HELP = (
    "validate() reads values on the host and cannot run on traced values; inside jit, "
    "use finite_report(x), which returns device scalars you can read after the step."
)


@dataclasses.dataclass(frozen=True)
class Validation:
    """Result of :func:`validate`.

    Attributes:
      ok: ``True`` when every value is finite (integer/bool arrays always are).
      kind: ``None`` when ok, else ``"nan"`` or ``"inf"`` (NaN wins when both occur).
      nan_count: number of NaN values (over all leaves of a pytree).
      inf_count: number of ±Inf values.
      path: for a pytree, ``jax.tree_util.keystr`` of the first leaf (in flattening
        order) holding a non-finite value; ``None`` when ok or for a bare array.
    """

    ok: bool
    kind: str | None = None
    nan_count: int = 0
    inf_count: int = 0
    path: str | None = None

    def __bool__(self) -> bool:
        return self.ok


class NonFiniteError(ValueError):
    """Raised by ``validate(x, raise_on_error=True)``; carries the :class:`Validation` fields."""

    def __init__(self, validation: Validation) -> None:
        self.validation = validation
        self.kind = validation.kind
        self.nan_count = validation.nan_count
        self.inf_count = validation.inf_count
        self.path = validation.path
        where = f" (first non-finite leaf: {validation.path})" if validation.path else ""
        super().__init__(
            f"penwatch.validate: found non-finite values, kind {validation.kind!r}: "
            f"{validation.nan_count} NaN, {validation.inf_count} Inf{where}"
        )


def _is_checked(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _host_counts(leaf: Any) -> tuple[int, int]:
    arr = np.asarray(leaf)
    if not _is_checked(arr.dtype):
        return 0, 0
    if arr.dtype.itemsize < 4 and not np.issubdtype(arr.dtype, np.complexfloating):
        arr = arr.astype(np.float32)  # bf16/f16 and other ml_dtypes floats
    nan = int(np.count_nonzero(np.isnan(arr)))
    inf = int(np.count_nonzero(np.isinf(arr)))
    return nan, inf


def validate(x: Any, *, raise_on_error: bool = False) -> Validation:
    """Check an array or a pytree of arrays for NaN/Inf values (host side).

    Reads the values on the host (blocking on device arrays). Integer and boolean
    leaves are always ok; non-numeric leaves are ignored. For a pytree, ``path`` names
    the first non-finite leaf (``jax.tree_util.keystr``).

    Args:
      x: an array, a Python/NumPy number, or a pytree of them. Not a traced value (use
        :func:`finite_report` inside ``jit``).
      raise_on_error: raise :class:`NonFiniteError` instead of returning a non-ok result.

    Returns:
      A :class:`Validation` (truthy when ok).

    Raises:
      NonFiniteError: when ``raise_on_error`` and a non-finite value is found.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import validate
      >>> validate({"w": jnp.array([1.0, jnp.nan])})
      Validation(ok=False, kind='nan', nan_count=1, inf_count=0, path="['w']")
    """
    raise_on_error = _checks.check_bool("penwatch.validate", "raise_on_error", raise_on_error)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(x)
    is_bare = treedef.num_leaves == 1 and len(leaves) == 1 and leaves[0][0] == ()
    nan_total = inf_total = 0
    first_path = None
    for path, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(f"penwatch.validate: got a traced value. {HOST_ONLY_HELP}")
        try:
            nan, inf = _host_counts(leaf)
        except (TypeError, ValueError):
            continue  # a non-numeric leaf (string, object): nothing to check
        if (nan or inf) and first_path is None:
            first_path = jax.tree_util.keystr(path)
        nan_total += nan
        inf_total += inf
    if not nan_total and not inf_total:
        return Validation(ok=True)
    result = Validation(
        ok=False,
        kind="nan" if nan_total else "inf",
        nan_count=nan_total,
        inf_count=inf_total,
        path=None if is_bare else first_path,
    )
    if raise_on_error:
        raise NonFiniteError(result)
    return result


def finite_report(x: Any) -> dict[str, jax.Array]:
    """Count NaN and Inf values inside compiled code (jit-safe, no host sync).

    Args:
      x: an array or a pytree of arrays; integer/bool leaves count 0.

    Returns:
      ``{"nan_count": int32 scalar, "inf_count": int32 scalar}`` summed over leaves.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from penwatch.penalties import finite_report
      >>> r = jax.jit(finite_report)({"a": jnp.array([jnp.inf, 1.0, jnp.nan, jnp.nan])})
      >>> int(r["nan_count"]), int(r["inf_count"])
      (2, 1)
    """
    nan = jnp.zeros((), jnp.int32)
    inf = jnp.zeros((), jnp.int32)
    for leaf in jax.tree_util.tree_leaves(x):
        leaf = jnp.asarray(leaf)
        if not _is_checked(leaf.dtype):
            continue
        nan = nan + jnp.sum(jnp.isnan(leaf), dtype=jnp.int32)
        inf = inf + jnp.sum(jnp.isinf(leaf), dtype=jnp.int32)
    return {"nan_count": nan, "inf_count": inf}


def leaf_finite_counts(x: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per-leaf NaN and Inf counts inside compiled code (jit-safe, no host sync).

    The per-leaf companion of :func:`finite_report`: it tells *which* parameter or
    gradient leaf went non-finite, so a report can name it.

    Args:
      x: an array or a pytree of arrays; integer/bool leaves are left out.

    Returns:
      ``{path: (nan_count, inf_count)}`` of int32 scalars, paths from
      ``jax.tree_util.keystr`` (``""`` for a bare array).

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import leaf_finite_counts
      >>> counts = leaf_finite_counts({"w": jnp.array([1.0, jnp.nan]), "n": jnp.arange(2)})
      >>> {path: [int(c) for c in pair] for path, pair in counts.items()}
      {"['w']": [1, 0]}
    """
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(x):
        leaf = jnp.asarray(leaf)
        if _is_checked(leaf.dtype):
            out[jax.tree_util.keystr(path)] = (
                jnp.sum(jnp.isnan(leaf), dtype=jnp.int32),
                jnp.sum(jnp.isinf(leaf), dtype=jnp.int32),
            )
    return out
