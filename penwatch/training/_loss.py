"""Loss wrappers (the seed's Axon patterns 1 and 2) over optax-style losses.

Losses follow optax's argument order, ``loss_fn(predictions, targets) -> scalar`` (the
seed's Axon losses take ``(y_true, y_pred)``; swap the arguments when porting).
A loss may return per-example values (as optax's losses do): penwatch averages them
(``jnp.mean``) into the scalar base loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from penwatch import _checks

__all__ = ["flatten_params", "wrap_loss", "wrap_loss_with_pipeline"]

LossFn = Callable[[Any, Any], jax.Array]
PENALTY_ON = ("outputs", "params")


def flatten_params(params: Any) -> jax.Array:
    """All floating-point leaves of ``params``, raveled and concatenated into one vector.

    The input of a penalty "on the parameters": ``l1``/``l2``/``elastic_net`` with
    ``reduction="sum"`` of this vector equal the sums over the leaves.

    Args:
      params: a pytree of arrays.

    Returns:
      A 1-D array (dtype: the promoted dtype of the floating leaves; empty if none).
    """
    leaves = [
        jnp.ravel(leaf)
        for leaf in jax.tree.leaves(params)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate(leaves) if len(leaves) > 1 else leaves[0]


def _check_on(fn: str, on: Any) -> str:
    return _checks.check_choice(fn, "on", on, PENALTY_ON)


def wrap_loss(
    loss_fn: LossFn,
    penalty_fn: Callable[..., jax.Array],
    *,
    weight: float = 0.01,
    on: Literal["outputs", "params"] = "outputs",
    **opts: Any,
) -> Callable[..., jax.Array]:
    """Add one weighted penalty to a loss.

    .. math:: L'(\\hat y, y) = L(\\hat y, y) + w \\cdot P(\\hat y)
       \\quad\\text{or, with } on=\\text{"params"},\\quad
       L'(\\hat y, y, \\theta) = L(\\hat y, y) + w \\cdot P(\\operatorname{flat}(\\theta))

    ``weight`` is closed over (a constant of the returned function); for weights that
    change during training use a pipeline and :func:`build_train_step`.

    Args:
      loss_fn: ``loss_fn(predictions, targets) -> scalar``.
      penalty_fn: ``penalty_fn(x, **opts) -> scalar``, e.g. ``pw.l2``.
      weight: the penalty's weight ``w`` (finite real).
      on: ``"outputs"``: penalize the predictions; ``"params"``: penalize all parameters
        (:func:`flatten_params`), and the wrapped loss takes ``params`` as a third
        argument.
      **opts: options passed to ``penalty_fn``.

    Returns:
      ``fn(predictions, targets) -> scalar`` (``fn(predictions, targets, params)`` with
      ``on="params"``); jit- and grad-compatible.

    Example:
      >>> import jax.numpy as jnp, optax, penwatch as pw
      >>> loss = pw.training.wrap_loss(optax.l2_loss, pw.l2, weight=0.1)
      >>> round(float(loss(jnp.ones(3), jnp.zeros(3))), 6)
      0.8
    """
    fn = "penwatch.training.wrap_loss"
    _checks.check_callable(fn, "loss_fn", loss_fn)
    _checks.check_callable(fn, "penalty_fn", penalty_fn)
    weight = _checks.check_finite_real(fn, "weight", weight)
    on = _check_on(fn, on)

    if on == "outputs":

        def wrapped(predictions: Any, targets: Any) -> jax.Array:
            base = jnp.mean(loss_fn(predictions, targets))
            return base + weight * penalty_fn(predictions, **opts)

    else:

        def wrapped(predictions: Any, targets: Any, params: Any) -> jax.Array:
            base = jnp.mean(loss_fn(predictions, targets))
            return base + weight * penalty_fn(flatten_params(params), **opts)

    return wrapped


def wrap_loss_with_pipeline(
    loss_fn: LossFn, pipeline: Any, *, on: Literal["outputs", "params"] = "outputs"
) -> Callable[..., jax.Array]:
    """Add a pipeline's weighted total to a loss: ``L + pipeline.compute_total(x)``.

    The pipeline is closed over; pass a new one (or use :func:`build_train_step`, whose
    state carries the pipeline) to change weights. Metrics are not returned: use
    :func:`build_train_step` for per-penalty metrics.

    Args:
      loss_fn: ``loss_fn(predictions, targets) -> scalar``.
      pipeline: a ``penwatch.Pipeline``.
      on: ``"outputs"`` (penalize predictions) or ``"params"`` (penalize
        :func:`flatten_params` of the parameters; the loss then takes ``params`` third).

    Returns:
      The wrapped loss, jit- and grad-compatible.
    """
    fn = "penwatch.training.wrap_loss_with_pipeline"
    _checks.check_callable(fn, "loss_fn", loss_fn)
    if not hasattr(pipeline, "compute_total"):
        raise _checks.option_error(
            fn, "pipeline", pipeline, "a penwatch Pipeline", label="argument"
        )
    on = _check_on(fn, on)

    if on == "outputs":

        def wrapped(predictions: Any, targets: Any) -> jax.Array:
            base = jnp.mean(loss_fn(predictions, targets))
            return base + pipeline.compute_total(predictions)

    else:

        def wrapped(predictions: Any, targets: Any, params: Any) -> jax.Array:
            base = jnp.mean(loss_fn(predictions, targets))
            return base + pipeline.compute_total(flatten_params(params))

    return wrapped
