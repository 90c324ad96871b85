"""Curriculum learning: penalty weights that change over the epochs.

Port of the seed's ``curriculum_learning.exs``:

1. the schedule kinds and their values per epoch (linear, warmup, decay, constant and
   an optax schedule);
2. decreasing regularization over a training run with ``pw.trainer(schedule=...)``,
   compiled once (weights are pytree leaves in the train state);
3. phase-based training: different penalty configurations per phase (enabling a
   penalty changes the pipeline's structure: one compilation per configuration);
4. elastic-net ratio shifting as two scheduled weights (``l1``, ``l2``), so the ratio
   moves without recompiling;
5. gradient flow: the scheduled weights scale the penalty gradients.

Run: ``python examples/curriculum_learning.py [--epochs N]``
(``PENWATCH_EXAMPLE_QUICK=1`` uses few epochs).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import optax

import penwatch as pw


def show_schedules(epochs: int) -> None:
    print("== 1. Schedule values per epoch ==")
    schedule = pw.weight_schedule(
        {
            "l2": ("linear", 1e-2, 0.0),  # strong regularization first, relaxed later
            "entropy": ("warmup", 0.1, 3),  # ramp up over 3 epochs
            "l1": ("decay", 1e-3, 0.5),  # halve every epoch
            "kl": ("constant", 0.05),
            "orthogonality": optax.cosine_decay_schedule(0.2, decay_steps=epochs),
        }
    )
    print("  epoch " + "".join(f"{name:>15}" for name in schedule.names))
    for epoch in range(epochs):
        weights = schedule(epoch, epochs)
        print(f"  {epoch:5d} " + "".join(f"{float(w):15.6f}" for w in weights.values()))


def make_task():
    kx, kw, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (256, 8))
    logits = x @ jax.random.normal(kw, (8, 4))
    y = jax.nn.one_hot(jnp.argmax(logits, -1), 4)
    params = {"w": 0.1 * jax.random.normal(kp, (8, 4)), "b": jnp.zeros(4)}
    return x, y, params


def model(params, x):
    return jax.nn.log_softmax(x @ params["w"] + params["b"])


def nll(logprobs, onehot):
    return -jnp.sum(logprobs * onehot, axis=-1)


def decreasing_regularization(epochs: int) -> None:
    print("\n== 2. Decreasing regularization with pw.trainer ==")
    x, y, params = make_task()
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    pipe = pw.pipeline([("l2", 0.0), ("entropy", 0.0, {"mode": "penalty"})])
    schedule = pw.weight_schedule({"l2": ("linear", 1e-2, 1e-4), "entropy": ("decay", 0.2, 0.7)})
    optimizer = optax.adam(0.05)
    # Build the step ourselves (to count its compilations) and hand it to the trainer.
    train_step = pw.training.build_train_step(model, nll, pipe, optimizer)
    result = pw.trainer(
        model, nll, pipe, optimizer, params, batches,
        epochs=epochs, schedule=schedule, progress=False, train_step=train_step,
    )  # fmt: skip
    for row in result.history:
        w = row["weights"]
        print(
            f"  epoch {row['epoch']}: loss={float(row['loss']):.4f} "
            f"l2_weight={w['l2']:.5f} entropy_weight={w['entropy']:.4f}"
        )
    print(f"  compilations: {train_step[1].plain._cache_size()}")


def phase_based(epochs: int) -> None:
    print("\n== 3. Phase-based training ==")
    x, y, params = make_task()
    pipe = pw.pipeline([("l2", 1e-4), ("entropy", 0.05, {"mode": "bonus"})])
    phases = [
        ("explore (entropy bonus on)", pipe),
        ("exploit (entropy off)", pipe.set_enabled("entropy", False)),
    ]
    for name, phase_pipe in phases:
        init_fn, step_fn = pw.build_train_step(model, nll, phase_pipe, optax.adam(0.05))
        state = init_fn(params)
        for _ in range(epochs * 4):
            state, metrics = step_fn(state, (x, y))
        params = state.params
        keys = [k for k in ("base_loss", "l2_weighted", "entropy_weighted") if k in metrics]
        print(f"  {name:<28} " + " ".join(f"{k}={float(metrics[k]):.4f}" for k in keys))


def ratio_shifting(epochs: int) -> None:
    print("\n== 4. Elastic-net ratio shifting (no recompiles) ==")
    strength = 1e-2
    pipe = pw.pipeline([("l1", 0.0), ("l2", 0.0)])
    ratio = pw.weight_schedule({"r": ("linear", 1.0, 0.0)})
    x = jnp.array([0.5, -2.0, 0.0, 3.0])

    @jax.jit
    def penalty(pipe, x):
        return pipe.compute_total(x)

    for epoch in range(epochs):
        r = ratio(epoch, epochs)["r"]
        pipe = pw.apply_scheduled_weights(pipe, {"l1": strength * r, "l2": strength * (1 - r)})
        direct = pw.elastic_net(x, strength=strength, l1_ratio=r)
        print(f"  epoch {epoch}: l1_ratio={r:.2f} penalty={float(penalty(pipe, x)):.5f} "
              f"(pw.elastic_net: {float(direct):.5f})")  # fmt: skip
    print(f"  compilations: {penalty._cache_size()}")


def gradient_flow() -> None:
    print("\n== 5. Gradient flow scales with the scheduled weight ==")
    pipe = pw.pipeline([("l2", 0.0)])
    x = jnp.array([1.0, -2.0, 3.0])
    grad = jax.jit(jax.grad(lambda x, p: p.compute_total(x)))
    for w in (0.0, 0.01, 0.1):
        g = grad(x, pipe.update_weight("l2", w))
        print(f"  l2 weight={w:<5} gradient={[round(float(v), 4) for v in g]} (2·w·x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = os.environ.get("PENWATCH_EXAMPLE_QUICK") == "1"
    parser.add_argument("--epochs", type=int, default=4 if quick else 10)
    args = parser.parse_args(argv)
    show_schedules(args.epochs)
    decreasing_regularization(args.epochs)
    phase_based(args.epochs)
    ratio_shifting(args.epochs)
    gradient_flow()


if __name__ == "__main__":
    main()
