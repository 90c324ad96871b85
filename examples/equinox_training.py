"""penwatch with Equinox, the idiomatic way: ``eqx.Module``, ``eqx.filter_jit``.

The same classifier and penalties as ``nnx_training.py``, as an Equinox module (one
example per call, ``jax.vmap`` over the batch) trained by a hand-written loop:

* the train step is an ``eqx.filter_jit`` function of ``(model, opt_state, pipe, x, y)``
  using ``eqx.filter_value_and_grad`` and optax; it returns the new model and state and
  the step's ``pw.Metrics`` (packed on the device, never read back here);
* every ``diagnostics_every`` steps another ``eqx.filter_jit`` function partitions the
  model (``eqx.partition(model, eqx.is_inexact_array)``) and asks
  :func:`penwatch.gradient_diagnostics` which term drives the update;
* a ``pw.Monitor`` records every step; ``--inject-nan-at K`` makes step K's batch NaN
  (the update is skipped by ``optax.apply_if_finite``; the monitor names the metric).

Run: ``python examples/equinox_training.py [--steps N] [--db runs/eqx.db]``
(``PENWATCH_EXAMPLE_QUICK=1``: a few steps).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import penwatch as pw
from penwatch.diagnostics import l2_term, pipeline_terms_fn

N_IN, HIDDEN, N_CLASSES = 8, 32, 3
L2 = l2_term(1e-4)  # a parameter term: closed-form gradient, its weight is data
OPTIMIZER = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5)


class Classifier(eqx.Module):
    """``x[8] -> relu(32) -> logits[3]`` for one example."""

    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(N_IN, HIDDEN, key=k1)
        self.out = eqx.nn.Linear(HIDDEN, N_CLASSES, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


def log_probs(model: Classifier, x: jax.Array) -> jax.Array:
    """Batched log-probabilities."""
    return jax.nn.log_softmax(jax.vmap(model)(x))


def nll(logprobs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example negative log-likelihood (optax argument order)."""
    return -jnp.take_along_axis(logprobs, labels[:, None], axis=1)[:, 0]


def make_pipeline() -> pw.Pipeline:
    """The output penalties: weights are pytree leaves (no recompiles when they change)."""
    return pw.pipeline([("entropy", 0.02, {"mode": "penalty"}), ("output_magnitude", 1e-3)])


@eqx.filter_jit
def train_step(
    model: Classifier, opt_state: Any, pipe: pw.Pipeline, x: jax.Array, y: jax.Array
) -> tuple[Classifier, Any, pw.Metrics]:
    """One update; returns the new model, optimizer state and the step's metrics."""

    def loss_fn(model: Classifier) -> tuple[jax.Array, tuple[jax.Array, pw.Metrics]]:
        logprobs = log_probs(model, x)
        base = jnp.mean(nll(logprobs, y))
        penalties, metrics = pipe.compute(logprobs)
        l2_value, _ = L2.value_and_grad(eqx.filter(model, eqx.is_inexact_array))
        return base + penalties + l2_value, (base, metrics)

    (loss, (base, metrics)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    return model, opt_state, metrics.merge({"base_loss": base, "loss": loss})


@eqx.filter_jit
def diagnose(model: Classifier, pipe: pw.Pipeline, x: jax.Array, y: jax.Array) -> dict:
    """Which term drives the update: per-term parameter-gradient norms, shares, cosines."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply_fn(p: Any, inputs: jax.Array) -> jax.Array:
        return log_probs(eqx.combine(p, static), inputs)

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
    model = Classifier(jax.random.key(seed))
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    pipe = make_pipeline()
    x, y = make_data(seed=seed)
    history = []
    for step in range(steps):
        xb = jnp.full_like(x, jnp.nan) if step == inject_nan_at else x
        if diagnostics_every and step % diagnostics_every == 0:
            diagnostics = diagnose(model, pipe, xb, y)  # at the pre-update parameters
        else:
            diagnostics = None
        model, opt_state, metrics = train_step(model, opt_state, pipe, xb, y)
        if diagnostics is not None:
            metrics = metrics.merge(diagnostics)
        if monitor is not None:
            monitor.record(step, metrics, pipeline="equinox")  # loss: metrics["base_loss"]
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
    monitor = pw.Monitor("equinox-example", sinks=sinks, alerts=[pw.alerts.NonFinite()])
    with monitor:
        _, history = train(monitor, steps=args.steps, inject_nan_at=args.inject_nan_at)
    first, last = history[0], history[-1]
    print(f"== Equinox: eqx.Module + eqx.filter_jit, {args.steps} steps ==")
    print(f"  base_loss {first['base_loss']:.4f} -> {last['base_loss']:.4f}")
    print(
        "  gradient shares at step 0: "
        + ", ".join(f"{t}={first[f'{t}_grad_share']:.3f}" for t in ("base", "entropy", "l2"))
    )
    print(f"  monitor: {monitor.stats.processed} steps recorded, {monitor.stats.events} events")


if __name__ == "__main__":
    main()
