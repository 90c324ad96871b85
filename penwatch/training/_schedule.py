"""Curriculum weight schedules: penalty weights as a function of the epoch.

``weight_schedule({...})`` returns ``fn(epoch, total_epochs) -> {name: weight}``;
``apply_scheduled_weights(pipeline_or_state, weights)`` writes the weights into a
pipeline (or a train state's pipeline and parameter terms). Weights are pytree leaves,
so a jitted train step never recompiles when they change.

Schedule formulas (``e`` = epoch, counted from 0; ``E`` = total epochs):

=============================  =================================================
``("linear", start, end)``     ``start + (end - start) · min(e / max(E - 1, 1), 1)``
                               (``start`` at epoch 0, ``end`` at the last epoch)
``("warmup", final, n)``       ``final · min(e / n, 1)`` (``final`` from epoch ``n``;
                               ``n = 0`` gives ``final`` at once)
``("decay", initial, rate)``   ``initial · rate ** e``
``("constant", v)``            ``v``
any callable ``s``             ``s(e)`` — any optax schedule (``optax.cosine_decay_
                               schedule(...)``, ``optax.linear_schedule(...)``, …),
                               evaluated at the epoch
=============================  =================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from penwatch import _checks

__all__ = ["WeightSchedule", "apply_scheduled_weights", "weight_schedule"]

_KINDS = {"linear": 2, "warmup": 2, "decay": 2, "constant": 1}
_SPEC_HELP = (
    "('linear', start, end), ('warmup', final, epochs), ('decay', initial, rate), "
    "('constant', value) or an optax schedule (a callable of the epoch)"
)


def _schedule_value(spec: Any, epoch: int, total_epochs: int) -> Any:
    if callable(spec):
        return spec(epoch)
    kind, *args = spec
    if kind == "linear":
        start, end = args
        progress = min(epoch / max(total_epochs - 1, 1), 1.0)
        return start + (end - start) * progress
    if kind == "warmup":
        final, n = args
        return final if n == 0 else final * min(epoch / n, 1.0)
    if kind == "decay":
        initial, rate = args
        return initial * rate**epoch
    return args[0]  # constant


def _check_spec(fn: str, name: str, spec: Any) -> Any:
    if callable(spec):
        return spec
    label = f"schedules[{name!r}]"
    if not isinstance(spec, tuple | list) or not spec or spec[0] not in _KINDS:
        raise _checks.option_error(fn, label, spec, _SPEC_HELP)
    kind = spec[0]
    if len(spec) != 1 + _KINDS[kind]:
        raise _checks.option_error(
            fn, label, spec, f"a {kind!r} schedule with {_KINDS[kind]} value(s): {_SPEC_HELP}"
        )
    args = spec[1:]
    if kind == "warmup":
        values = (
            _checks.check_finite_real(fn, f"{label} final", args[0]),
            _checks.check_int(fn, f"{label} epochs", args[1], min=0),
        )
    elif kind == "decay":
        values = (
            _checks.check_finite_real(fn, f"{label} initial", args[0]),
            _checks.check_nonnegative(fn, f"{label} rate", args[1]),
        )
    else:
        values = tuple(_checks.check_finite_real(fn, label, a) for a in args)
    return (kind, *values)


@dataclasses.dataclass(frozen=True)
class WeightSchedule:
    """A curriculum: ``schedule(epoch, total_epochs) -> {penalty name: weight}``.

    Built by :func:`weight_schedule`; see the module docstring for the formulas.

    Attributes:
      schedules: the validated ``{name: spec}`` mapping.
    """

    schedules: Mapping[str, Any]

    def __call__(self, epoch: int, total_epochs: int) -> dict[str, Any]:
        """Weights at ``epoch`` (0-based) of ``total_epochs``: floats (arrays for optax)."""
        fn = "penwatch.training.weight_schedule"
        epoch = _checks.check_int(fn, "epoch", epoch, min=0, label="argument")
        total = _checks.check_int(fn, "total_epochs", total_epochs, min=1, label="argument")
        return {name: _schedule_value(s, epoch, total) for name, s in self.schedules.items()}

    @property
    def names(self) -> tuple[str, ...]:
        """The scheduled penalty names."""
        return tuple(self.schedules)


def weight_schedule(schedules: Mapping[str, Any]) -> WeightSchedule:
    """Build a curriculum weight schedule (the seed's ``weight_schedule``).

    Args:
      schedules: ``{penalty name: spec}``, each spec one of ``("linear", start, end)``,
        ``("warmup", final, epochs)``, ``("decay", initial, rate)``, ``("constant", v)``
        or any optax schedule (a callable of the epoch).

    Returns:
      A :class:`WeightSchedule`: ``fn(epoch, total_epochs) -> {name: weight}``.

    Example:
      >>> import penwatch as pw
      >>> fn = pw.weight_schedule({"l2": ("linear", 0.0, 0.01), "kl": ("warmup", 0.1, 10)})
      >>> fn(5, 11)
      {'l2': 0.005, 'kl': 0.05}
    """
    fn = "penwatch.training.weight_schedule"
    if not isinstance(schedules, Mapping):
        raise _checks.option_error(
            fn, "schedules", schedules, "a mapping {penalty name: spec}", label="argument"
        )
    checked = {}
    for name, spec in schedules.items():
        if not isinstance(name, str):
            raise _checks.option_error(fn, "schedules key", name, "a penalty name (str)")
        checked[name] = _check_spec(fn, name, spec)
    return WeightSchedule(schedules=checked)


def _as_weight_like(value: Any, old: Any) -> jax.Array:
    """The new weight as an array with the old weight's dtype (no retrace under jit)."""
    dtype = jnp.result_type(old) if old is not None else jnp.float32
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.asarray(value, dtype)


def _update_pipeline(pipeline: Any, weights: Mapping[str, Any]) -> Any:
    for name, w in weights.items():
        pipeline = pipeline.update_weight(name, w)
    return pipeline


def apply_scheduled_weights(target: Any, weights: Mapping[str, Any]) -> Any:
    """Write scheduled weights into a pipeline or a train state.

    Args:
      target: a ``Pipeline`` / ``MultiPipeline`` (``update_weight`` is applied per
        name), or a :class:`penwatch.training.TrainState` (each name goes to the state's
        pipeline or to its parameter term of that name).
      weights: ``{name: weight}``, e.g. from a :class:`WeightSchedule`.

    Returns:
      A new pipeline / state (weights are pytree leaves: no recompilation).

    Raises:
      KeyError: a name is neither a penalty of the pipeline nor a parameter term.
    """
    if not isinstance(weights, Mapping):
        raise _checks.option_error(
            "penwatch.training.apply_scheduled_weights",
            "weights",
            weights,
            "a mapping {penalty name: weight}",
            label="argument",
        )
    param_terms = getattr(target, "param_terms", None)
    if hasattr(target, "opt_state") and param_terms is not None:
        terms = dict(param_terms)
        rest = {}
        for name, w in weights.items():
            if name in terms:
                terms[name] = dataclasses.replace(
                    terms[name], weight=_as_weight_like(w, terms[name].weight)
                )
            else:
                rest[name] = w
        pipeline = target.pipeline
        if rest:
            if pipeline is None:
                raise KeyError(
                    f"apply_scheduled_weights: no penalty or parameter term named "
                    f"{sorted(rest)!r}; parameter terms: {sorted(terms)!r}"
                )
            pipeline = _update_pipeline(pipeline, rest)
        return target._replace(pipeline=pipeline, param_terms=terms)
    if not hasattr(target, "update_weight"):
        raise _checks.option_error(
            "penwatch.training.apply_scheduled_weights",
            "target",
            target,
            "a Pipeline, MultiPipeline or TrainState",
            label="argument",
        )
    return _update_pipeline(target, weights)


ScheduleFn = Callable[[int, int], Mapping[str, Any]]
