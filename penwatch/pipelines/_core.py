"""The shared core of :class:`Pipeline` and :class:`MultiPipeline`.

A pipeline is an immutable pytree: the weights are its leaves, everything else (names,
functions, options, enabled and differentiable flags, the pipeline name) is static aux
data. Both pipeline kinds share this class; they differ only in how an entry's arguments
are taken from the inputs (:meth:`_PipelineBase._call`) and how the inputs are checked
(:meth:`_PipelineBase._prepare`).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Self

import jax
import jax.numpy as jnp
import numpy as np

from penwatch import _checks, events
from penwatch.penalties._closed_form import has_input_grad, input_grad
from penwatch.pipelines import _builtins
from penwatch.pipelines._builtins import builtin_arity
from penwatch.pipelines._grad_norms import ClosedFormTerm, fused_grad_norms
from penwatch.schema import PENALTY_QUANTITIES, Metrics, penalty_key

RESERVED_NAMES = frozenset({"total", "total_grad_norm", "loss", "base_loss", "base"})
"""Names a penalty cannot take: run-level metric keys and the diagnostics' task term."""


class PipelineEntry(NamedTuple):
    """A read-only view of one pipeline entry."""

    name: str
    fn: Callable[..., jax.Array]
    weight: jax.Array
    options: Mapping[str, Any]
    enabled: bool
    differentiable: bool
    inputs: tuple[str, ...] | None
    """Named inputs (MultiPipeline) or None (Pipeline: the one pipeline input)."""


class _Spec(NamedTuple):
    # The static (hashable) part of an entry; the weight is a leaf, kept apart.
    name: str
    fn: Callable[..., jax.Array]
    options: tuple[tuple[str, Any], ...]
    enabled: bool
    differentiable: bool
    inputs: tuple[str, ...] | None


def _is_traced(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def as_weight(where: str, name: str, weight: Any, current: jax.Array | None = None) -> jax.Array:
    """Validate a weight and make it a 0-d array leaf.

    Python numbers become float32, or the dtype of the weight they replace (so updates
    never change the leaf's type and never recompile). Arrays keep their floating dtype
    (integer arrays become float32). Traced weights (inside ``jit``) are accepted as is.
    """
    label = "weight for penalty"
    if isinstance(weight, jax.core.Tracer):
        _checks.check_finite_real(where, name, weight, allow_traced=True, label=label)
        return weight
    _checks.check_finite_real(where, name, weight, label=label)
    if isinstance(weight, (np.ndarray, np.generic, jax.Array)) and jnp.issubdtype(
        weight.dtype, jnp.floating
    ):
        return jnp.asarray(weight)
    dtype = jnp.float32 if current is None else current.dtype
    if isinstance(weight, numbers.Real) or np.ndim(weight) == 0:
        return jnp.asarray(weight, dtype=dtype)
    raise _checks.option_error(where, name, weight, "a finite real scalar", label=label)


class _PipelineBase:
    """Shared implementation; see :class:`Pipeline` and :class:`MultiPipeline`."""

    __slots__ = ("_name", "_specs", "_weights")
    _kind: ClassVar[str] = "Pipeline"

    _name: str
    _specs: tuple[_Spec, ...]
    _weights: tuple[jax.Array, ...]

    def __init__(self, *, name: str = "default") -> None:
        if not isinstance(name, str) or not name:
            raise _checks.option_error(
                f"penwatch.{self._kind}", "name", name, "a non-empty string", label="argument"
            )
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_specs", ())
        object.__setattr__(self, "_weights", ())

    # --- pytree protocol: weights are leaves, the rest is static -------------------

    def tree_flatten(self) -> tuple[tuple[jax.Array, ...], tuple[str, tuple[_Spec, ...]]]:
        return self._weights, (self._name, self._specs)

    @classmethod
    def tree_unflatten(cls, aux: tuple[str, tuple[_Spec, ...]], children: Any) -> Self:
        return cls._make(aux[0], aux[1], tuple(children))

    @classmethod
    def _make(cls, name: str, specs: tuple[_Spec, ...], weights: tuple[Any, ...]) -> Self:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_name", name)
        object.__setattr__(obj, "_specs", specs)
        object.__setattr__(obj, "_weights", weights)
        return obj

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(
            f"{self._kind} is immutable; use add/remove/update_weight/set_enabled, "
            "which return a new pipeline"
        )

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{self._kind} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:  # copy/deepcopy/pickle despite immutability
        return (self._make, (self._name, self._specs, self._weights))

    # --- read-only views ---------------------------------------------------------

    @property
    def name(self) -> str:
        """The pipeline's name (the ``pipeline`` label of its metrics and events)."""
        return self._name

    @property
    def names(self) -> tuple[str, ...]:
        """Penalty names in order, enabled or not."""
        return tuple(s.name for s in self._specs)

    @property
    def enabled_names(self) -> tuple[str, ...]:
        """Names of the enabled penalties, in order."""
        return tuple(s.name for s in self._specs if s.enabled)

    @property
    def weights(self) -> dict[str, jax.Array]:
        """``{name: weight}`` for every entry (a fresh dict)."""
        return {s.name: w for s, w in zip(self._specs, self._weights, strict=True)}

    @property
    def entries(self) -> tuple[PipelineEntry, ...]:
        """Read-only views of every entry, in order."""
        return tuple(
            PipelineEntry(
                s.name,
                s.fn,
                w,
                MappingProxyType(dict(s.options)),
                s.enabled,
                s.differentiable,
                s.inputs,
            )
            for s, w in zip(self._specs, self._weights, strict=True)
        )

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __repr__(self) -> str:
        parts = []
        for s, w in zip(self._specs, self._weights, strict=True):
            weight = "traced" if isinstance(w, jax.core.Tracer) else f"{float(w):g}"
            flags = "" if s.enabled else ", disabled"
            flags += "" if s.differentiable else ", non-differentiable"
            inputs = "" if s.inputs is None else f", inputs={s.inputs}"
            parts.append(f"{s.name}(weight={weight}{inputs}{flags})")
        return f"{self._kind}(name={self._name!r}, [{', '.join(parts)}])"

    # --- mutators (each returns a new pipeline) ---------------------------------------

    def _index(self, where: str, name: str) -> int:
        for i, s in enumerate(self._specs):
            if s.name == name:
                return i
        raise KeyError(f"{where}: no penalty named {name!r}; the pipeline has {list(self.names)}")

    def _add(
        self,
        name: str,
        fn: Callable[..., jax.Array] | None,
        *,
        inputs: tuple[str, ...] | None,
        weight: Any,
        differentiable: bool,
        enabled: bool,
        options: Mapping[str, Any] | None,
        opts: Mapping[str, Any],
        builtins: Mapping[str, Callable[..., jax.Array]],
    ) -> Self:
        where = f"penwatch.{self._kind}.add"
        self._check_new_name(where, name)
        if fn is None:
            if name not in builtins:
                raise ValueError(
                    f"{where}: penalty {name!r} needs a function (fn); only built-in names "
                    f"can omit it: {sorted(builtins)}"
                )
            fn = builtins[name]
        _checks.check_callable(where, "fn", fn)
        differentiable = _checks.check_bool(
            where, "differentiable", differentiable, label="argument"
        )
        enabled = _checks.check_bool(where, "enabled", enabled, label="argument")
        merged = dict(options or {})
        clash = sorted(set(merged) & set(opts))
        if clash:
            raise ValueError(f"{where}: options {clash} given both in 'options' and as keywords")
        merged.update(opts)
        frozen = _builtins.freeze_options(where, name, merged)
        _builtins.check_options(where, name, fn, merged, 1 if inputs is None else len(inputs))
        w = as_weight(where, name, weight)
        spec = _Spec(name, fn, frozen, enabled, differentiable, inputs)
        return self._make(self._name, (*self._specs, spec), (*self._weights, w))

    def _check_new_name(self, where: str, name: Any) -> None:
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise _checks.option_error(
                where, "name", name, "a non-empty string not starting with '_'", label="argument"
            )
        if name in RESERVED_NAMES:
            raise ValueError(
                f"{where}: penalty name {name!r} is reserved for run-level metrics; "
                f"reserved names: {sorted(RESERVED_NAMES)}"
            )
        if name in self:
            raise ValueError(f"{where}: duplicate penalty name {name!r}")
        new_keys = {penalty_key(name, q) for q in PENALTY_QUANTITIES}
        for other in self.names:
            if new_keys & {penalty_key(other, q) for q in PENALTY_QUANTITIES}:
                raise ValueError(
                    f"{where}: penalty name {name!r} would produce metric keys that clash "
                    f"with those of penalty {other!r}"
                )
        if {"total", "total_grad_norm"} & new_keys:
            raise ValueError(f"{where}: penalty name {name!r} clashes with the 'total' keys")

    def remove(self, name: str) -> Self:
        """Return a pipeline without penalty ``name`` (``KeyError`` when unknown).

        Changes the static structure: a jitted function taking the pipeline recompiles.
        """
        i = self._index(f"penwatch.{self._kind}.remove", name)
        return self._make(
            self._name,
            self._specs[:i] + self._specs[i + 1 :],
            self._weights[:i] + self._weights[i + 1 :],
        )

    def update_weight(self, name: str, weight: Any) -> Self:
        """Return a pipeline with a new weight for ``name`` (``KeyError`` when unknown).

        The weight is a pytree leaf: a jitted function taking the pipeline does not
        recompile. Python numbers keep the dtype of the weight they replace.
        """
        where = f"penwatch.{self._kind}.update_weight"
        i = self._index(where, name)
        w = as_weight(where, name, weight, current=self._weights[i])
        return self._make(self._name, self._specs, (*self._weights[:i], w, *self._weights[i + 1 :]))

    def update_weights(self, weights: Mapping[str, Any]) -> Self:
        """Return a pipeline with several weights replaced (``KeyError`` for unknown names)."""
        where = f"penwatch.{self._kind}.update_weights"
        new = list(self._weights)
        for name, weight in weights.items():
            i = self._index(where, name)
            new[i] = as_weight(where, name, weight, current=self._weights[i])
        return self._make(self._name, self._specs, tuple(new))

    def set_enabled(self, name: str, enabled: bool) -> Self:
        """Return a pipeline with ``name`` enabled or disabled (``KeyError`` when unknown).

        A disabled penalty is not computed at all. Changes the static structure: a jitted
        function taking the pipeline recompiles (once per distinct structure).
        """
        where = f"penwatch.{self._kind}.set_enabled"
        i = self._index(where, name)
        enabled = _checks.check_bool(where, "enabled", enabled, label="argument")
        specs = list(self._specs)
        specs[i] = specs[i]._replace(enabled=enabled)
        return self._make(self._name, tuple(specs), self._weights)

    # --- computation --------------------------------------------------------------

    def _call(self, spec: _Spec, inputs: Any) -> Any:
        raise NotImplementedError

    def _prepare(self, where: str, inputs: Any) -> Any:
        raise NotImplementedError

    def _value(self, spec: _Spec, inputs: Any) -> jax.Array:
        if not spec.differentiable:
            inputs = jax.lax.stop_gradient(inputs)
        value = jnp.asarray(self._call(spec, inputs))
        if value.shape != ():
            raise ValueError(
                f"penwatch.{self._kind}.compute: penalty {spec.name!r} returned shape "
                f"{value.shape}; pipeline penalties must return a scalar "
                "(reduction='none' is not allowed here)"
            )
        return value

    def _input_path(self, spec: _Spec) -> tuple[Any, ...] | None:
        """The key path of the one input array ``spec``'s function takes, or None."""
        raise NotImplementedError

    def _grad_term(self, spec: _Spec, inputs: Any) -> Callable[[Any], jax.Array] | ClosedFormTerm:
        """The entry as a closed-form term where its gradient has one, else its function.

        Closed forms exist for the element-wise built-ins applied to one input array
        (``penwatch.penalties._closed_form``); everything else takes a VJP.
        """
        value = functools.partial(self._value, spec)
        path = self._input_path(spec)
        if path is None or builtin_arity(spec.fn) is None:
            return value
        flat = jax.tree_util.tree_flatten_with_path(inputs)[0]
        leaf = next((i for i, (p, _) in enumerate(flat) if p == path), None)
        if leaf is None:
            return value
        options = dict(spec.options)
        if not has_input_grad(spec.fn, jnp.asarray(flat[leaf][1]), options):
            return value
        return ClosedFormTerm(value, leaf, lambda x: input_grad(spec.fn, x, options))

    def _compute(self, inputs: Any, track: bool) -> tuple[jax.Array, Metrics]:
        active = [(s, w) for s, w in zip(self._specs, self._weights, strict=True) if s.enabled]
        if not active:
            zero = jnp.zeros((), jnp.float32)
            return zero, Metrics.pack({"total": zero})
        values: list[Any] = [None] * len(active)
        norms: dict[str, int] = {}  # name -> position in diff_norm_vec
        total_norm = jnp.zeros((), jnp.float32)
        diff = [i for i, (s, _) in enumerate(active) if s.differentiable] if track else []
        if diff:
            terms = [self._grad_term(active[i][0], inputs) for i in diff]
            weights = jnp.stack([active[i][1] for i in diff])
            diff_values, diff_norm_vec, total_norm = fused_grad_norms(
                terms, inputs, weights=weights
            )
            for j, i in enumerate(diff):
                values[i] = diff_values[j]
                norms[active[i][0].name] = j
        for i, (s, _) in enumerate(active):
            if values[i] is None:
                values[i] = self._value(s, inputs)
        names = [s.name for s, _ in active]
        # Vectors, not scalars: every value, weight and flag of the pipeline is one
        # array, packed whole into the metrics' buffers (one concatenation; per-scalar
        # metrics cost XLA:CPU one small kernel each, SPEC section 9).
        value_vec = jnp.stack(values)
        weight_vec = jnp.stack([w for _, w in active])
        weighted_vec = weight_vec * value_vec
        acc = jnp.promote_types(weighted_vec.dtype, jnp.float32)
        total = jnp.sum(weighted_vec.astype(acc))
        columns = [
            ([penalty_key(n) for n in names], value_vec),
            ([penalty_key(n, "weighted") for n in names], weighted_vec),
            ([penalty_key(n, "weight") for n in names], weight_vec),
            ([penalty_key(n, "finite") for n in names], jnp.isfinite(value_vec)),
        ]
        order = []
        for n in names:
            order += [penalty_key(n, q) for q in ("value", "weighted", "weight", "finite")]
            if n in norms:
                order.append(penalty_key(n, "grad_norm"))
        if diff:
            columns.append(([penalty_key(names[i], "grad_norm") for i in diff], diff_norm_vec))
        run = {"total": total, **({"total_grad_norm": total_norm} if track else {})}
        columns.append((list(run), jnp.stack([v.astype(acc) for v in run.values()])))
        return total, Metrics.from_columns(columns, order=order + list(run), penalties=names)

    def _compute_total(self, inputs: Any) -> jax.Array:
        total = jnp.zeros((), jnp.float32)
        for s, w in zip(self._specs, self._weights, strict=True):
            if s.enabled:
                total = total + w * self._value(s, inputs)
        return total

    def _run_compute(self, inputs: Any, track_grad_norms: bool) -> tuple[jax.Array, Metrics]:
        where = f"penwatch.{self._kind}.compute"
        track = _checks.check_bool(where, "track_grad_norms", track_grad_norms)
        args = self._prepare(where, inputs)
        if _is_traced((args, self._weights)):
            # Inside a trace (jit/grad/vmap): pure, no events.
            return _compute_jit(self, args, track)
        size = sum(s.enabled for s in self._specs)
        with events.span(events.PIPELINE_COMPUTE, {"pipeline": self._name, "size": size}) as meta:
            total, metrics = _compute_jit(self, args, track)
            meta.update(metrics=metrics, total=total, track_grad_norms=track)
        return total, metrics

    def _run_compute_total(self, inputs: Any) -> jax.Array:
        args = self._prepare(f"penwatch.{self._kind}.compute_total", inputs)
        return _compute_total_jit(self, args)


# Compiled once per static structure (the pytree's aux data) and input shapes; weights
# are arguments, so eager calls with new weights reuse the compiled code.
@functools.partial(jax.jit, static_argnums=2)
def _compute_jit(pipe: _PipelineBase, inputs: Any, track: bool) -> tuple[jax.Array, Metrics]:
    return pipe._compute(inputs, track)


@jax.jit
def _compute_total_jit(pipe: _PipelineBase, inputs: Any) -> jax.Array:
    return pipe._compute_total(inputs)
