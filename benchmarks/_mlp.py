"""The small MLP classifier the diagnostics benchmarks train (one definition)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def mlp_params(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, jax.Array]:
    """Weights ``w{i}`` (scaled normal) and zero biases ``b{i}`` for layer ``sizes``."""
    params = {}
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (m, n), jnp.float32) / np.sqrt(m)
        params[f"b{i}"] = jnp.zeros((n,), jnp.float32)
    return params


def mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """ReLU MLP returning log-probabilities."""
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return jax.nn.log_softmax(x)


def nll(logp: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example negative log-likelihood of integer labels ``y``."""
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
