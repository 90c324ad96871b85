"""Closed-form input-gradient norms of the element-wise built-ins (SPEC §9) vs autodiff.

Every option combination of ``l1``, ``l2`` (center/clip), ``elastic_net``, ``entropy``
(mode/normalize/temperature) and ``output_magnitude_penalty``, in float32, bfloat16 and
float64 (x64), on inputs holding the edge values: zeros (``sign(0) = 0``), values on
the clipping boundary, ``-inf`` and ``<= -50`` log-probabilities. References: autodiff
through the penalty itself in float64, and in the input's own dtype. Then the pipeline:
the fused path (closed forms) equals the fallback path (the same penalties as custom
functions, one VJP each), mixed with a custom and a non-element-wise penalty, under jit
and vmap.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw
from penwatch.penalties import elastic_net, entropy, l1, l2, output_magnitude_penalty
from penwatch.penalties._closed_form import has_input_grad, input_grad
from penwatch.pipelines._grad_norms import STACK_MAX_ELEMENTS, ClosedFormTerm

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

CENTER, CLIP = 0.25, 0.5  # exact in bfloat16: center ± clip sits on the boundary exactly


def _cases() -> list[tuple[str, object, dict]]:
    out = []
    for reduction, strength in itertools.product(("sum", "mean"), (1.0, -0.3)):
        out.append(("l1", l1, {"reduction": reduction, "strength": strength}))
    for center, clip, reduction in itertools.product(
        (None, CENTER, "mean"), (None, CLIP), ("sum", "mean")
    ):
        out.append(
            ("l2", l2, {"center": center, "clip": clip, "reduction": reduction, "strength": 0.7})
        )
    for ratio, reduction in itertools.product((0.0, 0.3, 1.0), ("sum", "mean")):
        out.append(("elastic_net", elastic_net, {"l1_ratio": ratio, "reduction": reduction}))
    for mode, normalize, temperature, reduction in itertools.product(
        ("penalty", "bonus"), (False, True), (1.0, 0.5, 2.0), ("mean", "sum")
    ):
        opts = {"mode": mode, "normalize": normalize, "temperature": temperature}
        out.append(("entropy", entropy, {**opts, "reduction": reduction}))
    for target, reduction in itertools.product((0.0, 1.5), ("mean", "sum")):
        opts = {"target": target, "reduction": reduction}
        out.append(("output_magnitude", output_magnitude_penalty, opts))
    return out


CASES = _cases()
DTYPES = ("float32", "bfloat16", "float64")


def _input(name: str, dtype: str) -> np.ndarray:
    """A [6, 5] input with the edge values of ``name`` (float64, exact in ``dtype``)."""
    rng = np.random.default_rng(7)
    if name == "entropy":
        x = rng.normal(size=(6, 5))
        x = x - np.log(np.exp(x).sum(-1, keepdims=True))
        x[0, 1] = -np.inf  # a masked class
        x[1, :2] = -np.inf
        x[2, 3] = -50.0  # exactly on the mask floor
        x[3, 0] = -49.0
    else:
        x = rng.normal(size=(6, 5))
        x[0, :2] = 0.0  # sign(0) = 0
        x[1, :4] = [CENTER + CLIP, CENTER - CLIP, CLIP, -CLIP]  # clipping boundaries
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float64))


def _autodiff_norm(fn, x: jax.Array, options: dict) -> jax.Array:
    g = jax.grad(lambda x: fn(x, **options))(x)
    return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float64))))


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "fn", "options"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_closed_form_norm_equals_autodiff(name, fn, options, dtype):
    x64 = _input(name, dtype)
    x = jnp.asarray(x64, dtype)
    form = input_grad(fn, x, options)
    assert form is not None
    closed = float(jnp.sqrt(form.sq_norm))
    # float64 autodiff through the penalty on the same (dtype-exact) values
    ref = float(_autodiff_norm(fn, jnp.asarray(x64), options))
    rtol = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-5}[dtype]
    np.testing.assert_allclose(closed, ref, rtol=rtol, atol=1e-30)
    # autodiff in the input's own dtype (bfloat16 gradients are rounded to 8 bits)
    own = float(_autodiff_norm(fn, x, options))
    np.testing.assert_allclose(closed, own, rtol=1e-2 if dtype == "bfloat16" else 2e-5)
    # the gradient expression is the gradient itself
    grad = np.asarray(form.grad(), np.float64)
    ref_grad = np.asarray(jax.grad(lambda x: fn(x, **options))(jnp.asarray(x64)))
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=1e-6 * np.abs(ref_grad).max())


@pytest.mark.parametrize("fn", [l1, l2, elastic_net, output_magnitude_penalty])
def test_zero_input_norm_matches_autodiff(fn):
    x = jnp.zeros((3, 4), jnp.float32)
    closed = float(jnp.sqrt(input_grad(fn, x, {}).sq_norm))
    assert closed == float(_autodiff_norm(fn, x, {}))


@pytest.mark.parametrize("fn", [l1, elastic_net])
def test_a_nan_input_gives_a_nan_norm_as_autodiff_does(fn):
    """The count of non-zeros is Σ sign(x)², NaN at a NaN (as autodiff's sign)."""
    x = jnp.array([1.0, jnp.nan, 0.0, -2.0])
    assert np.isnan(float(input_grad(fn, x, {}).sq_norm))
    assert np.isnan(float(_autodiff_norm(fn, x, {})))


def test_not_covered_falls_back():
    x = jnp.ones((3, 4))
    assert input_grad(pw.penalties.orthogonality, x, {}) is None
    assert input_grad(lambda x: jnp.sum(x), x, {}) is None
    assert input_grad(l1, x, {"reduction": "none"}) is None
    assert input_grad(l1, jnp.ones((3, 4), jnp.int32), {}) is None
    assert input_grad(entropy, jnp.zeros(()), {}) is None
    assert not has_input_grad(l1, x, {"reduction": "none"})
    assert has_input_grad(l2, x, {"center": "mean", "clip": 1.0})


def _builtin_pipe() -> pw.Pipeline:
    return pw.pipeline(
        [
            ("l1", 1e-2),
            ("l2", 0.1, {"center": "mean", "clip": 0.5}),
            ("elastic_net", 0.05, {"l1_ratio": 0.3, "reduction": "mean"}),
            ("entropy", 0.2, {"mode": "bonus", "temperature": 0.7, "normalize": True}),
            ("output_magnitude", 0.3, {"target": 0.5}),
        ]
    )


def _shared_basis_pipe() -> pw.Pipeline:
    """Penalties whose gradients share the ``sign(x)`` and ``x`` bases (their coefficients
    are added before the total's reduction), beside entropy's own basis."""
    return pw.pipeline(
        [
            ("l1", 1e-2),
            ("l2", 0.1),
            ("elastic_net", 0.05, {"l1_ratio": 0.3}),
            ("entropy", 0.2, {"mode": "bonus"}),
            ("output_magnitude", 0.3, {"target": 0.5, "reduction": "sum"}),
        ]
    )


def _as_custom(pipe: pw.Pipeline) -> pw.Pipeline:
    """The same penalties as user functions: the fallback path (one VJP each)."""
    out = pw.Pipeline()
    for e in pipe.entries:
        out = out.add(e.name, lambda x, fn=e.fn, o=dict(e.options): fn(x, **o), weight=e.weight)
    return out


def _mixed(pipe: pw.Pipeline) -> pw.Pipeline:
    pipe = pipe.add("custom", lambda x: jnp.sum(jnp.sin(x) ** 2), weight=0.4)
    return pipe.add("orthogonality", weight=0.1)


def _logprobs(shape: tuple[int, int]) -> jax.Array:
    """Log-probabilities with a masked class (finite: l2's centering of -inf is NaN)."""
    x = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), shape, jnp.float64))
    return x.at[0, 2].set(-60.0).at[3, 0].set(0.0)


@pytest.mark.parametrize("build", [_builtin_pipe, _shared_basis_pipe], ids=["options", "shared"])
@pytest.mark.parametrize("mix", [False, True], ids=["builtins", "mixed"])
@pytest.mark.parametrize("shape", [(40, 70), (160, 120)])
def test_fused_path_equals_fallback(build, mix, shape):
    x = _logprobs(shape)
    fused, fallback = build(), _as_custom(build())
    if mix:
        fused, fallback = _mixed(fused), _mixed(fallback)
    assert all(
        isinstance(fused._grad_term(s, x), ClosedFormTerm) == (s.name in build())
        for s in fused._specs
    )
    assert (len(fused) + 1) * x.size > STACK_MAX_ELEMENTS  # the closed forms are used
    assert not any(isinstance(fallback._grad_term(s, x), ClosedFormTerm) for s in fallback._specs)
    compute = jax.jit(lambda p, x: p.compute(x, track_grad_norms=True))
    (t1, m1), (t2, m2) = compute(fused, x), compute(fallback, x)
    assert set(m1) == set(m2)
    for key in m1:
        np.testing.assert_allclose(m1[key], m2[key], rtol=1e-10, atol=1e-14, err_msg=key)
    np.testing.assert_allclose(t1, t2, rtol=1e-12)
    total = jnp.linalg.norm(jax.grad(fused.compute_total)(x))
    np.testing.assert_allclose(m1["total_grad_norm"], total, rtol=1e-10)


def test_fused_path_float32_and_vmap():
    x = _logprobs((40, 70)).astype(jnp.float32)
    fused, fallback = _mixed(_builtin_pipe()), _mixed(_as_custom(_builtin_pipe()))
    batch = jnp.stack([x, 0.5 * x, x[::-1]])
    run = jax.jit(jax.vmap(lambda x, p: p.compute(x, track_grad_norms=True)[1], (0, None)))
    m1, m2 = run(batch, fused), run(batch, fallback)
    for key in m1:
        np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5, atol=1e-7, err_msg=key)
    for i in range(3):
        _, single = fused.compute(batch[i], track_grad_norms=True)
        np.testing.assert_allclose(m1["total_grad_norm"][i], single["total_grad_norm"], rtol=1e-5)


def test_multi_pipeline_uses_closed_forms():
    x = jax.random.normal(jax.random.key(1), (80, 50), jnp.float64)
    lp = jax.nn.log_softmax(x)
    multi = (
        pw.MultiPipeline()
        .add("l1", inputs=("h",), weight=0.1)
        .add("entropy", inputs=("p",), weight=0.2)
        .add("kl", inputs=("p", "q"), weight=0.3)
    )
    inputs = {"h": x, "p": lp, "q": jax.nn.log_softmax(2 * x)}
    kinds = [isinstance(multi._grad_term(s, inputs), ClosedFormTerm) for s in multi._specs]
    assert kinds == [True, True, False]
    _, m = multi.compute(inputs, track_grad_norms=True)
    grads = jax.grad(multi.compute_total)(inputs)
    total = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(m["total_grad_norm"], total, rtol=1e-10)
    np.testing.assert_allclose(
        m["l1_grad_norm"], jnp.linalg.norm(jax.grad(lambda h: l1(h))(x)), rtol=1e-12
    )
    np.testing.assert_allclose(
        m["entropy_grad_norm"], jnp.linalg.norm(jax.grad(lambda p: entropy(p))(lp)), rtol=1e-12
    )


def test_shared_bases_are_summed_per_input():
    """Two inputs, each with penalties sharing the sign(x) and x bases: the coefficients
    of one input's bases never reach the other's (the total equals autodiff's)."""
    x = jax.random.normal(jax.random.key(1), (80, 50), jnp.float64)
    multi = (
        pw.MultiPipeline()
        .add("l1", inputs=("h",), weight=0.1)
        .add("l2", inputs=("h",), weight=0.2)
        .add("elastic_net", inputs=("p",), weight=0.3)
        .add("output_magnitude", inputs=("p",), weight=0.4)
    )
    inputs = {"h": x, "p": 2 * x + 1}
    assert all(isinstance(multi._grad_term(s, inputs), ClosedFormTerm) for s in multi._specs)
    _, m = multi.compute(inputs, track_grad_norms=True)
    grads = jax.grad(multi.compute_total)(inputs)
    total = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(m["total_grad_norm"], total, rtol=1e-12)


def test_small_inputs_take_the_stacked_vjp_path(monkeypatch):
    """Below the stacking size the closed forms are not used (fewer kernels), same norms."""
    from penwatch.pipelines import _grad_norms

    x = _logprobs((12, 7))
    calls = []
    monkeypatch.setattr(
        _grad_norms, "_sum_all", lambda ops, acc: calls.append(1) or [jnp.sum(o) for o in ops]
    )
    pipe = _builtin_pipe()
    # traced directly: the compiled pipeline cache would skip tracing
    _, m = jax.jit(lambda x: pipe._compute(x, True))(x)
    assert calls == []
    _, ref = _as_custom(pipe).compute(x, track_grad_norms=True)
    for key in m:
        np.testing.assert_allclose(m[key], ref[key], rtol=1e-12, err_msg=key)
    jax.make_jaxpr(lambda x: pipe._compute(x, True))(_logprobs((160, 120)))
    assert calls == [1]


def test_fused_path_bfloat16():
    """bf16 input: closed forms work on the float32 upcast, VJPs round gradients to bf16."""
    x = _logprobs((160, 120)).astype(jnp.bfloat16)
    fused, fallback = _mixed(_builtin_pipe()), _mixed(_as_custom(_builtin_pipe()))
    (_, m1), (_, m2) = (
        fused.compute(x, track_grad_norms=True),
        fallback.compute(x, track_grad_norms=True),
    )
    for key in m1:
        if key.endswith("grad_norm"):
            assert m1[key].dtype == jnp.float32
            np.testing.assert_allclose(m1[key], m2[key], rtol=1e-2, err_msg=key)
        else:
            np.testing.assert_array_equal(m1[key], m2[key], err_msg=key)
