"""penwatch with a Flax model (port of the seed's ``axon_training.exs``).

Flax Linen's ``model.apply(variables, x)`` is already an ``apply_fn(params, x)``, so the
penwatch builders take it as is:

* ``pw.build_train_step`` with an output-penalty pipeline and gradient diagnostics;
* ``pw.capture`` inside a Linen module + ``build_activity_train_step``;
* ``build_train_step_with_weight_decay`` over the Linen parameter tree;
* the same with Flax NNX (``nnx.split`` / ``nnx.merge``).

Run: ``python examples/flax_training.py [--steps N]`` (``PENWATCH_EXAMPLE_QUICK=1`` uses a
few steps).
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import penwatch as pw
from penwatch import training


class MLP(nn.Module):
    """A two-layer Linen MLP whose hidden layer is captured for activity penalties."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = pw.capture("hidden1", nn.relu(nn.Dense(self.hidden)(x)))
        return nn.Dense(1)(h)


class NnxMLP(nnx.Module):
    """The same model in Flax NNX."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 32) -> None:
        self.dense1 = nnx.Linear(4, hidden, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense2(pw.capture("hidden1", nnx.relu(self.dense1(x))))


def make_data() -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(0), (128, 4))
    return x, jnp.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]


def train(step_fn, state, batch, steps: int):
    metrics = None
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    return state, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = os.environ.get("PENWATCH_EXAMPLE_QUICK") == "1"
    parser.add_argument("--steps", type=int, default=30 if quick else 500)
    args = parser.parse_args(argv)
    x, y = make_data()
    model = MLP()
    variables = model.init(jax.random.key(1), x)  # {"params": {...}}

    print("== Linen model.apply as apply_fn: pipeline + diagnostics every 10 steps ==")
    pipe = pw.pipeline([("l2", 1e-4), ("output_magnitude", 1e-2, {"target": 1.0})])
    init_fn, step_fn = pw.build_train_step(
        model.apply, optax.l2_loss, pipe, optax.adam(1e-2), diagnostics_every=10
    )
    state = init_fn(variables)
    state, first = step_fn(state, (x, y))
    state, last = train(step_fn, state, (x, y), args.steps - 1)
    print(f"  base_loss {float(first['base_loss']):.4f} -> {float(last['base_loss']):.4f}")
    print(f"  gradient share at step 0: base={float(first['base_grad_share']):.3f} "
          f"l2={float(first['l2_grad_share']):.3f} "
          f"output_magnitude={float(first['output_magnitude_grad_share']):.3f}")  # fmt: skip
    print(f"  leaf paths in the non-finite report: {sorted(last['_leaf_nonfinite']['grads'])}")

    print("\n== Activity regularization of a captured Linen activation ==")
    init_fn, step_fn = training.build_activity_train_step(
        model.apply, optax.l2_loss, {"hidden1": (pw.l1, 0.0)}, optax.adam(1e-2)
    )
    for weight in (0.0, 1e-3):
        state = pw.apply_scheduled_weights(init_fn(variables), {"hidden1": weight})
        state, metrics = train(step_fn, state, (x, y), args.steps)
        _, caps = training.collect_activations(model.apply, state.params, x)
        print(f"  weight={weight:<6} base_loss={float(metrics['base_loss']):.4f} "
              f"mean |hidden1|={float(jnp.mean(jnp.abs(caps['hidden1']))):.4f}")  # fmt: skip

    print("\n== Weight decay on the Linen parameter tree (kernels only) ==")
    kernels_only = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: path[-1].key == "kernel", p
    )
    init_fn, step_fn = training.build_train_step_with_weight_decay(
        model.apply, optax.l2_loss, None, optax.sgd(0.05), decay=1e-3, mask=kernels_only
    )
    state, metrics = train(step_fn, init_fn(variables), (x, y), args.steps)
    print(f"  base_loss={float(metrics['base_loss']):.4f} "
          f"weight_decay (Σ kernel²)={float(metrics['weight_decay']):.3f}")  # fmt: skip

    print("\n== Flax NNX: split the module, merge it inside apply_fn ==")
    graphdef, params = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)

    def nnx_apply(params, x):
        return nnx.merge(graphdef, params)(x)

    init_fn, step_fn = training.build_activity_train_step(
        nnx_apply, optax.l2_loss, {"hidden1": (pw.l1, 1e-4)}, optax.adam(1e-2)
    )
    state, first = step_fn(init_fn(params), (x, y))
    state, last = train(step_fn, state, (x, y), args.steps - 1)
    print(f"  base_loss {float(first['base_loss']):.4f} -> {float(last['base_loss']):.4f}, "
          f"hidden1_weighted={float(last['hidden1_weighted']):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
