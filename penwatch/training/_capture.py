"""Activity regularization: ``pw.capture(name, x)`` in a model + ``build_activity_train_step``.

``capture`` is the identity everywhere. Inside :func:`collect` (which the activity train
step and :func:`collect_activations` use around the model call) it also stores ``x``
under ``name`` in a collector held in a :mod:`contextvars` variable. The collector lives
at *trace* time: under ``jax.jit`` / ``jax.grad`` the model function runs once with
tracers, ``capture`` stores those tracers, and the caller uses them in the same traced
computation (to add a penalty of the activations to the loss). Nothing is stored outside
a collecting context, so a model with captures runs unchanged in inference.

Limitation: a capture inside an inner JAX transformation of the model (``jax.lax.scan``,
``jax.vmap``, ``jax.checkpoint``, Flax's lifted transforms) records a tracer of that
inner trace, which cannot escape it (JAX raises ``UnexpectedTracerError`` when it is
used). Capture
outside such transforms, or return the activation from them (Flax Linen users can also
use ``self.sow`` and ``mutable=["intermediates"]``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax

from penwatch import _checks
from penwatch.schema import capture_key

__all__ = ["build_activity_train_step", "capture", "collect", "collect_activations"]

T = TypeVar("T")

_COLLECTOR: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "penwatch_capture_collector", default=None
)


def capture(name: str, x: T) -> T:
    """Record the activation ``x`` under ``name``; return ``x`` unchanged.

    A no-op (the identity) outside a collecting context; inside one (the activity train
    step, :func:`collect_activations`) the value is recorded for activity penalties.
    Capturing the same name twice in one forward pass raises ``ValueError``.

    Args:
      name: the capture point's name (the key in ``build_activity_train_step``'s
        ``activity`` mapping).
      x: an array (or pytree of arrays).

    Returns:
      ``x``, unchanged.

    Example:
      >>> import jax.numpy as jnp, penwatch as pw
      >>> def model(params, x):
      ...     h = pw.capture("hidden1", jnp.tanh(x @ params["w1"]))
      ...     return h @ params["w2"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"penwatch.capture: argument 'name' must be a non-empty str, got {name!r}")
    collector = _COLLECTOR.get()
    if collector is not None:
        if name in collector:
            raise ValueError(
                f"penwatch.capture: activation {name!r} was captured twice in one forward "
                "pass; give each capture point its own name"
            )
        collector[name] = x
    return x


@contextlib.contextmanager
def collect() -> Iterator[dict[str, Any]]:
    """Context manager collecting every :func:`capture` made inside it into a dict.

    Yields:
      The dict ``{name: activation}``, filled as the model runs.
    """
    store: dict[str, Any] = {}
    token = _COLLECTOR.set(store)
    try:
        yield store
    finally:
        _COLLECTOR.reset(token)


def collect_activations(
    apply_fn: Callable[..., Any], params: Any, x: Any, *args: Any, **kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """Run ``apply_fn(params, x, *args, **kwargs)`` and return its outputs and captures.

    Works eagerly and under ``jax.jit`` / ``jax.grad`` (the captures are then tracers of
    the same computation).

    Args:
      apply_fn: the model, ``apply_fn(params, x, ...)``.
      params: model parameters.
      x: model input.
      *args: extra positional arguments for ``apply_fn``.
      **kwargs: extra keyword arguments for ``apply_fn``.

    Returns:
      ``(outputs, {name: activation})``.
    """
    with collect() as captures:
        outputs = apply_fn(params, x, *args, **kwargs)
    captures = dict(captures)
    return outputs, captures


def _activity_pipeline(fn: str, activity: Any) -> Any:
    from penwatch.pipelines import MultiPipeline

    if isinstance(activity, MultiPipeline):
        return activity
    if not isinstance(activity, Mapping) or not activity:
        raise _checks.option_error(
            fn,
            "activity",
            activity,
            "a non-empty mapping {capture name: (penalty_fn, weight[, options])} or a "
            "MultiPipeline over capture names",
            label="argument",
        )
    pipe = MultiPipeline(name="activity")
    for name, spec in activity.items():
        if callable(spec):
            spec = (spec, 1.0)
        if not isinstance(spec, tuple | list) or len(spec) not in (2, 3):
            raise _checks.option_error(
                fn,
                f"activity[{name!r}]",
                spec,
                "(penalty_fn, weight) or (penalty_fn, weight, {options})",
            )
        opts = dict(spec[2]) if len(spec) == 3 else {}
        pipe = pipe.add(name, spec[0], inputs=(name,), weight=spec[1], **opts)
    return pipe


def build_activity_train_step(
    apply_fn: Callable[[Any, Any], Any],
    loss_fn: Callable[[Any, Any], jax.Array],
    activity: Mapping[str, Any] | Any,
    optimizer: optax.GradientTransformation,
    **kwargs: Any,
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A train step with activity regularization of activations marked by ``pw.capture``.

    The model calls ``pw.capture("hidden1", h)``; the step collects the captures while
    tracing the forward pass and adds ``Σ w·P(activation)`` to the loss.

    Args:
      apply_fn: the model; its ``pw.capture`` calls name the activations.
      loss_fn: ``loss_fn(predictions, targets)``.
      activity: ``{capture name: (penalty_fn, weight)}`` or ``(penalty_fn, weight,
        {options})``, e.g. ``{"hidden1": (pw.l1, 1e-3)}``; or a ``MultiPipeline`` whose
        inputs are capture names (and ``"outputs"``, the predictions). Penalty names are
        the capture names, so metrics are ``hidden1``, ``hidden1_weighted``, …
      optimizer: an optax transformation.
      **kwargs: :func:`build_train_step` options (``diagnostics_every``,
        ``param_terms``, ``skip_nonfinite``, …; not ``penalty_on``).

    Returns:
      ``(init_fn, step_fn)`` as :func:`build_train_step`; the state's ``pipeline`` is the
      activity ``MultiPipeline`` (schedulable like any pipeline).
    """
    fn = "penwatch.training.build_activity_train_step"
    if "penalty_on" in kwargs:
        raise ValueError(f"{fn}: option 'penalty_on' does not apply (penalties read captures)")
    pipe = _activity_pipeline(fn, activity)

    def forward(params: Any, x: Any) -> tuple[Any, Any]:
        with collect() as captures:
            preds = apply_fn(params, x)
        return preds, {**captures, "outputs": preds}

    defaults = {
        "diagnostics_every": 0,
        "param_terms": None,
        "pairwise": False,
        "track_grad_norms": False,
        "skip_nonfinite": False,
        "max_nonfinite_skips": None,
        "leaf_report": True,
        "nan_capsule": None,
        "preconditioner": "auto",
    }
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"{fn}: unknown options {unknown}; allowed: {sorted(defaults)}")
    from penwatch.training._step import _make_step

    captured = tuple(name for name in pipe.required_inputs if name != "outputs")

    def dead_fractions(penalty_input: Any) -> dict[str, Any]:
        return {
            capture_key(name, "dead_fraction"): dead_fraction(penalty_input[name])
            for name in captured
            if hasattr(penalty_input.get(name), "shape")
        }

    return _make_step(
        fn,
        apply_fn,
        loss_fn,
        pipe,
        optimizer,
        forward=forward,
        extra_metrics=dead_fractions,
        **{**defaults, **kwargs},
    )


def dead_fraction(x: Any) -> jax.Array:
    """The fraction of units of an activation ``[batch, ...units]`` that are zero for the
    whole batch (every example): ``mean_u [∀b: x[b, u] = 0]`` (SPEC §12). A scalar or 1-D
    activation counts each entry as a unit."""
    x = jnp.asarray(x)
    if x.ndim <= 1:
        return jnp.mean((x == 0).astype(jnp.float32))
    return jnp.mean(jnp.all(x.reshape(x.shape[0], -1) == 0, axis=0).astype(jnp.float32))
