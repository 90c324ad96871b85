"""The demo training run: a small MLP on synthetic data with five penalties.

Model: ``x[16] -> tanh(64) -> tanh(64) -> logits[4]``, a classification task whose labels
come from a fixed random "teacher" plus noise. The loss is cross-entropy; the penalties:

* ``entropy`` of the predicted distribution (``mode="penalty"``: confident predictions),
* ``output_magnitude`` of the logits (keeps them near unit RMS),
* ``orthogonality`` of the first layer's weight rows (decorrelated input features),
* ``l1`` and ``l2`` of all parameters (closed-form parameter terms: no backward pass).

The step is penwatch's own ``build_train_step`` (jitted, metrics on device, gradient
diagnostics every few steps, per-leaf NaN/Inf counts, ``skip_nonfinite`` so one bad step
does not poison the weights). ``inject_nan_at=K`` sets the ``orthogonality`` weight to
NaN for step K only: its weighted value, the total, the loss and the first layer's
gradient go NaN, the update is skipped, and the monitor's report names
``orthogonality`` and ``grads['hidden']['w']``.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import penwatch as pw
from penwatch.diagnostics import l1_term, l2_term
from penwatch.training import TrainState

__all__ = ["NAN_PENALTY", "apply_fn", "build", "init_params", "make_batches", "run", "with_nan"]

N_IN, HIDDEN, N_CLASSES = 16, 64, 4
NAN_PENALTY = "orthogonality"
"""The penalty whose weight ``inject_nan_at`` turns into NaN for one step."""


def init_params(key: jax.Array, *, n_in: int = N_IN, hidden: int = HIDDEN) -> dict[str, Any]:
    """Glorot-style initial parameters of the demo MLP."""
    k1, k2, k3 = jax.random.split(key, 3)

    def dense(k: jax.Array, m: int, n: int) -> dict[str, jax.Array]:
        return {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros((n,))}

    return {
        "hidden": dense(k1, n_in, hidden),
        "hidden2": dense(k2, hidden, hidden),
        "out": dense(k3, hidden, N_CLASSES),
    }


def apply_fn(params: dict[str, Any], x: jax.Array) -> jax.Array:
    """The MLP's logits."""
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    h = jnp.tanh(h @ params["hidden2"]["w"] + params["hidden2"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def make_batches(
    n: int, *, batch: int = 128, n_in: int = N_IN, seed: int = 0
) -> list[tuple[jax.Array, jax.Array]]:
    """``n`` synthetic ``(x, labels)`` batches from a fixed noisy linear teacher."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(n_in, N_CLASSES))
    out = []
    for _ in range(n):
        x = rng.normal(size=(batch, n_in)).astype(np.float32)
        y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(batch, N_CLASSES)), axis=-1)
        out.append((jnp.asarray(x), jnp.asarray(y, dtype=jnp.int32)))
    return out


def _loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _penalty_inputs(params: dict[str, Any], logits: jax.Array) -> dict[str, jax.Array]:
    return {
        "logits": logits,
        "logprobs": jax.nn.log_softmax(logits),
        "hidden_w": params["hidden"]["w"].T,  # rows: the input features' fan-out
    }


@functools.cache
def build(
    *, diagnostics_every: int = 5, learning_rate: float = 3e-2
) -> tuple[Callable[..., TrainState], Callable[..., Any]]:
    """``(init_fn, step_fn)`` of the demo: penwatch's jitted train step, five penalties.

    Cached: every caller in a process shares one compiled step.
    """
    pipe = (
        pw.MultiPipeline(name="demo")
        .add("entropy", pw.entropy, inputs=("logprobs",), weight=0.02, mode="penalty")
        .add("output_magnitude", pw.output_magnitude_penalty, inputs=("logits",), weight=1e-2)
        .add(NAN_PENALTY, pw.orthogonality, inputs=("hidden_w",), weight=1e-3)
    )
    return pw.build_train_step(
        apply_fn,
        _loss_fn,
        pipe,
        optax.adam(learning_rate),
        penalty_on=_penalty_inputs,
        diagnostics_every=diagnostics_every,
        param_terms={"l1": l1_term(1e-5), "l2": l2_term(1e-4)},
        skip_nonfinite=True,
    )


def with_nan(state: TrainState, penalty: str = NAN_PENALTY) -> TrainState:
    """``state`` with ``penalty``'s pipeline weight set to NaN (a fault, for one step).

    Weights are pytree leaves of the pipeline, so this swaps one leaf without
    recompiling (``update_weight`` rightly refuses NaN).
    """
    pipe = state.pipeline
    leaves, treedef = jax.tree_util.tree_flatten(pipe)
    index = pipe.names.index(penalty)
    leaves[index] = jnp.full_like(leaves[index], jnp.nan)
    return state._replace(pipeline=jax.tree_util.tree_unflatten(treedef, leaves))


def run(
    monitor: pw.Monitor,
    *,
    steps: int | None,
    inject_nan_at: int | None = None,
    step_delay: float = 0.0,
    seed: int = 0,
    stop: threading.Event | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainState:
    """Train for ``steps`` steps (or until ``stop`` is set), recording every step.

    Args:
      monitor: where the metrics go (never read back on this thread).
      steps: number of steps, or None to train until ``stop`` is set or a stop signal
        arrives (Ctrl-C, SIGTERM; ``monitor.stop_signal``).
      inject_nan_at: the step whose ``orthogonality`` weight is NaN, or None.
      step_delay: seconds to pause between steps (paces a live demo).
      seed: parameter and data seed.
      stop: set it to end training early.
      on_step: called with each step index after it was dispatched.

    Returns:
      The final :class:`~penwatch.training.TrainState`.
    """
    init_fn, step_fn = build()
    state = init_fn(init_params(jax.random.PRNGKey(seed)))
    batches = make_batches(64, seed=seed)
    for step in range(steps) if steps is not None else itertools.count():
        # a stop signal whose exception the code it interrupted swallowed ends it too
        if (stop is not None and stop.is_set()) or monitor.stop_signal is not None:
            break
        faulty = step == inject_nan_at
        dispatched = time.time_ns()
        new_state, metrics = step_fn(with_nan(state) if faulty else state, batches[step % 64])
        monitor.record(
            step,
            metrics,  # the record's loss defaults to metrics["base_loss"]
            pipeline="demo",
            dispatched_at_ns=dispatched,
        )
        # After the faulty step, put the healthy pipeline (weights) back.
        state = new_state._replace(pipeline=state.pipeline) if faulty else new_state
        if on_step is not None:
            on_step(step)
        if step_delay > 0:
            time.sleep(step_delay)
    return jax.block_until_ready(state)
