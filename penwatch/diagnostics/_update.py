"""The diagonal preconditioner of an optax optimizer, for update-space shares (SPEC §12).

Adam, AdamW, RMSProp and Adagrad scale each coordinate of the gradient by a factor read
from their state: the update is ``u ∝ P g`` with ``P`` diagonal (momentum aside). The
share of term ``i`` in the update is then ``⟨P g_i, P g⟩ / ‖P g‖²``, which can differ
from its gradient share by orders of magnitude (Adam equalizes coordinates: a penalty
acting on coordinates the task barely moves gets a large share of the step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from penwatch import _checks

__all__ = ["diagonal_preconditioner"]

PyTree = Any


def _states(state: Any) -> Any:
    """Every optax state object in a (nested) optimizer state, depth first."""
    if (
        isinstance(
            state,
            optax.ScaleByAdamState | optax.ScaleByRmsState | optax.ScaleByRssState,
        )
        or type(state).__name__ == "ScaleByRmsWithCountState"
    ):
        yield state
        return
    if isinstance(state, tuple | list):
        for child in state:
            yield from _states(child)
    elif isinstance(state, dict):
        for child in state.values():
            yield from _states(child)
    elif hasattr(state, "inner_state"):
        yield from _states(state.inner_state)


def diagonal_preconditioner(
    opt_state: Any, params: PyTree | None = None, *, eps: float = 1e-8
) -> PyTree | None:
    """``P`` (shaped like the parameters) from an optax state, or None if none applies.

    From the first diagonally preconditioning state found in ``opt_state``:

    * ``ScaleByAdamState`` (``adam``, ``adamw``, ``nadam``): ``P = 1 / (√ν + eps)``;
    * ``ScaleByRmsState`` (``rmsprop``): ``P = 1 / √(ν + eps)``;
    * ``ScaleByRssState`` (``adagrad``): ``P = 1 / √(Σg² + eps)`` where ``Σg² > 0``, else 0.

    Adam's and RMSProp's bias corrections multiply ``ν`` by one scalar per step, which
    cancels in the shares (up to its interplay with ``eps``), so it is left out. Pass the
    state *after* the step's update (its ``ν`` includes this step's gradient), as the
    penwatch train steps do.

    Args:
      opt_state: an optax optimizer state (chains, ``inject_hyperparams`` and wrappers
        with an ``inner_state`` are searched).
      params: when given, ``ν`` must have the parameters' tree structure (else None:
        e.g. a ``masked`` or ``multi_transform`` state).
      eps: the optimizer's epsilon (optax's default for Adam and RMSProp is 1e-8).

    Returns:
      The diagonal ``P`` as a pytree, or None when the state has no such optimizer.
    """
    eps = _checks.check_finite_real(
        "penwatch.diagnostics.diagonal_preconditioner", "eps", eps, label="option"
    )
    for state in _states(opt_state):
        if isinstance(state, optax.ScaleByAdamState):
            nu, fn = state.nu, lambda n: 1.0 / (jnp.sqrt(n) + eps)
        elif isinstance(state, optax.ScaleByRssState):
            nu, fn = state.sum_of_squares, lambda s: jnp.where(s > 0, jax.lax.rsqrt(s + eps), 0.0)
        else:
            nu, fn = state.nu, lambda n: jax.lax.rsqrt(n + eps)
        if params is not None and jax.tree.structure(nu) != jax.tree.structure(params):
            return None
        return jax.tree.map(fn, nu)
    return None
