"""Gradient diagnostics for a model whose outputs feed a penalty pipeline."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from penwatch import _checks
from penwatch.diagnostics._closed_form import ParamTerm
from penwatch.diagnostics._dominance import gradient_diagnostics
from penwatch.schema import penalty_key

PyTree = Any


def pipeline_terms_fn(
    apply_fn: Callable[[PyTree, Any], Any],
    loss_fn: Callable[[Any, Any], Any],
    pipeline: Any,
    batch: Any,
) -> Callable[[PyTree], Any]:
    """Build a ``terms_fn`` (with auxiliary output) for a model and a penalty pipeline.

    The returned function maps ``params`` to ``((base_loss, {name: weighted_term}),
    pipeline_metrics)``: ``outputs = apply_fn(params, x)``, ``base_loss =
    mean(loss_fn(outputs, y))`` and one term per enabled penalty, its
    ``"<name>_weighted"`` value from ``pipeline.compute(outputs)``. Use it with
    :func:`value_and_grad_with_diagnostics` (``has_aux=True``) to get the pipeline's
    metrics from the same forward pass. A ``differentiable=False`` penalty is a term
    whose gradient is zero (the pipeline stops its gradient): norm, share and cosine 0.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs`` (a plain function, ``model.apply``…).
      loss_fn: ``loss_fn(outputs, y)``, a scalar or per-example losses (averaged).
      pipeline: a :class:`penwatch.Pipeline` (or ``MultiPipeline`` when ``outputs`` is
        the dict of its named inputs) applied to the outputs.
      batch: ``(x, y)``, ``[x, y]`` or a dict with keys ``x``/``y`` or
        ``inputs``/``targets``.

    Returns:
      ``terms_fn(params) -> ((base_loss, terms), metrics)``.
    """
    fn = "penwatch.diagnostics.pipeline_terms_fn"
    _checks.check_callable(fn, "apply_fn", apply_fn)
    _checks.check_callable(fn, "loss_fn", loss_fn)
    if not hasattr(pipeline, "compute") or not hasattr(pipeline, "enabled_names"):
        raise _checks.option_error(
            fn, "pipeline", pipeline, "a penwatch Pipeline or MultiPipeline", label="argument"
        )
    x, y = _split_batch(fn, batch)
    names = tuple(pipeline.enabled_names)

    def terms_fn(params: PyTree) -> Any:
        outputs = apply_fn(params, x)
        base = jnp.mean(loss_fn(outputs, y))
        _, metrics = pipeline.compute(outputs)
        return (base, {name: metrics[penalty_key(name, "weighted")] for name in names}), metrics

    return terms_fn


def pipeline_diagnostics(
    apply_fn: Callable[[PyTree, Any], Any],
    loss_fn: Callable[[Any, Any], Any],
    pipeline: Any,
    params: PyTree,
    batch: Any,
    *,
    param_terms: Mapping[str, ParamTerm] | None = None,
    pairwise: bool = False,
) -> dict[str, jax.Array]:
    """:func:`gradient_diagnostics` of a task loss plus a pipeline's penalties on outputs.

    Compiled once per model/loss function, pipeline structure and shapes: new weights
    (the pipeline's and ``param_terms``'), new parameters and new batches reuse the
    compiled code, so calling it every N steps costs one forward and one vectorized
    backward pass. Terms are ``base`` (the task loss), each enabled penalty of the
    pipeline (its weighted value) and ``param_terms``.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``; keep the same function object
        between calls (it is a static argument of the compiled function).
      loss_fn: ``loss_fn(outputs, y)`` (a scalar or per-example losses, averaged).
      pipeline: the penalty pipeline applied to the outputs.
      params: the parameter pytree.
      batch: ``(x, y)`` or a dict with ``x``/``y`` or ``inputs``/``targets``.
      param_terms: parameter-only terms (:func:`l1_term`, :func:`l2_term`,
        :func:`elastic_net_term`), differentiated in closed form.
      pairwise: also return ``"pairwise_cosine"``.

    Returns:
      The :func:`gradient_diagnostics` metrics dict.
    """
    fn = "penwatch.diagnostics.pipeline_diagnostics"
    _checks.check_callable(fn, "apply_fn", apply_fn)
    _checks.check_callable(fn, "loss_fn", loss_fn)
    pairwise = _checks.check_bool(fn, "pairwise", pairwise)
    return _pipeline_diagnostics_jit(
        apply_fn, loss_fn, pairwise, pipeline, params, batch, param_terms
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pipeline_diagnostics_jit(
    apply_fn: Callable,
    loss_fn: Callable,
    pairwise: bool,
    pipeline: Any,
    params: PyTree,
    batch: Any,
    param_terms: Mapping[str, ParamTerm] | None,
) -> dict[str, jax.Array]:
    terms_fn = pipeline_terms_fn(apply_fn, loss_fn, pipeline, batch)
    return gradient_diagnostics(
        lambda p: terms_fn(p)[0], params, param_terms=param_terms, pairwise=pairwise
    )


def _split_batch(fn: str, batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        for xk, yk in (("x", "y"), ("inputs", "targets")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    got = (
        f"a dict with keys {sorted(map(str, batch))}"
        if isinstance(batch, Mapping)
        else f"a {type(batch).__name__}"
    )
    raise ValueError(
        f"{fn}: argument 'batch' must be (x, y), [x, y] or a dict with keys ('x', 'y') or "
        f"('inputs', 'targets'), got {got}"
    )
