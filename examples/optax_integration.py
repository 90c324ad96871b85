"""Gradient-level weight decay with optax (port of the seed's ``polaris_integration.exs``).

Shows ``penwatch.optim``'s helpers wrapping an optax optimizer:

* L2 weight decay, coupled (``g + λw`` fed to Adam) and decoupled (AdamW style);
* L1 decay for sparsity, elastic-net decay;
* composing several transforms (the helper applied last runs first).

Run: ``python examples/optax_integration.py [--steps N]`` (``PENWATCH_EXAMPLE_QUICK=1``
uses a few steps).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import penwatch as pw


def make_data() -> tuple[jax.Array, jax.Array]:
    kx, kn = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (128, 10))
    w_true = jnp.zeros((10, 1)).at[jnp.array([0, 3, 7])].set(jnp.array([[2.0], [-1.5], [1.0]]))
    return x, x @ w_true + 0.3 * jax.random.normal(kn, (128, 1))


def fit(optimizer: optax.GradientTransformation, x: jax.Array, y: jax.Array, steps: int):
    """Plain optax loop on a linear model; returns (weights, final mse)."""
    params = {"w": jnp.zeros((10, 1)) + 0.1, "b": jnp.zeros((1,))}

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        updates, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    state = optimizer.init(params)
    value = None
    for _ in range(steps):
        params, state, value = step(params, state)
    return np.asarray(params["w"]).ravel(), float(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = os.environ.get("PENWATCH_EXAMPLE_QUICK") == "1"
    parser.add_argument("--steps", type=int, default=40 if quick else 500)
    args = parser.parse_args(argv)
    x, y = make_data()
    lr = 0.05

    print("== L2 weight decay: coupled vs decoupled (AdamW) ==")
    coupled = pw.optim.add_l2_decay(optax.adam(lr), 0.1)
    decoupled = pw.optim.add_l2_decay(optax.adam(lr), 0.1, decoupled=True, learning_rate=lr)
    for name, opt in [("adam", optax.adam(lr)), ("coupled", coupled), ("decoupled", decoupled)]:
        w, mse = fit(opt, x, y, args.steps)
        print(f"  {name:<10} mse={mse:.4f}  ‖w‖={np.linalg.norm(w):.4f}")
    print("  (decoupled + adam is exactly optax.adamw(lr, weight_decay=0.1))")

    print("\n== L1 decay for sparsity (SGD) ==")
    for decay in (0.0, 0.05, 0.2):
        opt = pw.optim.add_l1_decay(optax.sgd(lr), decay)
        w, mse = fit(opt, x, y, args.steps)
        near_zero = int(np.sum(np.abs(w) < 0.02))
        print(f"  decay={decay:<5} mse={mse:.4f}  near-zero weights={near_zero}/10")

    print("\n== Elastic-net decay: decay·(r·sign(w) + (1 - r)·w) ==")
    for ratio in (0.0, 0.5, 1.0):
        opt = pw.optim.add_elastic_net_decay(optax.sgd(lr), 0.1, ratio)
        w, mse = fit(opt, x, y, args.steps)
        print(f"  l1_ratio={ratio:<4} mse={mse:.4f}  ‖w‖₁={np.abs(w).sum():.4f}")

    print("\n== Composition: noise -> L2 decay -> clip -> adam (last applied runs first) ==")
    opt = pw.optim.add_gradient_clipping(optax.adam(lr), 1.0)
    opt = pw.optim.add_l2_decay(opt, 0.01)
    opt = pw.optim.add_gradient_noise(opt, 1e-3, seed=0)
    w, mse = fit(opt, x, y, args.steps)
    print(f"  mse={mse:.4f}  ‖w‖={np.linalg.norm(w):.4f}")


if __name__ == "__main__":
    main()
