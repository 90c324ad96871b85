"""l1, l2, elastic_net against float64 NumPy references, the seed's numbers, properties."""

from __future__ import annotations

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

SEED_WEIGHTS = [1.0, -2.0, 3.0, 0.5]  # the seed README's Quick Start tensor


def l1_ref(x, strength=1.0, reduction="sum"):
    return strength * _reduce(np.abs(x), reduction)


def l2_ref(x, strength=1.0, reduction="sum", center=None, clip=None):
    y = np.asarray(x, np.float64)
    if center == "mean":
        y = y - y.mean()
    elif center is not None:
        y = y - center
    if clip is not None:
        y = np.clip(y, -clip, clip)
    return strength * _reduce(y**2, reduction)


def elastic_net_ref(x, strength=1.0, l1_ratio=0.5, reduction="sum"):
    return strength * (
        l1_ratio * _reduce(np.abs(x), reduction) + (1 - l1_ratio) * _reduce(x**2, reduction)
    )


def _reduce(v, reduction):
    return {"sum": np.sum, "mean": np.mean, "none": lambda a: a}[reduction](v)


RNG = np.random.default_rng(0)
X64 = RNG.normal(size=(3, 4)) * 2.0


# --- the seed README's own numbers ---------------------------------------------------


def test_seed_readme_numbers():
    w = jnp.array(SEED_WEIGHTS)
    np.testing.assert_allclose(pw.l1(w), 6.5, rtol=1e-6)
    np.testing.assert_allclose(pw.l2(w, strength=0.01), 0.1425, rtol=1e-6)
    np.testing.assert_allclose(pw.elastic_net(w, l1_ratio=0.5), 10.375, rtol=1e-6)
    np.testing.assert_allclose(pw.elastic_net(w), 0.5 * 6.5 + 0.5 * 14.25, rtol=1e-6)


# --- float64 references, every option combination ------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("strength", [1.0, 0.01, -2.5])
def test_l1_matches_reference(reduction, strength):
    with jax.enable_x64(True):
        got = pw.l1(X64, strength=strength, reduction=reduction)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, l1_ref(X64, strength, reduction), rtol=1e-12)


@pytest.mark.parametrize(
    "reduction, center, clip",
    list(itertools.product(["sum", "mean", "none"], [None, "mean", 0.3, -1], [None, 0.5, 3])),
)
def test_l2_matches_reference(reduction, center, clip):
    with jax.enable_x64(True):
        got = pw.l2(X64, strength=0.7, reduction=reduction, center=center, clip=clip)
        want = l2_ref(X64, 0.7, reduction, center, clip)
        assert got.shape == np.shape(want)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_l2_centers_before_clipping():
    x = jnp.array([10.0, 12.0])  # mean 11: centered [-1, 1], within the clip
    np.testing.assert_allclose(pw.l2(x, center="mean", clip=2.0), 2.0)
    # clipping first would give 2^2 + 2^2 = 8 minus nothing: a different number
    np.testing.assert_allclose(pw.l2(x, clip=2.0), 8.0)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("l1_ratio", [0.0, 0.3, 1.0])
def test_elastic_net_matches_reference(reduction, l1_ratio):
    with jax.enable_x64(True):
        got = pw.elastic_net(X64, strength=1.5, l1_ratio=l1_ratio, reduction=reduction)
        want = elastic_net_ref(X64, 1.5, l1_ratio, reduction)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_elastic_net_endpoints_are_l1_and_l2():
    x = jnp.asarray(X64, jnp.float32)
    np.testing.assert_allclose(pw.elastic_net(x, l1_ratio=1.0), pw.l1(x), rtol=1e-6)
    np.testing.assert_allclose(pw.elastic_net(x, l1_ratio=0.0), pw.l2(x), rtol=1e-6)


# --- gradients -----------------------------------------------------------------------


def test_l1_subgradient_at_zero_is_zero():
    x = jnp.array([-1.5, 0.0, 2.0, -0.0])
    np.testing.assert_array_equal(jax.grad(pw.l1)(x), [-1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(
        jax.grad(lambda v: pw.elastic_net(v, l1_ratio=1.0))(x), [-1.0, 0.0, 1.0, 0.0]
    )
    np.testing.assert_array_equal(
        jax.grad(lambda v: pw.consistency(v, jnp.zeros(4), metric="l1", reduction="sum"))(x),
        [-1.0, 0.0, 1.0, 0.0],
    )


def test_analytic_gradients():
    x = jnp.asarray(X64, jnp.float32)
    np.testing.assert_allclose(jax.grad(lambda v: pw.l1(v, strength=0.3))(x), 0.3 * np.sign(x))
    np.testing.assert_allclose(jax.grad(lambda v: pw.l2(v, strength=0.3))(x), 0.6 * x, rtol=1e-6)
    clipped = jax.grad(lambda v: pw.l2(v, clip=1.0))(x)
    np.testing.assert_allclose(clipped, np.where(np.abs(x) < 1.0, 2 * x, 0.0), rtol=1e-6)
    en = jax.grad(lambda v: pw.elastic_net(v, l1_ratio=0.25, reduction="mean"))(x)
    np.testing.assert_allclose(en, (0.25 * np.sign(x) + 0.75 * 2 * x) / x.size, rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda v: pw.l1(v, reduction="mean"),
        lambda v: pw.l2(v, center="mean", clip=10.0),
        lambda v: pw.l2(v, center=0.1, reduction="mean"),
        lambda v: pw.elastic_net(v, l1_ratio=0.4),
    ],
    ids=["l1", "l2_center_mean", "l2_center_number", "elastic_net"],
)
def test_gradients_match_finite_differences(fn):
    with jax.enable_x64(True):
        check_grads(fn, (jnp.asarray(X64),), order=2, modes=("rev",), atol=1e-6, rtol=1e-6)


# --- properties (hypothesis) ----------------------------------------------------------

_l1 = jax.jit(lambda x, s: pw.l1(x, strength=s))
_l2 = jax.jit(lambda x, s: pw.l2(x, strength=s))
_l2_mean = jax.jit(lambda x: pw.l2(x, center="mean"))
_l2_clip = jax.jit(lambda x: pw.l2(x, clip=0.5, reduction="mean"))
_en = jax.jit(lambda x, s, r: pw.elastic_net(x, strength=s, l1_ratio=r))

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = hnp.arrays(np.float32, (8,), elements=finite)
strengths = st.floats(-10, 10, allow_nan=False, width=32)
PROPS = settings(max_examples=25, deadline=None)


@PROPS
@given(vectors, strengths)
def test_norms_scale_linearly_with_strength(x, s):
    for fn in (_l1, _l2):
        np.testing.assert_allclose(fn(x, s), s * fn(x, 1.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_en(x, s, 0.3), s * _en(x, 1.0, 0.3), rtol=1e-5, atol=1e-6)


@PROPS
@given(vectors, st.floats(0, 1, width=32))
def test_norms_are_non_negative_and_bounded(x, r):
    assert _l1(x, 1.0) >= 0 and _l2(x, 1.0) >= 0 and _en(x, 1.0, r) >= 0
    assert 0 <= _l2_clip(x) <= 0.25 + 1e-6  # clipped to [-0.5, 0.5]
    lo, hi = sorted([float(_l1(x, 1.0)), float(_l2(x, 1.0))])
    # a convex combination of l1 and l2 lies between them
    assert lo * (1 - 1e-5) - 1e-3 <= float(_en(x, 1.0, r)) <= hi * (1 + 1e-5) + 1e-3


@PROPS
@given(vectors, st.floats(-100, 100, width=32))
def test_mean_centering_is_shift_invariant(x, c):
    np.testing.assert_allclose(_l2_mean(x + c), _l2_mean(x), rtol=1e-3, atol=1e-2)
