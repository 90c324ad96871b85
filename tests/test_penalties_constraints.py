"""orthogonality and consistency against float64 NumPy references, and properties."""

from __future__ import annotations

import itertools
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from scipy.special import log_softmax, rel_entr

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

RNG = np.random.default_rng(2)
INPUTS = {
    1: RNG.normal(size=(5,)),
    2: RNG.normal(size=(3, 5)),
    3: RNG.normal(size=(2, 3, 4)),
    4: RNG.normal(size=(2, 2, 3, 4)),
}


def orth_matrix_ref(x, axis):
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim == 3:
        b, s, d = x.shape
        return {
            "rows": x.reshape(b * s, d),
            "sequence": np.moveaxis(x, 1, 0).reshape(s, b * d),
            "vocabulary": np.moveaxis(x, 2, 0).reshape(d, b * s),
        }[axis]
    x = x.reshape(-1, x.shape[-1])
    return x.T if axis == "vocabulary" else x


def orth_ref(x, mode, normalize, axis):
    m = orth_matrix_ref(x, axis)
    if normalize:
        m = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-8)
    g = m @ m.T
    eye = np.eye(len(g))
    if mode == "soft":
        return np.sum((g * (1 - eye)) ** 2)
    if mode == "hard":
        return np.sum((g - eye) ** 2)
    return np.max((np.linalg.eigvalsh(g) - 1) ** 2)  # full n x n G, float64


CASES = [
    (rank, mode, normalize, axis)
    for rank, mode, normalize, axis in itertools.product(
        INPUTS, ["soft", "hard", "spectral"], [True, False], ["rows", "sequence", "vocabulary"]
    )
    if rank in (2, 3) or (normalize and axis != "sequence")
]


@pytest.mark.parametrize("rank, mode, normalize, axis", CASES)
def test_orthogonality_matches_reference(rank, mode, normalize, axis):
    x = INPUTS[rank]
    with jax.enable_x64(True):
        got = pw.orthogonality(x, mode=mode, normalize=normalize, axis=axis)
        assert got.dtype == jnp.float64 and got.shape == ()
    np.testing.assert_allclose(got, orth_ref(x, mode, normalize, axis), rtol=1e-9, atol=1e-12)


def test_axis_layouts_for_3d():
    x = jnp.arange(24.0).reshape(2, 3, 4)  # [batch, seq, dim]
    m = {
        a: pw.penalties._constraints.orthogonality_matrix(x, a)
        for a in ("rows", "sequence", "vocabulary")
    }
    assert m["rows"].shape == (6, 4)
    assert m["sequence"].shape == (3, 8)
    assert m["vocabulary"].shape == (4, 6)
    np.testing.assert_array_equal(m["sequence"][1], np.concatenate([x[0, 1], x[1, 1]]))
    np.testing.assert_array_equal(m["vocabulary"][2], np.asarray(x[..., 2]).ravel())


def test_orthonormal_rows_give_zero_in_every_mode():
    q, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
    for mode in ("soft", "hard", "spectral"):
        assert float(pw.orthogonality(q[:3], mode=mode, normalize=False)) == pytest.approx(
            0.0, abs=1e-5
        )


def test_seed_readme_example():
    h = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # normalized third row (1, 1)/sqrt(2): G_13 = G_23 = 1/sqrt(2); soft = 4 * 1/2 = 2
    assert float(pw.orthogonality(h, mode="soft")) == pytest.approx(2.0, rel=1e-6)
    assert float(pw.orthogonality(h, mode="hard")) == pytest.approx(2.0, rel=1e-6)
    # 3 rows in 2 dims: G has the eigenvalue 0, so spectral >= 1; the others are
    # eig(Mᵀ M) = eig([[1.5, 0.5], [0.5, 1.5]]) = {1, 2}: max deviation 1
    assert float(pw.orthogonality(h, mode="spectral")) == pytest.approx(1.0, rel=1e-5)


# --- the spectral mode: exactness and gradients ---------------------------------------


@pytest.mark.parametrize(
    "mode, shape, normalize",
    [
        ("soft", (3, 5), True),
        ("hard", (2, 3, 2), False),
        ("spectral", (3, 5), True),
        ("spectral", (5, 3), False),
    ],
)
def test_gradients_match_finite_differences(mode, shape, normalize):
    x = np.random.default_rng(3).normal(size=shape)  # distinct eigenvalues: differentiable

    def fn(v):
        return pw.orthogonality(v, mode=mode, normalize=normalize)

    with jax.enable_x64(True):
        check_grads(fn, (jnp.asarray(x),), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_spectral_float32_is_exact_to_float32_precision():
    x = np.random.default_rng(4).normal(size=(6, 8))
    got = pw.orthogonality(jnp.asarray(x, jnp.float32), mode="spectral", normalize=False)
    np.testing.assert_allclose(got, orth_ref(x, "spectral", False, "rows"), rtol=1e-5)


_spectral_vg = jax.jit(
    jax.value_and_grad(lambda v: pw.orthogonality(v, mode="spectral", normalize=False))
)


def test_spectral_gradient_finite_at_identity_and_ties():
    value, grad = _spectral_vg(jnp.eye(4))  # the optimum G = I: all eigenvalues tie at 1
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros((4, 4)))
    # repeated eigenvalues 4, 4 (tied maximum deviation 9) and 0.25
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
    m = jnp.asarray(np.diag([2.0, 2.0, 0.5]) @ q, jnp.float32)
    value, grad = _spectral_vg(m)
    assert float(value) == pytest.approx(9.0, rel=1e-5)
    assert np.all(np.isfinite(grad))
    # a valid subgradient: the directional derivative along the scaling direction m is
    # d/dt (4 (1+t)^2 - 1)^2 at 0 = 2 * 3 * 8 = 48
    assert float(jnp.sum(grad * m)) == pytest.approx(48.0, rel=1e-4)


def test_spectral_gradient_descent_reaches_orthogonality():
    x = np.random.default_rng(6).normal(size=(3, 5))
    x = jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)
    start = float(_spectral_vg(x)[0])
    for _ in range(100):
        x = x - 0.02 * _spectral_vg(x)[1]
    assert start > 0.1 and float(_spectral_vg(x)[0]) < 1e-5
    np.testing.assert_allclose(np.linalg.svd(np.asarray(x), compute_uv=False), 1.0, atol=1e-3)


@jax.jit
def _orth_grads(v):
    modes = ("soft", "hard", "spectral")
    return [jax.grad(lambda v, m=m: pw.orthogonality(v, mode=m))(v) for m in modes]


def test_zero_row_gives_finite_zero_gradient():
    x = np.random.default_rng(7).normal(size=(4, 5))
    x[2] = 0.0
    soft, hard, spectral = _orth_grads(jnp.asarray(x, jnp.float32))
    for g in (soft, hard, spectral):
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[2], np.zeros(5))
    assert np.any(soft != 0) and np.any(hard != 0)
    # spectral: the zero row puts the eigenvalue 0 in G, whose deviation 1 is constant


# --- tall matrices: soft and hard from the d x d Gram ---------------------------------


def _tall(shape, zero_rows=(), seed=11):
    x = np.random.default_rng(seed).normal(size=shape)
    x[list(zero_rows)] = 0.0
    return x


def _orth_direct(v, mode, normalize=True):
    """The n x n definition in jnp (the reference for gradients, in float64)."""
    m = v
    if normalize:
        nonzero = jnp.any(v != 0, axis=-1, keepdims=True)
        safe = jnp.where(nonzero, v, 1.0)  # no NaN gradient through a zero row's norm
        norm = jnp.maximum(jnp.linalg.norm(safe, axis=-1, keepdims=True), 1e-8)
        m = jnp.where(nonzero, safe / norm, 0.0)
    g = m @ m.T
    eye = jnp.eye(len(g))
    return jnp.sum((g * (1 - eye)) ** 2 if mode == "soft" else (g - eye) ** 2)


TALL = [((8, 4), ()), ((9, 4), (3,)), ((40, 8), (0, 5, 39)), ((64, 3), ())]


@pytest.mark.parametrize("shape, zero_rows", TALL)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_tall_normalized_rows_match_the_reference(shape, zero_rows, mode):
    x = _tall(shape, zero_rows)
    want = orth_ref(x, mode, True, "rows")
    with jax.enable_x64(True):
        got = pw.orthogonality(x, mode=mode)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        grad = jax.grad(lambda v: pw.orthogonality(v, mode=mode))(jnp.asarray(x))
        ref_grad = jax.grad(lambda v: _orth_direct(v, mode))(jnp.asarray(x))
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)
    got32 = jax.jit(lambda v: pw.orthogonality(v, mode=mode))(x.astype(np.float32))
    np.testing.assert_allclose(got32, want, rtol=2e-6)
    np.testing.assert_array_equal(
        np.asarray(grad)[list(zero_rows)], 0.0
    )  # an exactly-zero row keeps a zero gradient


def test_tall_path_builds_no_n_by_n_matrix():
    # the promise of docs/penalties.md: no [n, n] Gram for n >= 2d normalized rows,
    # the n x n one otherwise (normalize=False, or n < 2d)
    def shapes(x, **options):
        # every array shape of the lowered program (custom JVPs' bodies included)
        text = jax.jit(lambda v: pw.orthogonality(v, **options)).lower(x).as_text()
        found = re.findall(r"tensor<((?:\d+x)+)f32>", text)
        return {tuple(int(n) for n in dims.rstrip("x").split("x")) for dims in found}

    tall = jnp.ones((64, 8))
    assert (64, 64) not in shapes(tall) and (8, 8) in shapes(tall)
    assert (64, 64) not in shapes(tall, mode="hard")
    assert (64, 64) in shapes(tall, normalize=False)
    assert (15, 15) in shapes(jnp.ones((15, 8)))


def test_tall_orthonormal_rows_padded_with_zeros():
    # k orthonormal rows among zero rows: soft is 0 (clamped, never negative) and hard
    # counts the zero rows
    q, _ = np.linalg.qr(np.random.default_rng(12).normal(size=(6, 6)))
    x = np.zeros((30, 6), np.float32)
    x[[1, 7, 8, 20, 21, 29]] = q
    soft = float(pw.orthogonality(x))
    assert 0.0 <= soft < 1e-5
    assert float(pw.orthogonality(x, mode="hard")) == pytest.approx(24.0, abs=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_tall_path_of_16_bit_inputs_computes_in_float32(dtype):
    # 16-bit inputs are upcast first (as on the n x n path): the value is the float32
    # one, rounded once to the input's dtype
    x = _tall((64, 8), (5,)).astype(np.float32)
    got = pw.orthogonality(jnp.asarray(x, dtype))
    assert got.dtype == dtype
    want = orth_ref(np.asarray(jnp.asarray(x, dtype), np.float64), "soft", True, "rows")
    np.testing.assert_allclose(float(got), want, rtol=1e-2)


def test_tall_path_under_vmap_and_jit():
    x = np.stack([_tall((24, 4), (2,), seed=s) for s in range(3)]).astype(np.float32)
    fn = jax.jit(jax.vmap(jax.value_and_grad(pw.orthogonality)))
    values, grads = fn(x)
    for i in range(3):
        np.testing.assert_allclose(values[i], orth_ref(x[i], "soft", True, "rows"), rtol=2e-6)
        with jax.enable_x64(True):
            ref = jax.grad(lambda v: _orth_direct(v, "soft"))(jnp.asarray(x[i], jnp.float64))
        np.testing.assert_allclose(grads[i], ref, rtol=1e-4, atol=1e-6)


# --- soft and hard gradients: one matrix product back (custom JVPs) ------------------


@pytest.mark.parametrize(
    "shape, normalize",
    [((5, 7), True), ((5, 7), False), ((7, 5), True), ((9, 4), False), ((24, 4), True)],
)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_soft_and_hard_gradients_take_one_product_back(shape, normalize, mode):
    # both Gram forms (n x n, and d x d for n >= 2d normalized rows) differentiate by
    # their rules 4 T M / 4 M C: the gradient of the definition, first and second order
    # and under vmap, from two matrix products where autodiff of the definition takes three
    x = np.random.default_rng(13).normal(size=shape)

    def fn(v):
        return pw.orthogonality(v, mode=mode, normalize=normalize)

    def products(f):
        return str(jax.make_jaxpr(jax.value_and_grad(f))(x.astype(np.float32))).count("dot_general")

    with jax.enable_x64(True):
        grad = jax.grad(fn)(jnp.asarray(x))
        ref = jax.grad(lambda v: _orth_direct(v, mode, normalize))(jnp.asarray(x))
        np.testing.assert_allclose(grad, ref, rtol=1e-12, atol=1e-14)
        check_grads(fn, (jnp.asarray(x),), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
        batched = jax.vmap(jax.grad(fn))(jnp.stack([jnp.asarray(x), 2 * jnp.asarray(x)]))
        np.testing.assert_allclose(batched[0], ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(
            batched[1], jax.grad(fn)(2 * jnp.asarray(x)), rtol=1e-12, atol=1e-14
        )
    assert products(fn) == 2
    assert products(lambda v: _orth_direct(v, mode, normalize)) == 3


# --- consistency ---------------------------------------------------------------------

A = RNG.normal(size=(2, 3, 4))
B = RNG.normal(size=(2, 3, 4))


def consistency_ref(a, b, metric):
    if metric == "mse":
        return (a - b) ** 2
    if metric == "l1":
        return np.abs(a - b)
    if metric == "cosine":
        na = np.maximum(np.linalg.norm(a, axis=-1), 1e-8)
        nb = np.maximum(np.linalg.norm(b, axis=-1), 1e-8)
        return 1 - np.sum(a * b, -1) / (na * nb)
    pa, pb = np.exp(a), np.exp(b)
    return 0.5 * (rel_entr(pa, pb).sum(-1) + rel_entr(pb, pa).sum(-1))


@pytest.mark.parametrize("metric", ["mse", "l1", "cosine", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_consistency_matches_reference(metric, reduction):
    a, b = (log_softmax(A, -1), log_softmax(B, -1)) if metric == "kl" else (A, B)
    values = consistency_ref(a, b, metric)
    want = {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction](values)
    with jax.enable_x64(True):
        got = pw.consistency(a, b, metric=metric, reduction=reduction)
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_cosine_one_dimensional_is_one_row_and_zero_vectors_are_finite():
    assert float(pw.consistency(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0]), metric="cosine")) == (
        pytest.approx(1 - 1 / np.sqrt(2), rel=1e-6)
    )
    a = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    b = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    value, (ga, gb) = jax.value_and_grad(
        lambda a, b: pw.consistency(a, b, metric="cosine", reduction="sum"), argnums=(0, 1)
    )(a, b)
    assert float(value) == 2.0  # each row has a zero vector: cos = 0
    np.testing.assert_array_equal(ga, np.zeros((2, 3)))
    np.testing.assert_array_equal(gb, np.zeros((2, 3)))
    tiny = jnp.array([1e-9, 0.0, 0.0])  # below the floor: max(|a|, 1e-8) = 1e-8
    got = pw.consistency(tiny, jnp.array([1.0, 0.0, 0.0]), metric="cosine")
    assert float(got) == pytest.approx(1 - 0.1, rel=1e-5)


@pytest.mark.parametrize(
    "metric, transform",
    [("mse", None), ("l1", None), ("cosine", None), ("kl", "log_softmax")],
)
def test_consistency_gradients_match_finite_differences(metric, transform):
    a, b = A[0] + 0.01, B[0]  # away from the l1 kink
    if transform:
        a, b = log_softmax(a, -1), log_softmax(b, -1)
    with jax.enable_x64(True):
        check_grads(
            lambda x, y: pw.consistency(x, y, metric=metric),
            (jnp.asarray(a), jnp.asarray(b)),
            order=1,
            modes=("rev",),
            atol=1e-6,
            rtol=1e-6,
        )


# --- properties (hypothesis) ----------------------------------------------------------

PROPS = settings(max_examples=25, deadline=None)
matrices = hnp.arrays(np.float32, (3, 4), elements=st.floats(-10, 10, width=32))

_orth_all = jax.jit(
    lambda x: jnp.stack(
        [pw.orthogonality(x, mode=m, normalize=False) for m in ("soft", "hard", "spectral")]
    )
)
_orth_norm = jax.jit(lambda x: (pw.orthogonality(x), pw.orthogonality(x, mode="hard")))
_cons = jax.jit(
    lambda a, b: jnp.stack(
        [pw.consistency(a, b, metric=m) for m in ("mse", "l1", "cosine")]
        + [pw.consistency(jax.nn.log_softmax(a), jax.nn.log_softmax(b), metric="kl")]
    )
)


@PROPS
@given(matrices)
def test_orthogonality_properties(x):
    soft, hard, spectral = np.asarray(_orth_all(x), np.float64)
    tol = 1e-4 * max(1.0, hard)
    assert soft >= 0 and spectral >= 0
    assert soft <= hard + tol  # the diagonal only adds
    assert spectral <= hard + tol  # spectral norm <= Frobenius norm
    soft_n, hard_n = _orth_norm(x)
    if np.all(np.linalg.norm(x, axis=-1) > 1e-3):  # unit rows: hard == soft
        np.testing.assert_allclose(hard_n, soft_n, rtol=1e-4, atol=1e-4)


@PROPS
@given(matrices, matrices)
def test_consistency_properties(a, b):
    ab, ba, aa = (np.asarray(_cons(*args)) for args in ((a, b), (b, a), (a, a)))
    np.testing.assert_allclose(ab, ba, rtol=1e-4, atol=1e-5)  # symmetric
    assert np.all(np.asarray(ab) >= -1e-5)
    np.testing.assert_allclose(aa[[0, 1, 3]], 0.0, atol=1e-5)
    if np.all(np.linalg.norm(a, axis=-1) > 1e-3):  # a zero vector has cosine 0 with itself
        np.testing.assert_allclose(aa[2], 0.0, atol=1e-5)
    assert float(ab[2]) <= 2 + 1e-5  # 1 - cos in [0, 2]
