"""The full optax stack (port of the seed's ``polaris_full_integration.exs``).

Decay (L2 / L1 / elastic net, coupled and decoupled), clipping by global norm, annealed
gradient noise, adaptive gradient clipping (AGC) and gradient centralization, each shown
on one gradient and then composed and used to train a small MLP with
``pw.build_train_step``.

Run: ``python examples/optax_full_integration.py [--steps N]``
(``PENWATCH_EXAMPLE_QUICK=1`` uses a few steps).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import penwatch as pw

PARAMS = {"dense": {"w": jnp.array([[1.0, -2.0, 0.0], [0.5, 0.0, -1.0]])}, "bias": jnp.zeros(3)}
GRADS = {"dense": {"w": jnp.array([[3.0, 1.0, -2.0], [0.0, 4.0, 1.0]])}, "bias": jnp.ones(3)}


def one_update(name: str, optimizer: optax.GradientTransformation) -> None:
    updates, _ = optimizer.update(GRADS, optimizer.init(PARAMS), PARAMS)
    w = np.round(np.asarray(updates["dense"]["w"], np.float64), 3).tolist()
    norm = float(optax.tree.norm(updates))
    print(f"  {name:<30} dense.w={w}  ‖u‖={norm:.3f}")


def transforms_on_one_gradient() -> None:
    print("== Each transform on one gradient (identity optimizer: shows the transform) ==")
    ident = optax.identity()
    one_update("raw gradient", ident)
    one_update("l2 decay 0.1", pw.optim.add_l2_decay(ident, 0.1))
    one_update("l1 decay 0.1", pw.optim.add_l1_decay(ident, 0.1))
    one_update("elastic net 0.1, r=0.5", pw.optim.add_elastic_net_decay(ident, 0.1, 0.5))
    one_update("clip global norm to 1", pw.optim.add_gradient_clipping(ident, 1.0))
    one_update("AGC clip_factor=0.1", pw.optim.add_adaptive_gradient_clipping(ident, 0.1))
    one_update("centralization", pw.optim.add_gradient_centralization(ident))
    one_update("noise var 0.01 (seed 0)", pw.optim.add_gradient_noise(ident, 0.01, seed=0))
    one_update("noise var 0.01 (seed 0) again", pw.optim.add_gradient_noise(ident, 0.01, seed=0))
    print("  decoupled l2 (after sgd, lr=0.1):")
    one_update(
        "  sgd + decoupled l2 0.1",
        pw.optim.add_l2_decay(optax.sgd(0.1), 0.1, decoupled=True, learning_rate=0.1),
    )
    one_update("  sgd + coupled l2 0.1 (same)", pw.optim.add_l2_decay(optax.sgd(0.1), 0.1))


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def train_with_stack(steps: int) -> None:
    print("\n== A composed optimizer training an MLP (with penalty metrics) ==")
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (128, 4))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2
    params = {
        "w1": 0.5 * jax.random.normal(k2, (4, 32)),
        "b1": jnp.zeros(32),
        "w2": 0.5 * jax.random.normal(k3, (32, 1)),
        "b2": jnp.zeros(1),
    }
    lr = 1e-2
    opt = optax.adam(lr)
    opt = pw.optim.add_gradient_clipping(opt, 1.0)
    opt = pw.optim.add_adaptive_gradient_clipping(opt, 0.1)
    opt = pw.optim.add_gradient_centralization(opt)
    opt = pw.optim.add_gradient_noise(opt, 1e-4, decay=0.55, seed=0)
    opt = pw.optim.add_l2_decay(opt, 1e-4, decoupled=True, learning_rate=lr)
    pipeline = pw.pipeline([("l2", 1e-4), ("output_magnitude", 1e-3)])
    init_fn, step_fn = pw.build_train_step(mlp, optax.l2_loss, pipeline, opt)
    state = init_fn(params)
    for step in range(steps):
        state, metrics = step_fn(state, (x, y))
        if step % max(steps // 5, 1) == 0 or step == steps - 1:
            print(
                f"  step {step:4d}  loss={float(metrics['loss']):.4f}  "
                f"base={float(metrics['base_loss']):.4f}  "
                f"grad_norm={float(metrics['grad_norm']):.3f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = os.environ.get("PENWATCH_EXAMPLE_QUICK") == "1"
    parser.add_argument("--steps", type=int, default=30 if quick else 400)
    args = parser.parse_args(argv)
    transforms_on_one_gradient()
    train_with_stack(args.steps)


if __name__ == "__main__":
    main()
