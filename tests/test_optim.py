"""penwatch.optim: each transform against a float64 NumPy hand computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from penwatch import optim

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

# A small pytree with nested dicts and lists, exact zeros included (sign(0) = 0).
PARAMS = {
    "a": {"w": jnp.array([[1.5, -2.0, 0.0], [0.25, -0.5, 3.0]])},
    "b": [jnp.array([0.0, -1.0, 2.0]), jnp.array([[0.5, -0.25], [4.0, 0.0]])],
}
GRADS = {
    "a": {"w": jnp.array([[0.1, 0.2, -0.3], [0.4, -0.5, 0.6]])},
    "b": [jnp.array([1.0, -1.0, 0.5]), jnp.array([[-2.0, 0.3], [0.0, 1.0]])],
}


def np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def assert_tree_close(actual, expected, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


def run_update(tx, grads=GRADS, params=PARAMS, steps=1, jit=True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for _ in range(steps):
        u, state = update(grads, state, params)
        out.append(u)
    return out if steps > 1 else out[0]


P64, G64 = np_tree(PARAMS), np_tree(GRADS)


def hand(fn):
    """Apply ``fn(g, w)`` leaf-wise on the float64 copies."""
    return jax.tree.map(fn, G64, P64)


@pytest.mark.parametrize("jit", [False, True])
def test_l1_decay_matches_hand_computation(jit):
    expected = hand(lambda g, w: g + 0.1 * np.sign(w))
    assert_tree_close(run_update(optim.l1_decay(0.1), jit=jit), expected)
    # sign(0) = 0: a zero weight gets no decay.
    u = run_update(optim.l1_decay(0.1), grads=jax.tree.map(jnp.zeros_like, GRADS))
    assert float(u["a"]["w"][0, 2]) == 0.0 and float(u["b"][0][0]) == 0.0


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_elastic_net_decay_matches_hand_computation(ratio):
    expected = hand(lambda g, w: g + 0.05 * (ratio * np.sign(w) + (1 - ratio) * w))
    assert_tree_close(run_update(optim.elastic_net_decay(0.05, ratio)), expected)


def test_elastic_net_decay_endpoints_equal_l1_and_optax_l2():
    assert_tree_close(
        run_update(optim.elastic_net_decay(0.2, 1.0)), np_tree(run_update(optim.l1_decay(0.2)))
    )
    assert_tree_close(
        run_update(optim.elastic_net_decay(0.2, 0.0)),
        np_tree(run_update(optax.add_decayed_weights(0.2))),
    )


def test_decay_convention_against_penalty_gradients():
    """L1 decay is the gradient of pw.l1; elastic/L2 decay are half the penalty's L2 part."""
    import penwatch as pw

    w = PARAMS["a"]["w"]
    zeros = jnp.zeros_like(w)
    for tx, penalty in [
        (optim.l1_decay(0.3), lambda x: pw.l1(x, strength=0.3)),
        (optim.elastic_net_decay(0.3, 0.4), lambda x: 0.3 * (0.4 * pw.l1(x) + 0.6 * pw.l2(x) / 2)),
    ]:
        u, _ = tx.update(zeros, tx.init(w), w)
        np.testing.assert_allclose(u, jax.grad(penalty)(w), rtol=1e-6)
    tx = optax.add_decayed_weights(0.3)
    u, _ = tx.update(zeros, tx.init(w), w)
    np.testing.assert_allclose(u, jax.grad(lambda x: pw.l2(x, strength=0.15))(w), rtol=1e-6)


@pytest.mark.parametrize(
    ("make", "direction"),
    [
        (lambda lr: optim.decoupled_l2_decay(0.1, lr), lambda w: w),
        (lambda lr: optim.decoupled_l1_decay(0.1, lr), np.sign),
        (
            lambda lr: optim.decoupled_elastic_net_decay(0.1, 0.25, lr),
            lambda w: 0.25 * np.sign(w) + 0.75 * w,
        ),
    ],
)
def test_decoupled_decays_match_hand_computation(make, direction):
    assert_tree_close(run_update(make(0.5)), hand(lambda g, w: g - 0.5 * 0.1 * direction(w)))
    # A learning-rate schedule is evaluated at the update count: 0, 1, 2.
    sched = optax.linear_schedule(1.0, 0.0, 4)
    outs = run_update(make(sched), steps=3)
    for t, u in enumerate(outs):
        lr = 1.0 - t / 4
        assert_tree_close(u, hand(lambda g, w, lr=lr: g - lr * 0.1 * direction(w)))


def test_helpers_chain_transform_before_optimizer_sgd():
    lr = 0.1
    sgd = optax.sgd(lr)
    cases = [
        (optim.add_l2_decay(sgd, 0.01), lambda g, w: -lr * (g + 0.01 * w)),
        (optim.add_l1_decay(sgd, 0.02), lambda g, w: -lr * (g + 0.02 * np.sign(w))),
        (
            optim.add_elastic_net_decay(sgd, 0.02, 0.3),
            lambda g, w: -lr * (g + 0.02 * (0.3 * np.sign(w) + 0.7 * w)),
        ),
    ]
    for tx, fn in cases:
        assert_tree_close(run_update(tx), hand(fn))


def test_gradient_centralization_matches_hand_computation():
    def centered(g, w):
        if g.ndim > 1:
            return -(g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True))
        return -g

    assert_tree_close(run_update(optim.add_gradient_centralization(optax.sgd(1.0))), hand(centered))


def global_norm64(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 100.0])
def test_gradient_clipping_bound_and_hand_computation(max_norm):
    u = run_update(optim.add_gradient_clipping(optax.identity(), max_norm))
    norm = global_norm64(G64)
    scale = min(1.0, max_norm / norm)
    assert_tree_close(u, hand(lambda g, w: g * scale))
    assert global_norm64(u) <= max_norm * (1 + 1e-6)


def unit_norms(x):
    """AGC's unit-wise norms: whole leaf for ndim <= 1, over all but the last axis else."""
    x = np.asarray(x, np.float64)
    if x.ndim <= 1:
        return np.sqrt(np.sum(x**2))
    return np.sqrt(np.sum(x**2, axis=tuple(range(x.ndim - 1)), keepdims=True))


@pytest.mark.parametrize("clip", [0.01, 0.1, 10.0])
def test_adaptive_gradient_clipping_bound_and_hand_computation(clip):
    eps = 1e-3
    u = run_update(optim.add_adaptive_gradient_clipping(optax.identity(), clip, eps))

    def expected(g, w):
        limit = clip * np.maximum(unit_norms(w), eps)
        gn = unit_norms(g)
        return np.where(gn > limit, g * limit / np.maximum(gn, 1e-6), g)

    assert_tree_close(u, hand(expected), rtol=1e-5)
    for uu, w in zip(jax.tree.leaves(u), jax.tree.leaves(P64), strict=True):
        assert np.all(unit_norms(uu) <= clip * np.maximum(unit_norms(w), eps) * (1 + 1e-5))


def test_gradient_noise_reproducible_and_seeded():
    zeros = jax.tree.map(jnp.zeros_like, GRADS)

    def noise(seed):
        tx = optim.add_gradient_noise(optax.identity(), 0.1, seed=seed)
        return run_update(tx, grads=zeros, steps=2, jit=False)

    a, b, c = noise(3), noise(3), noise(4)
    assert_tree_close(a, np_tree(b), rtol=0, atol=0)
    assert not np.allclose(a[0]["a"]["w"], c[0]["a"]["w"])
    assert not np.allclose(a[0]["a"]["w"], a[1]["a"]["w"])  # fresh noise every step


def test_gradient_noise_variance_decays_as_documented():
    """Var of the noise at update t (0-based) is variance / (1 + t) ** decay."""
    variance, decay = 0.5, 0.55
    params = {"x": jnp.zeros((40_000,))}
    zeros = {"x": jnp.zeros((40_000,))}
    tx = optim.add_gradient_noise(optax.identity(), variance, decay, seed=0)
    outs = run_update(tx, grads=zeros, params=params, steps=8)
    for t in (0, 3, 7):
        sample = np.asarray(outs[t]["x"], np.float64)
        expected = variance / (1 + t) ** decay
        assert abs(sample.mean()) < 4 * np.sqrt(expected / sample.size)
        # Var estimate's relative std is sqrt(2/n) ≈ 0.7 %: 4 % is > 5 sigma.
        np.testing.assert_allclose(sample.var(), expected, rtol=0.04)


def test_coupled_and_decoupled_agree_for_sgd():
    lr = 0.05
    for coupled, decoupled in [
        (
            optim.add_l2_decay(optax.sgd(lr), 0.1),
            optim.add_l2_decay(optax.sgd(lr), 0.1, decoupled=True, learning_rate=lr),
        ),
        (
            optim.add_l1_decay(optax.sgd(lr), 0.1),
            optim.add_l1_decay(optax.sgd(lr), 0.1, decoupled=True, learning_rate=lr),
        ),
        (
            optim.add_elastic_net_decay(optax.sgd(lr), 0.1, 0.5),
            optim.add_elastic_net_decay(optax.sgd(lr), 0.1, 0.5, decoupled=True, learning_rate=lr),
        ),
    ]:
        for a, b in zip(run_update(coupled, steps=3), run_update(decoupled, steps=3), strict=True):
            assert_tree_close(a, np_tree(b))


def test_coupled_and_decoupled_differ_for_adam_as_documented():
    lr, decay = 0.1, 0.5
    coupled = run_update(optim.add_l2_decay(optax.adam(lr), decay))
    decoupled = run_update(
        optim.add_l2_decay(optax.adam(lr), decay, decoupled=True, learning_rate=lr)
    )
    # Adam's first step is -lr·sign(input) (up to eps): coupled normalizes g + λw,
    # decoupled normalizes g and then subtracts lr·λ·w.
    eps = 1e-8
    assert_tree_close(
        coupled, hand(lambda g, w: -lr * (g + decay * w) / (np.abs(g + decay * w) + eps)), 1e-4
    )
    assert_tree_close(
        decoupled, hand(lambda g, w: -lr * g / (np.abs(g) + eps) - lr * decay * w), 1e-4, 1e-6
    )
    assert not np.allclose(coupled["a"]["w"], decoupled["a"]["w"])
    # Decoupled L2 + Adam is exactly optax.adamw.
    adamw = run_update(optax.adamw(lr, weight_decay=decay), steps=3)
    ours = run_update(
        optim.add_l2_decay(optax.adam(lr), decay, decoupled=True, learning_rate=lr), steps=3
    )
    for a, b in zip(ours, adamw, strict=True):
        assert_tree_close(a, np_tree(b))


def test_mask_limits_decay_to_selected_leaves():
    mask = {"a": {"w": True}, "b": [False, True]}
    u = run_update(optim.l1_decay(0.1, mask=mask), grads=jax.tree.map(jnp.zeros_like, GRADS))
    np.testing.assert_allclose(u["b"][0], 0.0)
    np.testing.assert_allclose(u["a"]["w"], 0.1 * np.sign(P64["a"]["w"]))


def test_composition_order_last_helper_runs_first():
    base = optax.sgd(1.0)
    ours = optim.add_gradient_centralization(
        optim.add_l2_decay(optim.add_gradient_clipping(base, 1.0), 0.01)
    )
    manual = optax.chain(
        optax.centralize(), optax.add_decayed_weights(0.01), optax.clip_by_global_norm(1.0), base
    )
    assert_tree_close(run_update(ours), np_tree(run_update(manual)))


def test_dtype_is_kept():
    params = {"w": jnp.array([1.0, -2.0], jnp.bfloat16)}
    grads = {"w": jnp.array([0.5, 0.5], jnp.bfloat16)}
    for tx in (optim.l1_decay(0.1), optim.elastic_net_decay(0.1, 0.5)):
        u, _ = tx.update(grads, tx.init(params), params)
        assert u["w"].dtype == jnp.bfloat16


def test_missing_params_raise_clear_error():
    for tx in (
        optim.l1_decay(0.1),
        optim.elastic_net_decay(0.1, 0.5),
        optim.decoupled_l1_decay(0.1, 0.1),
    ):
        with pytest.raises(ValueError, match="params"):
            tx.update(GRADS, tx.init(PARAMS))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: optim.l1_decay(-1.0), "l1_decay.*'decay'.*>= 0.*-1.0"),
        (lambda: optim.elastic_net_decay(0.1, 1.5), "elastic_net_decay.*'l1_ratio'.*1.5"),
        (lambda: optim.add_gradient_clipping(optax.sgd(1.0), 0.0), "max_norm.*> 0"),
        (lambda: optim.add_gradient_noise(optax.sgd(1.0), -0.1), "variance"),
        (lambda: optim.add_gradient_noise(optax.sgd(1.0), 0.1, seed=1.5), "seed.*integer"),
        (lambda: optim.add_adaptive_gradient_clipping(optax.sgd(1.0), -1), "clip_factor"),
        (lambda: optim.add_l2_decay(optax.sgd(1.0), 0.1, decoupled=True), "learning_rate"),
        (lambda: optim.add_l2_decay(optax.sgd(1.0), 0.1, learning_rate=0.1), "decoupled"),
        (
            lambda: optim.add_l1_decay(optax.sgd(1.0), 0.1, decoupled=True, learning_rate=-1.0),
            "learning_rate.*> 0",
        ),
        (lambda: optim.add_l2_decay("adam", 0.1), "add_l2_decay.*optimizer"),
        (lambda: optim.decoupled_l2_decay(float("nan"), 0.1), "decay.*nan"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_state_is_namedtuple():
    tx = optim.decoupled_l1_decay(0.1, 0.1)
    state = tx.init(PARAMS)
    assert isinstance(state, optim.DecoupledDecayState)
    assert int(state.count) == 0
    _, state = tx.update(GRADS, state, PARAMS)
    assert int(state.count) == 1
