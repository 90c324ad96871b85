"""Single-input penalty pipelines."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from penwatch.pipelines import _builtins
from penwatch.pipelines._core import _PipelineBase, _Spec
from penwatch.schema import Metrics

__all__ = ["Pipeline"]


@jax.tree_util.register_pytree_node_class
class Pipeline(_PipelineBase):
    """An immutable, weighted composition of penalties applied to one input.

    A JAX pytree: the weights are its leaves and everything else (names, functions,
    options, enabled/differentiable flags, the name) is static. Passing a pipeline to a
    jitted function and changing weights with :meth:`update_weight` never recompiles;
    :meth:`add`, :meth:`remove` and :meth:`set_enabled` change the structure and do.
    Every mutator returns a new pipeline.

    Example:
      >>> import jax.numpy as jnp
      >>> import penwatch as pw
      >>> pipe = (pw.Pipeline(name="reg")
      ...         .add("l1", pw.l1, weight=1e-3)
      ...         .add("l2", pw.l2, weight=1e-2, clip=10.0))
      >>> total, metrics = pipe.compute(jnp.array([1.0, -2.0, 3.0]))
      >>> list(metrics)[:4]
      ['l1', 'l1_weighted', 'l1_weight', 'l1_finite']
      >>> metrics.penalties
      ('l1', 'l2')

    Args:
      name: the pipeline's name: the ``pipeline`` label of its metrics and events.
    """

    __slots__ = ()
    _kind = "Pipeline"

    def add(
        self,
        name: str,
        fn: Callable[..., jax.Array] | None = None,
        *,
        weight: Any = 1.0,
        differentiable: bool = True,
        enabled: bool = True,
        options: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> Pipeline:
        """Return a pipeline with one more penalty, called as ``fn(x, **options)``.

        Args:
          name: unique penalty name; it prefixes the penalty's metric keys.
          fn: a function of the pipeline input returning a scalar. May be omitted for a
            built-in name (``l1``, ``l2``, ``elastic_net``, ``entropy``, ``orthogonality``,
            ``output_magnitude``).
          weight: a finite real scalar (Python number -> float32; an array keeps its
            floating dtype).
          differentiable: False for penalties with no useful gradient (``argmax``...):
            evaluated on ``stop_gradient(x)``, so they contribute their value but no
            gradient, and are left out of gradient-norm tracking.
          enabled: False adds the entry disabled (not computed until enabled).
          options: penalty options as a mapping (for names that clash with the keywords
            above).
          **opts: penalty options (static, hashable), checked now.

        Raises:
          ValueError: duplicate/reserved name, bad weight, or options ``fn`` rejects.
        """
        return self._add(
            name,
            fn,
            inputs=None,
            weight=weight,
            differentiable=differentiable,
            enabled=enabled,
            options=options,
            opts=opts,
            builtins=_builtins.SINGLE_INPUT,
        )

    def compute(self, x: Any, *, track_grad_norms: bool = False) -> tuple[jax.Array, Metrics]:
        r"""Weighted total and per-penalty metrics, as device arrays (no host sync).

        .. math::
          \mathrm{total}(x) = \sum_{i\ \mathrm{enabled}} w_i\, P_i(x)

        Metric keys per enabled penalty ``P``: ``P`` (raw value), ``P_weighted``,
        ``P_weight``, ``P_finite`` (bool), and with ``track_grad_norms=True``
        ``P_grad_norm`` = :math:`\lVert \nabla_x P(x) \rVert` (raw penalty, differentiable
        penalties only); plus ``total`` and, when tracking, ``total_grad_norm`` =
        :math:`\lVert \nabla_x \mathrm{total}(x) \rVert`. All gradient norms come from one
        compiled pass (one forward and one backward per penalty).

        Called on the host, the computation is compiled once per pipeline structure and
        input shape (weights are arguments) and emits the ``penwatch.events`` compute
        start/stop events. Called inside ``jit``/``grad``/``vmap`` it is pure (no events).

        The metrics are a :class:`penwatch.Metrics`: an immutable mapping whose values
        are packed into one device buffer per dtype group (the compiled function has
        three outputs, not one per metric), keys in computation order, penalties in
        pipeline order as ``metrics.penalties``. ``metrics["l1"]`` works inside and
        outside ``jit``; ``dict(metrics)`` gives a mutable copy and
        ``metrics.scalars()`` every value as a Python float (one transfer per buffer).

        Args:
          x: the pipeline input (an array, or any pytree the penalties accept).
          track_grad_norms: also compute the input-gradient norms.

        Returns:
          ``(total, metrics)``; an empty or all-disabled pipeline gives a total of 0 and
          metrics ``{"total": 0}``.
        """
        return self._run_compute(x, track_grad_norms)

    def compute_total(self, x: Any) -> jax.Array:
        """The weighted total only: a scalar, differentiable with ``jax.grad``."""
        return self._run_compute_total(x)

    def _call(self, spec: _Spec, inputs: Any) -> Any:
        return spec.fn(inputs, **dict(spec.options))

    def _input_path(self, spec: _Spec) -> tuple[Any, ...] | None:
        return ()  # the pipeline input itself, when it is one array

    def _prepare(self, where: str, inputs: Any) -> Any:
        return inputs
