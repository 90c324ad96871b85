"""Which parameter leaves sit nearest the loss: the order of first use in the forward pass.

A non-finite value that enters the backward pass enters at the loss and reaches the
leaves nearest it first (the output layer), so the leaf report lists leaves in the
reverse of the order in which the forward computation first reads them. The order is
read from the traced program (a jaxpr), at trace time only: it costs nothing per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

__all__ = ["nearest_loss_order"]


def _sub_jaxprs(eqn: Any) -> list[Any]:
    subs = []
    for value in eqn.params.values():
        if isinstance(value, jcore.ClosedJaxpr):
            subs.append(value.jaxpr)
        elif isinstance(value, jcore.Jaxpr):
            subs.append(value)
    return subs


def _first_reads(jaxpr: Any, names: dict[Any, Any], clock: list[int], seen: dict) -> None:
    """Record, for each outer leaf (``names[var]``), the clock tick of its first read."""
    for eqn in jaxpr.eqns:
        clock[0] += 1
        subs = _sub_jaxprs(eqn)
        inner_names: dict[Any, Any] = {}
        for i, var in enumerate(eqn.invars):
            leaf = names.get(var) if isinstance(var, jcore.Var) else None
            if leaf is None:
                continue
            mapped = False
            for sub in subs:  # call-like: invars passed through one-to-one
                if len(sub.invars) == len(eqn.invars):
                    inner_names[sub.invars[i]] = leaf
                    mapped = True
            if not mapped and leaf not in seen:
                seen[leaf] = clock[0]
        for sub in subs:
            if inner_names and len(sub.invars) == len(eqn.invars):
                _first_reads(sub, inner_names, clock, seen)


def nearest_loss_order(fn: Callable[..., Any], params: Any, *args: Any) -> tuple[str, ...]:
    """Paths of ``params``' leaves, the one the forward pass reads last first.

    Args:
      fn: ``fn(params, *args)``, the forward computation (e.g. the loss).
      params: the parameter pytree (arrays, tracers or ``ShapeDtypeStruct``).
      *args: the other arguments of ``fn``.

    Returns:
      ``jax.tree_util.keystr`` paths: leaves read later in the forward pass first (the
      output layer before the input layer); leaves never read come last, in tree order.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    closed = jax.make_jaxpr(fn)(params, *args)
    jaxpr = closed.jaxpr
    names = {var: path for var, path in zip(jaxpr.invars[: len(paths)], paths, strict=True)}
    seen: dict[str, int] = {}
    _first_reads(jaxpr, names, [0], seen)
    index = {path: i for i, path in enumerate(paths)}
    return tuple(sorted(paths, key=lambda p: (p not in seen, -seen.get(p, 0), index[p])))
