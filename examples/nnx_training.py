"""penwatch with Flax NNX, the idiomatic way: ``nnx.Module``, ``nnx.Optimizer``, ``nnx.jit``.

A hand-written training loop over a small classifier with two output penalties (entropy of
the predictions, output magnitude) from a penwatch pipeline and an L2 parameter term:

* the train step is an ``nnx.jit`` function of ``(model, optimizer, pipe, x, y)``; the
  pipeline's ``compute`` returns ``pw.Metrics`` (packed on the device), merged with the
  task loss — nothing is read back on the host;
* every ``diagnostics_every`` steps a second ``nnx.jit`` function splits the model
  (``nnx.split(model, nnx.Param, ...)``) and asks :func:`penwatch.gradient_diagnostics`
  which term drives the update (per-term gradient norms, shares, cosines);
* a ``pw.Monitor`` records every step (non-finite detection, alerts, the SQLite store the
  dashboard reads); ``--inject-nan-at K`` makes step K's batch NaN: the update is
  skipped (``optax.apply_if_finite``) and the monitor names the first non-finite metric.

Run: ``python examples/nnx_training.py [--steps N] [--db runs/nnx.db]``
(``PENWATCH_EXAMPLE_QUICK=1``: a few steps).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import penwatch as pw
from penwatch.diagnostics import l2_term, pipeline_terms_fn

N_IN, HIDDEN, N_CLASSES = 8, 32, 3
L2 = l2_term(1e-4)  # a parameter term: closed-form gradient, its weight is data


class Classifier(nnx.Module):
    """``x[8] -> relu(32) -> logits[3]``."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(N_IN, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, N_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def task_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy (optax argument order: predictions, targets)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_pipeline() -> pw.Pipeline:
    """The output penalties: weights are pytree leaves (no recompiles when they change)."""
    return pw.pipeline([("entropy", 0.02, {"mode": "penalty"}), ("output_magnitude", 1e-3)])


@nnx.jit
def train_step(
    model: Classifier, optimizer: nnx.Optimizer, pipe: pw.Pipeline, x: jax.Array, y: jax.Array
) -> pw.Metrics:
    """One update; returns the step's metrics on the device (``pw.Metrics``)."""

    def loss_fn(model: Classifier) -> tuple[jax.Array, tuple[jax.Array, pw.Metrics]]:
        logits = model(x)
        base = task_loss(logits, y)
        penalties, metrics = pipe.compute(jax.nn.log_softmax(logits))
        l2_value, _ = L2.value_and_grad(nnx.state(model, nnx.Param))
        return base + penalties + l2_value, (base, metrics)

    (loss, (base, metrics)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return metrics.merge({"base_loss": base, "loss": loss})


@nnx.jit
def diagnose(model: Classifier, pipe: pw.Pipeline, x: jax.Array, y: jax.Array) -> dict:
    """Which term drives the update: per-term parameter-gradient norms, shares, cosines."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(p: Any, inputs: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(inputs))

    def nll(logprobs: jax.Array, labels: jax.Array) -> jax.Array:
        return -jnp.take_along_axis(logprobs, labels[:, None], axis=1)[:, 0]

    terms_fn = pipeline_terms_fn(apply_fn, nll, pipe, (x, y))
    return pw.gradient_diagnostics(lambda p: terms_fn(p)[0], params, param_terms={"l2": L2})


def make_data(n: int = 256, *, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """A noisy linear teacher's labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_IN)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(N_IN, N_CLASSES)), axis=-1)
    return jnp.asarray(x), jnp.asarray(y, dtype=jnp.int32)


def train(
    monitor: pw.Monitor | None,
    *,
    steps: int,
    diagnostics_every: int = 10,
    inject_nan_at: int | None = None,
    seed: int = 0,
) -> tuple[Classifier, list[dict[str, float]]]:
    """Train for ``steps`` steps; returns the model and the host metrics of each step."""
    model = Classifier(rngs=nnx.Rngs(seed))
    # a non-finite update is skipped (the weights stay healthy), and the monitor reports it
    tx = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    pipe = make_pipeline()
    x, y = make_data(seed=seed)
    history = []
    for step in range(steps):
        xb = jnp.full_like(x, jnp.nan) if step == inject_nan_at else x
        if diagnostics_every and step % diagnostics_every == 0:
            diagnostics = diagnose(model, pipe, xb, y)  # at the pre-update parameters
        else:
            diagnostics = None
        metrics = train_step(model, optimizer, pipe, xb, y)  # updates model in place
        if diagnostics is not None:
            metrics = metrics.merge(diagnostics)
        if monitor is not None:
            monitor.record(step, metrics, pipeline="nnx")  # loss: metrics["base_loss"]
        history.append(metrics)
    return model, [m.scalars() for m in history]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = os.environ.get("PENWATCH_EXAMPLE_QUICK") == "1"
    parser.add_argument("--steps", type=int, default=40 if quick else 400)
    parser.add_argument("--db", default=None, help="also write the SQLite store (dashboard)")
    parser.add_argument("--inject-nan-at", type=int, default=None, metavar="STEP")
    args = parser.parse_args(argv)
    sinks: list[pw.sinks.Sink] = [pw.sinks.Logging(every=max(args.steps // 4, 1))]
    if args.db:
        sinks.append(pw.sinks.SQLite(args.db))
    monitor = pw.Monitor("nnx-example", sinks=sinks, alerts=[pw.alerts.NonFinite()])
    with monitor:
        _, history = train(monitor, steps=args.steps, inject_nan_at=args.inject_nan_at)
    first, last = history[0], history[-1]
    print(f"== Flax NNX: nnx.Optimizer + nnx.jit, {args.steps} steps ==")
    print(f"  base_loss {first['base_loss']:.4f} -> {last['base_loss']:.4f}")
    print(
        "  gradient shares at step 0: "
        + ", ".join(f"{t}={first[f'{t}_grad_share']:.3f}" for t in ("base", "entropy", "l2"))
    )
    print(f"  monitor: {monitor.stats.processed} steps recorded, {monitor.stats.events} events")


if __name__ == "__main__":
    main()
