"""gradient_penalty, interpolated_gradient_penalty, output_magnitude_penalty."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

RNG = np.random.default_rng(3)
C = RNG.uniform(0.5, 2.0, size=(3, 2))  # critic coefficients
X = RNG.normal(size=(4, 3, 2))


def quad(x):
    """Scalar ``sum(C * x^2)``: gradient ``2 C x``."""
    return jnp.sum(jnp.asarray(C, x.dtype) * x**2)


def critic(x):
    """Per-sample ``sum(C * x_i^2)``: per-sample gradient ``2 C x_i``."""
    return jnp.sum(jnp.asarray(C, x.dtype) * x**2, axis=(1, 2))


# --- gradient_penalty ----------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 1.0, 2.5])
def test_gradient_penalty_global_matches_analytic(target):
    g = 2 * C * X
    want = (np.linalg.norm(g) - target) ** 2
    with jax.enable_x64(True):
        got = pw.gradient_penalty(quad, X, target_norm=target)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("target", [0.0, 1.0, 2.5])
def test_gradient_penalty_per_sample_matches_analytic(target):
    g = 2 * C * X
    want = np.mean((np.linalg.norm(g.reshape(4, -1), axis=1) - target) ** 2)
    with jax.enable_x64(True):
        got = pw.gradient_penalty(quad, X, target_norm=target, per_sample=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_gradient_penalty_is_twice_differentiable():
    """Training with the penalty differentiates it (double backprop), checked numerically."""

    def smooth(v):
        return jnp.sum(jnp.tanh(v) * C)

    with jax.enable_x64(True):
        for per_sample in (False, True):
            check_grads(
                lambda x, p=per_sample: pw.gradient_penalty(smooth, x, per_sample=p),
                (jnp.asarray(X),),
                order=1,
                modes=("rev",),
                atol=1e-6,
                rtol=1e-6,
            )


def test_gradient_penalty_parameter_gradient_finite_at_zero_gradient():
    """At x = 0 the input gradient is 0: d penalty / d params must still be finite."""

    def penalty(w, x):
        return pw.gradient_penalty(lambda v: w * jnp.sum(v**2), x, per_sample=True)

    x = jnp.zeros((3, 2))
    value, (gw, gx) = jax.value_and_grad(penalty, argnums=(0, 1))(1.5, x)
    assert float(value) == 1.0  # (0 - 1)^2
    assert np.isfinite(float(gw)) and np.all(np.isfinite(gx))


# --- interpolated_gradient_penalty ----------------------------------------------------

FAKE = RNG.normal(size=(5, 3, 2))
REAL = RNG.normal(size=(5, 3, 2)) + 1.0
KEY = jax.random.key(11)


def igp_ref(fake, real, eps, target=1.0):
    x_hat = eps * fake + (1 - eps) * real
    norms = np.linalg.norm((2 * C * x_hat).reshape(len(x_hat), -1), axis=1)
    return np.mean((norms - target) ** 2)


def _eps(key, batch=5):
    return np.asarray(jax.random.uniform(key, (batch, 1, 1), dtype=jnp.float32), np.float64)


_igp = jax.jit(
    lambda f, r, k, t: pw.interpolated_gradient_penalty(critic, f, r, key=k, target_norm=t)
)


@pytest.mark.parametrize("target", [0.0, 1.0, 3.0])
def test_interpolated_matches_reference_with_one_eps_per_sample(target):
    got = _igp(FAKE.astype(np.float32), REAL.astype(np.float32), KEY, target)
    eps = _eps(KEY)
    assert len(np.unique(eps)) == 5
    np.testing.assert_allclose(got, igp_ref(FAKE, REAL, eps, target), rtol=1e-5)
    # one shared epsilon for the whole batch would give a different number
    shared = igp_ref(FAKE, REAL, np.full_like(eps, eps[0]), target)
    assert not np.isclose(float(got), shared, rtol=1e-3)


def test_interpolated_is_reproducible_and_key_dependent():
    f, r = FAKE.astype(np.float32), REAL.astype(np.float32)
    a = pw.interpolated_gradient_penalty(critic, f, r, key=KEY)
    b = pw.interpolated_gradient_penalty(critic, f, r, key=jax.random.key(11))
    c = pw.interpolated_gradient_penalty(critic, f, r, key=jax.random.key(12))
    legacy = pw.interpolated_gradient_penalty(critic, f, r, key=jax.random.PRNGKey(11))
    assert float(a) == float(b) == float(legacy)
    assert float(a) != float(c)
    np.testing.assert_allclose(_igp(f, r, KEY, 1.0), a, rtol=1e-6)  # jit with a traced key


def test_interpolated_eps_drawn_in_float32_then_cast():
    f, r = FAKE.astype(jnp.bfloat16), REAL.astype(jnp.bfloat16)
    got = pw.interpolated_gradient_penalty(critic, f, r, key=KEY)
    assert got.dtype == jnp.bfloat16
    eps = np.asarray(jnp.asarray(_eps(KEY), jnp.bfloat16), np.float64)
    want = igp_ref(np.asarray(f, np.float64), np.asarray(r, np.float64), eps)
    np.testing.assert_allclose(float(got), want, rtol=2e-2)
    with jax.enable_x64(True):  # float64 inputs: same float32 draw, cast up
        got64 = pw.interpolated_gradient_penalty(critic, FAKE, REAL, key=KEY)
        assert got64.dtype == jnp.float64
    np.testing.assert_allclose(got64, igp_ref(FAKE, REAL, _eps(KEY)), rtol=1e-12)


def test_interpolated_accepts_scalar_critic_output():
    f, r = FAKE.astype(np.float32), REAL.astype(np.float32)
    per_sample = pw.interpolated_gradient_penalty(critic, f, r, key=KEY)
    scalar = pw.interpolated_gradient_penalty(lambda x: jnp.sum(critic(x)), f, r, key=KEY)
    np.testing.assert_allclose(scalar, per_sample, rtol=1e-6)


def test_interpolated_gradient_reaches_critic_parameters():
    def loss(w):
        return pw.interpolated_gradient_penalty(lambda x: w * critic(x), FAKE, REAL, key=KEY)

    with jax.enable_x64(True):
        check_grads(loss, (1.3,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_interpolated_docstring_warns_about_batch_coupling():
    doc = pw.interpolated_gradient_penalty.__doc__
    assert "batch-coupling" in doc and "independently" in doc


# --- output_magnitude_penalty ---------------------------------------------------------

Y = RNG.normal(size=(4, 6))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target", [0.0, 1.0, 4.0])
def test_output_magnitude_matches_reference(reduction, target):
    agg = np.mean if reduction == "mean" else np.sum
    want = (np.sqrt(agg(Y**2)) - target) ** 2
    with jax.enable_x64(True):
        got = pw.output_magnitude_penalty(Y, target=target, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_output_magnitude_gradients():
    with jax.enable_x64(True):
        for reduction in ("mean", "sum"):
            check_grads(
                lambda y, r=reduction: pw.output_magnitude_penalty(y, reduction=r),
                (jnp.asarray(Y),),
                order=2,
                modes=("rev",),
            )
    value, grad = jax.value_and_grad(pw.output_magnitude_penalty)(jnp.zeros((2, 3)))
    assert float(value) == 1.0
    np.testing.assert_array_equal(grad, np.zeros((2, 3)))
