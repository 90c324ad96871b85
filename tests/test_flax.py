"""The training builders with Flax models: Linen's ``model.apply`` and NNX split/merge."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import penwatch as pw
from penwatch import training

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

X = jax.random.normal(jax.random.key(0), (64, 4))
Y = jnp.sin(2 * X[:, :1]) + X[:, 1:2]
BATCH = (X, Y)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = pw.capture("hidden1", nn.relu(nn.Dense(16)(x)))
        return nn.Dense(1)(h)


MODEL = MLP()
VARIABLES = MODEL.init(jax.random.key(1), X)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(4, 16, rngs=rngs)
        self.dense2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.dense2(pw.capture("hidden1", nnx.relu(self.dense1(x))))


def run(step_fn, state, n):
    metrics = None
    for _ in range(n):
        state, metrics = step_fn(state, BATCH)
    return state, metrics


def test_linen_build_train_step_learns_with_diagnostics_and_leaf_paths():
    pipe = pw.pipeline([("l2", 1e-4)])
    init_fn, step_fn = pw.build_train_step(
        MODEL.apply, optax.l2_loss, pipe, optax.adam(1e-2), diagnostics_every=100
    )
    state, first = step_fn(init_fn(VARIABLES), BATCH)
    state, last = run(step_fn, state, 149)
    # Loss falls by at least 5x in 150 Adam steps.
    assert float(last["base_loss"]) < float(first["base_loss"]) / 5
    share = float(first["base_grad_share"]) + float(first["l2_grad_share"])
    assert abs(share - 1.0) < 1e-5
    paths = set(last["_leaf_nonfinite"]["grads"])
    assert "['params']['Dense_0']['kernel']" in paths and len(paths) == 4
    assert step_fn.plain._cache_size() == 1


def test_linen_capture_activity_step_lowers_activations():
    init_fn, step_fn = training.build_activity_train_step(
        MODEL.apply, optax.l2_loss, {"hidden1": (pw.l1, 0.0)}, optax.adam(1e-2)
    )
    means = {}
    for weight in (0.0, 2e-3):
        state = pw.apply_scheduled_weights(init_fn(VARIABLES), {"hidden1": weight})
        state, m = run(step_fn, state, 150)
        _, caps = training.collect_activations(MODEL.apply, state.params, X)
        means[weight] = float(jnp.mean(jnp.abs(caps["hidden1"])))
        np.testing.assert_allclose(
            float(m["hidden1_weighted"]),
            weight * float(jnp.sum(jnp.abs(caps["hidden1"]))),
            rtol=0.2,  # metrics are at the pre-update parameters of the last step
        )
    assert means[2e-3] < 0.7 * means[0.0]
    assert step_fn.plain._cache_size() == 1


def test_linen_weight_decay_with_kernel_mask():
    def kernels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)

    init_fn, step_fn = training.build_train_step_with_weight_decay(
        MODEL.apply, optax.l2_loss, None, optax.sgd(0.0), decay=0.01, mask=kernels
    )
    _, m = step_fn(init_fn(VARIABLES), BATCH)
    p = VARIABLES["params"]
    expected = sum(float(jnp.sum(p[layer]["kernel"] ** 2)) for layer in ("Dense_0", "Dense_1"))
    np.testing.assert_allclose(float(m["weight_decay"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m["weight_decay_weighted"]), 0.01 * expected, rtol=1e-5)


def test_nnx_split_merge_with_activity_step_learns():
    graphdef, params = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)

    def apply_fn(params, x):
        return nnx.merge(graphdef, params)(x)

    init_fn, step_fn = training.build_activity_train_step(
        apply_fn, optax.l2_loss, {"hidden1": (pw.l1, 1e-4)}, optax.adam(1e-2)
    )
    state, first = step_fn(init_fn(params), BATCH)
    state, last = run(step_fn, state, 149)
    assert float(last["base_loss"]) < float(first["base_loss"]) / 5
    assert isinstance(state.params, nnx.State)
    assert "['dense1']['kernel'].value" in last["_leaf_nonfinite"]["params"]
