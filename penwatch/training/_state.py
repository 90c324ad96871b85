"""The train state and the host-side step function wrapper, plus in-step helpers.

:class:`TrainState` is what penwatch train steps thread through training;
:class:`StepFunction` wraps the two compiled step variants (with and without gradient
diagnostics) and picks one per step on the host, from a host mirror of the step counter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from penwatch import _checks
from penwatch.diagnostics import ParamTerm
from penwatch.forensics import CapsuleWriter
from penwatch.schema import Metrics

__all__ = ["StepFunction", "TrainState"]


class TrainState(NamedTuple):
    """The state a penwatch train step threads through training (a pytree).

    Attributes:
      params: model parameters.
      opt_state: optimizer state.
      step: int32 scalar, the number of steps taken.
      pipeline: the penalty pipeline (its weights are leaves) or None.
      param_terms: ``{name: ParamTerm}`` parameter-only penalties (weights are leaves).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    pipeline: Any = None
    param_terms: Mapping[str, ParamTerm] | None = None


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        for xk, yk in (("x", "y"), ("inputs", "targets")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise KeyError(
            "penwatch train step: a dict batch needs keys ('x', 'y') or ('inputs', "
            f"'targets'); got {sorted(map(str, batch))}"
        )
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        "penwatch train step: a batch must be (x, y), [x, y] or a dict with keys "
        f"('x', 'y') / ('inputs', 'targets'); got {type(batch).__name__}"
    )


def _strong_types(tree: Any) -> Any:
    """Drop weak types (``jnp.full(n, 0.1)``): updated params are strongly typed, so a
    weakly typed initial leaf would make the second step recompile."""

    def fix(x: Any) -> Any:
        if getattr(x, "weak_type", False):
            return jnp.asarray(x, dtype=x.dtype)
        return x

    return jax.tree.map(fix, tree)


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _normalize_terms(fn: str, param_terms: Any) -> dict[str, ParamTerm]:
    if param_terms is None:
        return {}
    if not isinstance(param_terms, Mapping):
        raise _checks.option_error(
            fn, "param_terms", param_terms, "a mapping {name: ParamTerm} or None"
        )
    out = {}
    for name, term in param_terms.items():
        if not isinstance(name, str) or not isinstance(term, ParamTerm):
            raise _checks.option_error(
                fn,
                f"param_terms[{name!r}]",
                term,
                "a ParamTerm from penwatch.diagnostics.l1_term / l2_term / elastic_net_term",
            )
        ratio = term.l1_ratio if term.l1_ratio is None else jnp.asarray(term.l1_ratio, jnp.float32)
        out[name] = dataclasses.replace(
            term, weight=jnp.asarray(term.weight, jnp.float32), l1_ratio=ratio
        )
    return out


def _check_names(fn: str, pipeline: Any, terms: Mapping[str, ParamTerm]) -> None:
    names = set(getattr(pipeline, "names", ()))
    clash = sorted(names & set(terms))
    if clash:
        raise ValueError(f"{fn}: names {clash} are both pipeline penalties and param_terms")


class _HostStep:
    """Host mirror of ``state.step`` for states this builder produced (no device sync)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, int]] = {}

    def remember(self, state: TrainState, host_step: int) -> None:
        if len(self._known) >= 16:
            self._known.pop(next(iter(self._known)))
        self._known[id(state.step)] = (state.step, host_step)

    def get(self, state: TrainState) -> int:
        hit = self._known.get(id(state.step))
        if hit is not None and hit[0] is state.step:
            return hit[1]
        return int(state.step)  # a state from elsewhere (restored, rebuilt): one sync


class StepFunction:
    """``step_fn(state, batch) -> (state, metrics)``: a jitted step, with diagnostics every N.

    Attributes:
      plain: the compiled step without diagnostics.
      with_diagnostics: the compiled step with gradient diagnostics.
      diagnostics_every: N (0: never).
      capsules: the :class:`penwatch.forensics.CapsuleWriter` observing every step
        (``nan_capsule=``), or None. It only watches from the host: the compiled
        programs are the same with or without it.
    """

    def __init__(
        self,
        plain: Callable,
        diag: Callable,
        every: int,
        host: _HostStep,
        capsules: CapsuleWriter | None = None,
    ) -> None:
        self.plain = plain
        self.with_diagnostics = diag
        self.diagnostics_every = every
        self.capsules = capsules
        self._host = host

    def is_diagnostics_step(self, step: int) -> bool:
        """Whether step ``step`` (0-based, before the update) runs the diagnostics."""
        return self.diagnostics_every > 0 and step % self.diagnostics_every == 0

    def program_for(self, step: int) -> Callable:
        """The compiled function that runs step ``step`` (for replays)."""
        return self.with_diagnostics if self.is_diagnostics_step(step) else self.plain

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.diagnostics_every > 0 or self.capsules is not None:
            step = self._host.get(state)
            fn = self.program_for(step)
            new_state, metrics = fn(state, batch)
            self._host.remember(new_state, step + 1)
            if self.capsules is not None:
                program = "with_diagnostics" if fn is self.with_diagnostics else "plain"
                self.capsules.observe(step, (state, batch), metrics, program=program)
            return new_state, metrics
        return self.plain(state, batch)
