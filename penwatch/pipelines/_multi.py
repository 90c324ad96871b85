"""Multi-input penalty pipelines: penalties over named inputs (divergences, consistency)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from penwatch import _checks
from penwatch.pipelines import _builtins
from penwatch.pipelines._core import _PipelineBase, _Spec
from penwatch.schema import Metrics

__all__ = ["MultiPipeline"]

_MULTI_BUILTINS = {**_builtins.SINGLE_INPUT, **_builtins.MULTI_INPUT}


@jax.tree_util.register_pytree_node_class
class MultiPipeline(_PipelineBase):
    """An immutable, weighted composition of penalties over named inputs.

    Each penalty is called as ``fn(inputs[k1], inputs[k2], ..., **options)`` for its
    ``inputs=(k1, k2, ...)``. Same pytree and immutability rules as
    :class:`~penwatch.pipelines.Pipeline`; gradient norms are taken with respect to all of a
    penalty's named inputs together.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import penwatch as pw
      >>> pipe = (pw.MultiPipeline(name="distill")
      ...         .add("kl", pw.kl_divergence, inputs=("student", "teacher"), weight=0.1))
      >>> s = jax.nn.log_softmax(jnp.array([[1.0, 2.0, 3.0]]))
      >>> t = jax.nn.log_softmax(jnp.array([[3.0, 2.0, 1.0]]))
      >>> total, metrics = pipe.compute({"student": s, "teacher": t})

    Args:
      name: the pipeline's name: the ``pipeline`` label of its metrics and events.
    """

    __slots__ = ()
    _kind = "MultiPipeline"

    def add(
        self,
        name: str,
        fn: Callable[..., jax.Array] | None = None,
        *,
        inputs: Sequence[str],
        weight: Any = 1.0,
        differentiable: bool = True,
        enabled: bool = True,
        options: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> MultiPipeline:
        """Return a pipeline with one more penalty over the named ``inputs``.

        Args:
          name: unique penalty name; it prefixes the penalty's metric keys.
          fn: called as ``fn(*[inputs[k] for k in inputs], **options)``, returns a scalar.
            May be omitted for a built-in name (``kl``, ``js``, ``consistency`` and the
            one-input built-ins).
          inputs: the input names passed positionally, e.g. ``("student", "teacher")``.
          weight: a finite real scalar.
          differentiable: False: evaluated on stopped gradients, left out of gradient
            tracking (see :meth:`Pipeline.add`).
          enabled: False adds the entry disabled.
          options: penalty options as a mapping.
          **opts: penalty options (static, hashable), checked now.

        Raises:
          ValueError: duplicate/reserved name, bad inputs or weight, rejected options.
        """
        where = "penwatch.MultiPipeline.add"
        if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
            raise _checks.option_error(
                where, "inputs", inputs, "a non-empty sequence of input names", label="argument"
            )
        for key in inputs:
            if not isinstance(key, str) or not key:
                raise _checks.option_error(
                    where, "inputs", inputs, "a sequence of non-empty strings", label="argument"
                )
        return self._add(
            name,
            fn,
            inputs=tuple(inputs),
            weight=weight,
            differentiable=differentiable,
            enabled=enabled,
            options=options,
            opts=opts,
            builtins=_MULTI_BUILTINS,
        )

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """Sorted names of the inputs the enabled penalties read."""
        return tuple(sorted({k for s in self._specs if s.enabled for k in s.inputs or ()}))

    def compute(
        self, inputs: Mapping[str, Any], *, track_grad_norms: bool = False
    ) -> tuple[jax.Array, Metrics]:
        """Weighted total and per-penalty metrics over named inputs (device arrays).

        Same keys, rules and :class:`penwatch.Metrics` return as :meth:`Pipeline.compute`;
        ``P_grad_norm`` is the norm of the gradient of ``P`` with respect to all of its
        named inputs together.

        Args:
          inputs: ``{input_name: array}``; keys no enabled penalty reads are ignored.
          track_grad_norms: also compute the input-gradient norms (one compiled pass).

        Raises:
          KeyError: an input a penalty needs is missing (names the penalty and the key).
        """
        return self._run_compute(inputs, track_grad_norms)

    def compute_total(self, inputs: Mapping[str, Any]) -> jax.Array:
        """The weighted total only: a scalar, differentiable with ``jax.grad``."""
        return self._run_compute_total(inputs)

    def _call(self, spec: _Spec, inputs: Any) -> Any:
        return spec.fn(*(inputs[k] for k in spec.inputs or ()), **dict(spec.options))

    def _input_path(self, spec: _Spec) -> tuple[Any, ...] | None:
        if spec.inputs is None or len(spec.inputs) != 1:
            return None
        return (jax.tree_util.DictKey(spec.inputs[0]),)

    def _prepare(self, where: str, inputs: Any) -> dict[str, Any]:
        if not isinstance(inputs, Mapping):
            raise _checks.option_error(
                where, "inputs", inputs, "a mapping of input names to arrays", label="argument"
            )
        for s in self._specs:
            if not s.enabled:
                continue
            for key in s.inputs or ():
                if key not in inputs:
                    raise KeyError(
                        f"{where}: penalty {s.name!r} needs input {key!r}, which is missing "
                        f"(given inputs: {sorted(map(str, inputs))})"
                    )
        return {key: inputs[key] for key in self.required_inputs}
