"""kl_divergence, js_divergence, entropy against SciPy float64 references, and properties."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, rel_entr, softmax
from scipy.stats import entropy as scipy_entropy

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

RNG = np.random.default_rng(1)
SHAPE = (2, 3, 5)  # two batch axes, 5 classes
P_LP = log_softmax(RNG.normal(size=SHAPE) * 1.5, axis=-1)
Q_LP = log_softmax(RNG.normal(size=SHAPE) * 1.5, axis=-1)


def _reduce(rows, reduction):
    return {"sum": np.sum, "mean": np.mean, "none": lambda a: a}[reduction](rows)


def kl_ref(p_lp, q_lp):
    """Per-row KL with scipy.special.rel_entr (p = 0 terms are 0)."""
    return rel_entr(np.exp(p_lp), np.exp(q_lp)).sum(-1)


def js_ref(p_lp, q_lp):
    """scipy's jensenshannon is the square root of JS (natural log by default)."""
    return jensenshannon(np.exp(p_lp), np.exp(q_lp), axis=-1) ** 2


def entropy_ref(lp, normalize=False, temperature=1.0):
    if temperature != 1.0:
        lp = log_softmax(lp / temperature, axis=-1)
    h = scipy_entropy(np.exp(lp), axis=-1)
    return h / math.log(lp.shape[-1]) if normalize else h


# --- float64 references ---------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "direction, symmetric",
    [("forward", False), ("reverse", False), ("forward", True), ("reverse", True)],
)
def test_kl_matches_rel_entr(reduction, direction, symmetric):
    if symmetric:
        rows = 0.5 * (kl_ref(P_LP, Q_LP) + kl_ref(Q_LP, P_LP))
    elif direction == "reverse":
        rows = kl_ref(Q_LP, P_LP)
    else:
        rows = kl_ref(P_LP, Q_LP)
    with jax.enable_x64(True):
        got = pw.kl_divergence(
            P_LP, Q_LP, reduction=reduction, direction=direction, symmetric=symmetric
        )
        assert got.dtype == jnp.float64
    assert got.shape == (SHAPE[:-1] if reduction == "none" else ())
    np.testing.assert_allclose(got, _reduce(rows, reduction), rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_js_matches_scipy_jensenshannon(reduction):
    with jax.enable_x64(True):
        got = pw.js_divergence(P_LP, Q_LP, reduction=reduction)
    np.testing.assert_allclose(got, _reduce(js_ref(P_LP, Q_LP), reduction), rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("mode", ["penalty", "bonus"])
def test_entropy_matches_scipy(reduction, normalize, temperature, mode):
    rows = entropy_ref(P_LP, normalize, temperature)
    sign = 1.0 if mode == "penalty" else -1.0
    with jax.enable_x64(True):
        got = pw.entropy(
            P_LP, mode=mode, reduction=reduction, normalize=normalize, temperature=temperature
        )
    np.testing.assert_allclose(got, sign * _reduce(rows, reduction), rtol=1e-10)


def test_entropy_sign_convention():
    lp = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    h = scipy_entropy([0.7, 0.2, 0.1])
    assert float(pw.entropy(lp)) == pytest.approx(h, rel=1e-6)  # penalty: +H
    assert float(pw.entropy(lp, mode="bonus")) == pytest.approx(-h, rel=1e-6)  # bonus: -H
    # Minimizing the penalty sharpens: a gradient step lowers the entropy.
    step = lp - 0.1 * jax.grad(pw.entropy)(lp)
    step = jax.nn.log_softmax(step)
    assert scipy_entropy(np.exp(step)) < h


def test_entropy_temperature_sharpens_and_flattens():
    lp = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    base = float(pw.entropy(lp))
    assert float(pw.entropy(lp, temperature=0.5)) < base < float(pw.entropy(lp, temperature=2.0))


def test_entropy_normalized_single_class_is_zero():
    assert float(pw.entropy(jnp.zeros((3, 1)), normalize=True)) == 0.0


# --- zero probabilities, huge values --------------------------------------------------


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64))


# p and q share their zeros (symmetric KL finite); Q2 puts mass where p has none.
P0 = _log([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0]])
Q0 = _log([[0.25, 0.75, 0.0, 0.0], [0.1, 0.6, 0.3, 0.0]])
Q2 = _log([[0.25, 0.25, 0.5, 0.0], [0.1, 0.6, 0.2, 0.1]])


def _sym_ref(p, q):
    return (0.5 * (kl_ref(p, q) + kl_ref(q, p))).mean()


def _entropies(p, q):
    return scipy_entropy(np.exp(p), axis=-1).mean() + scipy_entropy(np.exp(q), axis=-1).mean()


@pytest.mark.parametrize(
    "fn, q, want",
    [
        (pw.kl_divergence, Q0, kl_ref(P0, Q0).mean()),
        (pw.kl_divergence, Q2, kl_ref(P0, Q2).mean()),
        (lambda a, b: pw.kl_divergence(a, b, symmetric=True), Q0, _sym_ref(P0, Q0)),
        (lambda a, b: pw.consistency(a, b, metric="kl"), Q0, _sym_ref(P0, Q0)),
        (pw.js_divergence, Q0, js_ref(P0, Q0).mean()),
        (pw.js_divergence, Q2, js_ref(P0, Q2).mean()),
        (lambda a, b: pw.entropy(a) + pw.entropy(b), Q2, _entropies(P0, Q2)),
    ],
    ids=["kl", "kl_extra_support", "kl_symmetric", "consistency_kl", "js", "js_extra", "entropy"],
)
def test_zero_probabilities_give_reference_values_and_finite_gradients(fn, q, want):
    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(fn, argnums=(0, 1))(P0, q)
        value, grads = np.asarray(value), [np.asarray(g) for g in grads]
    np.testing.assert_allclose(value, want, rtol=1e-10)
    for g in grads:
        assert np.all(np.isfinite(g))
        assert np.all(g[np.isneginf(P0) & np.isneginf(q)] == 0.0)


def test_support_mismatch_is_clipped_at_100():
    """``q = 0`` where ``p > 0``: the log-ratio is clipped to 100 instead of +inf."""
    p_lp = np.log([0.5, 0.5])
    q_lp = np.array([0.0, -np.inf])
    want = 0.5 * math.log(0.5) + 0.5 * 100.0
    assert float(pw.kl_divergence(p_lp, q_lp)) == pytest.approx(want, rel=1e-6)
    g = jax.grad(pw.kl_divergence, argnums=(0, 1))(p_lp, q_lp)
    assert all(np.all(np.isfinite(x)) for x in g)
    huge = np.array([0.0, -1e30])  # a huge but finite log-probability behaves the same
    assert float(pw.kl_divergence(p_lp, huge)) == pytest.approx(want, rel=1e-6)


def test_tiny_probabilities_are_masked():
    p_lp = np.array([0.0, -30.0])  # exp(-30) ~ 9e-14 <= 1e-10: masked in KL
    q_lp = np.array([-0.1, -1.0])
    assert float(pw.kl_divergence(p_lp, q_lp)) == pytest.approx(0.1, rel=1e-6)
    lp = np.array([0.0, -60.0])  # logprob <= -50: masked in entropy
    assert float(pw.entropy(lp)) == 0.0


@jax.jit
def _kl_js_and_grads(a, b):
    def total(a, b):
        return pw.kl_divergence(a, b) + pw.js_divergence(a, b) + pw.entropy(a)

    grads = jax.grad(total, argnums=(0, 1))(a, b)
    return pw.kl_divergence(a, b), pw.js_divergence(a, b), pw.entropy(a, temperature=0.5), grads


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_huge_logits_stay_finite_in_low_precision(dtype):
    logits = jnp.array([[1e4, -1e4, 0.0], [3e4, 3e4, -3e4]], jnp.float32)
    a = jax.nn.log_softmax(logits).astype(dtype)  # contains -1e4-ish and -inf-free extremes
    *values, grads = _kl_js_and_grads(a, jnp.flip(a, -1))
    for v in values:
        assert v.dtype == jnp.dtype(dtype) and np.isfinite(float(v))
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_reverse_is_swap_and_symmetric_ignores_direction():
    a, b = jnp.asarray(P_LP, jnp.float32), jnp.asarray(Q_LP, jnp.float32)
    np.testing.assert_allclose(
        pw.kl_divergence(a, b, direction="reverse"), pw.kl_divergence(b, a), rtol=1e-6
    )
    np.testing.assert_allclose(
        pw.kl_divergence(a, b, symmetric=True, direction="reverse"),
        pw.kl_divergence(a, b, symmetric=True),
        rtol=1e-6,
    )


def test_one_dimensional_input_is_one_row():
    with jax.enable_x64(True):
        got = pw.kl_divergence(P_LP[0, 0], Q_LP[0, 0], reduction="none")
    assert got.shape == ()
    np.testing.assert_allclose(got, kl_ref(P_LP[0, 0], Q_LP[0, 0]), rtol=1e-12)


# --- gradients -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        pw.kl_divergence,
        lambda a, b: pw.kl_divergence(a, b, symmetric=True, reduction="sum"),
        pw.js_divergence,
        lambda a, b: pw.entropy(a, normalize=True) + pw.entropy(b, temperature=0.7),
    ],
    ids=["kl", "kl_symmetric", "js", "entropy"],
)
def test_gradients_match_finite_differences(fn):
    with jax.enable_x64(True):
        args = (jnp.asarray(P_LP[0]), jnp.asarray(Q_LP[0]))
        check_grads(fn, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_entropy_gradient_analytic():
    lp = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    # d/dlp_k of -sum exp(lp) lp = -p_k (lp_k + 1)
    want = -np.exp(lp) * (lp + 1)
    np.testing.assert_allclose(jax.grad(pw.entropy)(lp), want, rtol=1e-6)


# --- properties (hypothesis) ----------------------------------------------------------

_kl = jax.jit(pw.kl_divergence)
_kl_sym = jax.jit(lambda a, b: pw.kl_divergence(a, b, symmetric=True, reduction="none"))
_js = jax.jit(lambda a, b: pw.js_divergence(a, b, reduction="none"))
_h_norm = jax.jit(lambda a: pw.entropy(a, normalize=True, reduction="none"))
_h_bonus = jax.jit(lambda a: pw.entropy(a, mode="bonus", reduction="none"))
_h = jax.jit(lambda a: pw.entropy(a, reduction="none"))

PROPS = settings(max_examples=25, deadline=None)
logits = hnp.arrays(np.float64, (4, 6), elements=st.floats(-30, 30, allow_nan=False))
zero_masks = hnp.arrays(np.bool_, (4, 6))


@st.composite
def logprobs(draw):
    """Rows of log-probabilities, some with exact zeros (-inf), each row with support."""
    x = draw(logits)
    mask = draw(zero_masks)
    mask[:, 0] = False
    x = np.where(mask, -np.inf, x)
    return log_softmax(x, axis=-1).astype(np.float32)


@PROPS
@given(logprobs(), logprobs())
def test_divergence_properties(p, q):
    assert float(_kl(p, q)) >= -1e-5  # Gibbs' inequality
    np.testing.assert_allclose(_kl(p, p), 0.0, atol=1e-5)
    np.testing.assert_allclose(_kl_sym(p, q), _kl_sym(q, p), rtol=1e-5, atol=1e-5)
    js = np.asarray(_js(p, q))
    np.testing.assert_allclose(js, _js(q, p), rtol=1e-5, atol=1e-6)
    assert np.all(js >= -1e-6) and np.all(js <= math.log(2) + 1e-5)


@PROPS
@given(logprobs())
def test_entropy_properties(lp):
    h = np.asarray(_h_norm(lp))
    assert np.all(h >= -1e-6) and np.all(h <= 1 + 1e-5)
    np.testing.assert_allclose(_h_bonus(lp), -np.asarray(_h(lp)), rtol=1e-6)
    want = scipy_entropy(softmax(lp.astype(np.float64), axis=-1), axis=-1) / math.log(6)
    np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-5)


def test_nan_input_is_not_hidden_by_masks():
    """entropy masks very negative log-probs and output magnitude guards sqrt at 0; a
    NaN input must still give a NaN value (else the non-finite report misses it)."""
    nan_lp = jnp.log(jnp.array([[0.5, 0.5], [0.5, jnp.nan]]))
    assert jnp.isnan(pw.entropy(nan_lp))
    assert jnp.isnan(pw.output_magnitude_penalty(jnp.array([1.0, jnp.nan])))
    assert float(pw.entropy(jnp.log(jnp.array([1.0, 0.0])))) == 0.0  # -inf still masked
