"""Every training pattern (port of the seed's ``axon_full_integration.exs``).

Over a plain ``apply_fn(params, x)``:

1. loss wrapping (``wrap_loss``, ``wrap_loss_with_pipeline``);
2. a custom jitted train step with per-penalty metrics and gradient diagnostics
   every N steps (``build_train_step``);
3. weight decay as a visible loss term (``build_train_step_with_weight_decay``);
4. curriculum weights (``weight_schedule`` + ``apply_scheduled_weights``, no recompiles);
5. activity regularization (``pw.capture`` in the model + ``build_activity_train_step``);
6. the ``trainer`` loop with a monitor and ``log_penalties``.

Run: ``python examples/training_full_integration.py [--steps N]``
(``PENWATCH_EXAMPLE_QUICK=1`` uses a few steps).
"""

from __future__ import annotations

import argparse
import logging
import os

import jax
import jax.numpy as jnp
import optax

import penwatch as pw
from penwatch import training


def make_data():
    kx, kn = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (128, 6))
    y = jnp.tanh(x[:, :1] - 2 * x[:, 1:2]) + 0.1 * jax.random.normal(kn, (128, 1))
    return x, y


def init_params(hidden: int = 32):
    k1, k2 = jax.random.split(jax.random.key(1))
    return {
        "w1": jax.random.normal(k1, (6, hidden)) / jnp.sqrt(6.0),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 1)) / jnp.sqrt(hidden),
        "b2": jnp.zeros(1),
    }


def mlp(params, x):
    hidden = pw.capture("hidden1", jax.nn.relu(x @ params["w1"] + params["b1"]))
    return hidden @ params["w2"] + params["b2"]


def report(title: str, metrics, keys) -> None:
    shown = "  ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)
    print(f"  {title:<22} {shown}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = os.environ.get("PENWATCH_EXAMPLE_QUICK") == "1"
    parser.add_argument("--steps", type=int, default=20 if quick else 300)
    args = parser.parse_args(argv)
    x, y = make_data()
    params = init_params()
    batch = (x, y)

    print("== 1. Loss wrapping ==")
    preds = mlp(params, x)
    loss = training.wrap_loss(optax.l2_loss, pw.l2, weight=0.01)
    print(f"  wrap_loss(l2, weight=0.01)          = {float(loss(preds, y)):.4f}")
    pipe = pw.pipeline([("l2", 1e-3), ("output_magnitude", 1e-2)])
    loss = training.wrap_loss_with_pipeline(optax.l2_loss, pipe)
    print(f"  wrap_loss_with_pipeline(l2 + omag)  = {float(loss(preds, y)):.4f}")

    print("\n== 2. Custom train step with metrics and diagnostics every 10 steps ==")
    init_fn, step_fn = pw.build_train_step(
        mlp, optax.l2_loss, pipe, optax.adam(1e-2), diagnostics_every=10
    )
    state = init_fn(params)
    for step in range(args.steps):
        state, metrics = step_fn(state, batch)
        if step % 10 == 0:
            report(
                f"step {step}",
                metrics,
                ["loss", "base_loss", "l2_weighted", "base_grad_share", "l2_grad_share"],
            )

    print("\n== 3. Weight decay as a loss term on the parameters ==")
    init_fn, step_fn = training.build_train_step_with_weight_decay(
        mlp, optax.l2_loss, None, optax.sgd(0.1), decay=1e-3, kind="l2"
    )
    state = init_fn(params)
    for _ in range(args.steps):
        state, metrics = step_fn(state, batch)
    report("after training", metrics, ["base_loss", "weight_decay", "weight_decay_weighted"])

    print("\n== 4. Curriculum weights (schedules change state, never the compiled step) ==")
    init_fn, step_fn = pw.build_train_step(mlp, optax.l2_loss, pipe, optax.adam(1e-2))
    schedule = pw.weight_schedule(
        {"l2": ("linear", 0.0, 1e-2), "output_magnitude": ("warmup", 0.1, 3)}
    )
    state = init_fn(params)
    epochs = 5
    for epoch in range(epochs):
        state = pw.apply_scheduled_weights(state, schedule(epoch, epochs))
        for _ in range(max(args.steps // epochs, 1)):
            state, metrics = step_fn(state, batch)
        report(f"epoch {epoch}", metrics, ["base_loss", "l2_weight", "output_magnitude_weight"])
    print(f"  compilations of the step: {step_fn.plain._cache_size()}")

    print("\n== 5. Activity regularization of a captured hidden layer ==")
    init_fn, step_fn = training.build_activity_train_step(
        mlp, optax.l2_loss, {"hidden1": (pw.l1, 0.0)}, optax.adam(1e-2)
    )
    for weight in (0.0, 1e-3):
        state = pw.apply_scheduled_weights(init_fn(params), {"hidden1": weight})
        for _ in range(args.steps):
            state, metrics = step_fn(state, batch)
        _, captures = training.collect_activations(mlp, state.params, x)
        mean_act = float(jnp.mean(jnp.abs(captures["hidden1"])))
        print(
            f"  activity l1 weight={weight:<6} base_loss={float(metrics['base_loss']):.4f}"
            f"  mean |hidden1|={mean_act:.4f}"
        )

    print("\n== 6. trainer: epochs, progress bar, monitor, log_penalties ==")
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s")
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
    with pw.Monitor("training-full-integration", sinks=[], alerts=[]) as monitor:
        result = pw.trainer(
            mlp,
            optax.l2_loss,
            pipe,
            optax.adam(1e-2),
            params,
            batches,
            epochs=max(args.steps // 4, 2),
            monitor=monitor,
            schedule=schedule,
            diagnostics_every=8,
            progress=False,
            callbacks=[training.log_penalties(pipe, every=max(args.steps // 2, 1))],
        )
    first, last = result.history[0], result.history[-1]
    print(
        f"  epoch 0 loss={float(first['loss']):.4f} -> epoch {last['epoch']} "
        f"loss={float(last['loss']):.4f}"
    )


if __name__ == "__main__":
    main()
