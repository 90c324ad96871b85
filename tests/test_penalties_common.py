"""Properties every penalty primitive shares (one parametrized registry).

Like optax/_src/float64_test.py: every primitive (with its main option variants) keeps
the input dtype (f32/bf16/f16, and f64 under x64) for its value and its gradient, gives
finite values and gradients at the edges (zeros, -inf log-probabilities, zero rows and
vectors, the spectral optimum), matches eager under jit, and works under vmap. The
option-validation messages of SPEC section 2 are checked here too, for every primitive.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw
from penwatch import _checks

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

KEY = jax.random.key(7)


def _logprobs(rng: np.random.Generator, shape: tuple[int, ...], zeros: bool) -> np.ndarray:
    logits = rng.normal(size=shape)
    lp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    if zeros:  # exact zero probabilities: log p = -inf
        lp[..., 0] = -np.inf
        lp = lp - np.log(np.sum(np.exp(lp), axis=-1, keepdims=True))
    return lp


def _matrix_edges(rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(4, 5))
    x[1] = 0.0  # a zero row
    return x


def _with_zeros(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.normal(size=shape)
    x.flat[::3] = 0.0  # exact zeros: sign(0) = 0 subgradient
    return x


class Case(NamedTuple):
    fn: Callable[..., jax.Array]
    make: Callable[[np.random.Generator], tuple[np.ndarray, ...]]


def _pair_lp(rng):
    return _logprobs(rng, (3, 5), True), _logprobs(rng, (3, 5), False)


def _pair_lp_both_zero(rng):
    p, q = _logprobs(rng, (3, 5), True), _logprobs(rng, (3, 5), True)
    return p, q


def _cosine_pair(rng):
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    a[0] = 0.0
    b[2] = 0.0
    return a, b


def _sq(v):
    return jnp.sum(v**2)


def _critic(v):
    return jnp.sum(jnp.tanh(v) * 1.5, axis=-1)


REGISTRY: dict[str, Case] = {
    "l1": Case(pw.l1, lambda r: (_with_zeros(r, (4, 3)),)),
    "l1_none": Case(functools.partial(pw.l1, reduction="none"), lambda r: (_with_zeros(r, (6,)),)),
    "l2": Case(functools.partial(pw.l2, strength=0.01), lambda r: (_with_zeros(r, (4, 3)),)),
    "l2_center_clip": Case(
        functools.partial(pw.l2, center="mean", clip=0.5, reduction="mean"),
        lambda r: (_with_zeros(r, (4, 3)),),
    ),
    "elastic_net": Case(
        functools.partial(pw.elastic_net, l1_ratio=0.3), lambda r: (_with_zeros(r, (4, 3)),)
    ),
    "kl": Case(pw.kl_divergence, _pair_lp),
    "kl_symmetric": Case(functools.partial(pw.kl_divergence, symmetric=True), _pair_lp_both_zero),
    "js": Case(pw.js_divergence, _pair_lp_both_zero),
    "entropy": Case(pw.entropy, lambda r: (_logprobs(r, (3, 5), True),)),
    "entropy_bonus_norm_temp": Case(
        functools.partial(pw.entropy, mode="bonus", normalize=True, temperature=0.5),
        lambda r: (_logprobs(r, (3, 5), True),),
    ),
    "orthogonality_soft": Case(pw.orthogonality, lambda r: (_matrix_edges(r),)),
    "orthogonality_hard_vocab": Case(
        functools.partial(pw.orthogonality, mode="hard", normalize=False, axis="vocabulary"),
        lambda r: (_matrix_edges(r),),
    ),
    "orthogonality_spectral": Case(
        functools.partial(pw.orthogonality, mode="spectral"), lambda r: (_matrix_edges(r),)
    ),
    "orthogonality_spectral_3d_tall": Case(  # [2, 3, 2] -> [6, 2]: more rows than dims
        functools.partial(pw.orthogonality, mode="spectral", normalize=False),
        lambda r: (_matrix_edges(r)[:, :3].reshape(2, 3, 2),),
    ),
    "consistency_mse": Case(
        pw.consistency, lambda r: (r.normal(size=(3, 4)), r.normal(size=(3, 4)))
    ),
    "consistency_l1": Case(
        functools.partial(pw.consistency, metric="l1"),
        lambda r: (_with_zeros(r, (3, 4)), np.zeros((3, 4))),
    ),
    "consistency_cosine": Case(functools.partial(pw.consistency, metric="cosine"), _cosine_pair),
    "consistency_kl": Case(functools.partial(pw.consistency, metric="kl"), _pair_lp_both_zero),
    "gradient_penalty": Case(lambda x: pw.gradient_penalty(_sq, x), lambda r: (np.zeros((2, 3)),)),
    "gradient_penalty_per_sample": Case(
        lambda x: pw.gradient_penalty(_sq, x, per_sample=True, target_norm=0.5),
        lambda r: (np.concatenate([np.zeros((1, 3)), r.normal(size=(2, 3))]),),
    ),
    "interpolated_gradient_penalty": Case(
        lambda f, r: pw.interpolated_gradient_penalty(_critic, f, r, key=KEY),
        lambda r: (r.normal(size=(3, 4)), r.normal(size=(3, 4))),
    ),
    "output_magnitude": Case(pw.output_magnitude_penalty, lambda r: (np.zeros((3, 4)),)),
    "output_magnitude_sum": Case(
        functools.partial(pw.output_magnitude_penalty, reduction="sum", target=2.0),
        lambda r: (r.normal(size=(3, 4)),),
    ),
}

NAMES = sorted(REGISTRY)


def _scalar(fn):
    return lambda *args: jnp.sum(fn(*args))


@functools.cache
def _value_and_grad(name: str):
    case = REGISTRY[name]
    n_args = len(case.make(np.random.default_rng(0)))
    vg = jax.value_and_grad(_scalar(case.fn), argnums=tuple(range(n_args)))
    return jax.jit(lambda *args: (case.fn(*args), vg(*args)[1]))


def _inputs(name: str, dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(sum(map(ord, name)) + seed)
    return tuple(jnp.asarray(a, dtype=dtype) for a in REGISTRY[name].make(rng))


def _finite(a) -> bool:
    return bool(np.all(np.isfinite(np.asarray(a, np.float32))))


@pytest.mark.parametrize("name", NAMES)
def test_dtype_kept_and_finite_at_edges(name):
    ref = None
    for dtype in ("float32", "bfloat16", "float16"):
        args = _inputs(name, dtype)
        value, grads = _value_and_grad(name)(*args)
        assert value.dtype == jnp.dtype(dtype), (name, dtype, value.dtype)
        assert _finite(value), (name, dtype, value)
        for g, a in zip(grads, args, strict=True):
            assert g.dtype == a.dtype, (name, dtype, g.dtype)
            assert _finite(g), (name, dtype, g)
        if ref is None:
            ref = np.asarray(value)
        else:  # low precision stays close to float32 (computed in float32 inside)
            np.testing.assert_allclose(np.asarray(value, np.float32), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_float64_under_x64(name):
    ref, _ = _value_and_grad(name)(*_inputs(name, "float32"))
    with jax.enable_x64(True):
        args = _inputs(name, "float64")
        value, grads = _value_and_grad(name)(*args)
        assert value.dtype == jnp.float64
        assert all(g.dtype == jnp.float64 for g in grads)
        assert _finite(value) and all(_finite(g) for g in grads)
    np.testing.assert_allclose(np.asarray(value), np.asarray(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap_match_eager(name):
    case = REGISTRY[name]
    per_item = [_inputs(name, "float32", seed) for seed in range(3)]
    looped = np.stack([np.asarray(case.fn(*args)) for args in per_item])  # eager
    jitted, _ = _value_and_grad(name)(*per_item[0])
    np.testing.assert_allclose(np.asarray(jitted), looped[0], rtol=1e-5, atol=1e-6)
    stacked = tuple(jnp.stack(parts) for parts in zip(*per_item, strict=True))
    batched = jax.jit(jax.vmap(case.fn))(*stacked)
    np.testing.assert_allclose(np.asarray(batched), looped, rtol=1e-5, atol=1e-6)


def test_integer_input_promoted_to_default_float():
    x = jnp.array([1, -2, 3], dtype=jnp.int32)
    assert pw.l1(x).dtype == jnp.float32
    assert float(pw.l1(x)) == 6.0
    assert pw.orthogonality(jnp.eye(2, dtype=jnp.int32)).dtype == jnp.float32
    with jax.enable_x64(True):
        assert pw.l2(np.array([1, 2], dtype=np.int64)).dtype == jnp.float64


def test_complex_input_rejected():
    with pytest.raises(ValueError, match=r"penwatch\.l1: argument 'x' must be a real array"):
        pw.l1(jnp.array([1 + 1j]))


def test_traced_strength_is_accepted_and_differentiable():
    x = jnp.array([1.0, -2.0, 3.0, 0.5])
    grad = jax.grad(lambda s: pw.l2(x, strength=s))(0.5)
    np.testing.assert_allclose(grad, 14.25, rtol=1e-6)
    grad = jax.grad(lambda r: pw.elastic_net(x, l1_ratio=r))(0.5)
    np.testing.assert_allclose(grad, 6.5 - 14.25, rtol=1e-6)


# --- option validation (SPEC section 2 option rules) --------------------------------

X = jnp.ones((2, 3))
LP = jnp.log(jnp.full((2, 3), 1 / 3))

BAD_OPTIONS = [
    (
        lambda: pw.l1(X, reduction="avg"),
        "penwatch.l1: option 'reduction' must be one of 'sum', 'mean', 'none', got 'avg'",
    ),
    (
        lambda: pw.l1(X, strength=float("nan")),
        "penwatch.l1: option 'strength' must be a finite real number, got nan",
    ),
    (
        lambda: pw.l1(X, strength="big"),
        "penwatch.l1: option 'strength' must be a finite real number, got 'big'",
    ),
    (
        lambda: pw.l1(X, strength=True),
        "penwatch.l1: option 'strength' must be a finite real number, got True",
    ),
    (
        lambda: pw.l2(X, clip=-1.0),
        "penwatch.l2: option 'clip' must be a finite real number > 0, got -1.0",
    ),
    (
        lambda: pw.l2(X, clip=0),
        "penwatch.l2: option 'clip' must be a finite real number > 0, got 0",
    ),
    (
        lambda: pw.l2(X, center="median"),
        "penwatch.l2: option 'center' must be None, 'mean' or a finite number, got 'median'",
    ),
    (
        lambda: pw.l2(X, center=float("inf")),
        "penwatch.l2: option 'center' must be None, 'mean' or a finite number, got inf",
    ),
    (
        lambda: pw.l2(X, strength=float("-inf")),
        "penwatch.l2: option 'strength' must be a finite real number, got -inf",
    ),
    (
        lambda: pw.elastic_net(X, l1_ratio=1.5),
        (
            r"penwatch.elastic_net: option 'l1_ratio' must be a finite real number in [0.0, 1.0]"
            r", got 1.5"
        ),
    ),
    (
        lambda: pw.elastic_net(X, l1_ratio=-0.1),
        (
            r"penwatch.elastic_net: option 'l1_ratio' must be a finite real number in [0.0, 1.0]"
            r", got -0.1"
        ),
    ),
    (
        lambda: pw.elastic_net(X, reduction=None),
        "penwatch.elastic_net: option 'reduction' must be one of 'sum', 'mean', 'none', got None",
    ),
    (
        lambda: pw.kl_divergence(LP, LP, direction="backward"),
        (
            "penwatch.kl_divergence: option 'direction' must be one of 'forward', 'reverse'"
            ", got 'backward'"
        ),
    ),
    (
        lambda: pw.kl_divergence(LP, LP, symmetric="yes"),
        "penwatch.kl_divergence: option 'symmetric' must be True or False, got 'yes'",
    ),
    (
        lambda: pw.kl_divergence(LP, LP, reduction="batchmean"),
        (
            "penwatch.kl_divergence: option 'reduction' must be one of 'sum', 'mean', 'none'"
            ", got 'batchmean'"
        ),
    ),
    (
        lambda: pw.js_divergence(LP, LP, reduction="max"),
        (
            "penwatch.js_divergence: option 'reduction' must be one of 'sum', 'mean', 'none'"
            ", got 'max'"
        ),
    ),
    (
        lambda: pw.entropy(LP, mode="maximize"),
        "penwatch.entropy: option 'mode' must be one of 'penalty', 'bonus', got 'maximize'",
    ),
    (
        lambda: pw.entropy(LP, temperature=0.0),
        "penwatch.entropy: option 'temperature' must be a finite real number > 0, got 0.0",
    ),
    (
        lambda: pw.entropy(LP, temperature=-2),
        "penwatch.entropy: option 'temperature' must be a finite real number > 0, got -2",
    ),
    (
        lambda: pw.entropy(LP, normalize=1),
        "penwatch.entropy: option 'normalize' must be True or False, got 1",
    ),
    (
        lambda: pw.orthogonality(X, mode="frobenius"),
        (
            "penwatch.orthogonality: option 'mode' must be one of 'soft', 'hard', 'spectral'"
            ", got 'frobenius'"
        ),
    ),
    (
        lambda: pw.orthogonality(X, axis="columns"),
        (
            "penwatch.orthogonality: option 'axis' must be one of 'rows', 'sequence', 'vocabulary'"
            ", got 'columns'"
        ),
    ),
    (
        lambda: pw.orthogonality(X, normalize="no"),
        "penwatch.orthogonality: option 'normalize' must be True or False, got 'no'",
    ),
    (
        lambda: pw.consistency(X, X, metric="cos"),
        (
            "penwatch.consistency: option 'metric' must be one of 'mse', 'l1', 'cosine', 'kl'"
            ", got 'cos'"
        ),
    ),
    (
        lambda: pw.consistency(X, X, reduction="avg"),
        "penwatch.consistency: option 'reduction' must be one of 'sum', 'mean', 'none', got 'avg'",
    ),
    (
        lambda: pw.gradient_penalty(_sq, X, target_norm=-1.0),
        (
            "penwatch.gradient_penalty: option 'target_norm' must be a finite real number >= 0"
            ", got -1.0"
        ),
    ),
    (
        lambda: pw.gradient_penalty(_sq, X, per_sample="yes"),
        "penwatch.gradient_penalty: option 'per_sample' must be True or False, got 'yes'",
    ),
    (
        lambda: pw.gradient_penalty("f", X),
        "penwatch.gradient_penalty: argument 'fn' must be callable, got 'f'",
    ),
    (
        lambda: pw.interpolated_gradient_penalty(_critic, X, X, key=KEY, target_norm=float("nan")),
        (
            "penwatch.interpolated_gradient_penalty:"
            " option 'target_norm' must be a finite real number >= 0, got nan"
        ),
    ),
    (
        lambda: pw.interpolated_gradient_penalty(_critic, X, X, key=0),
        (
            "penwatch.interpolated_gradient_penalty:"
            " option 'key' must be a JAX PRNG key"
            " (jax.random.key(seed) or jax.random.PRNGKey(seed)), got 0"
        ),
    ),
    (
        lambda: pw.interpolated_gradient_penalty(_critic, X, X, key=None),
        "penwatch.interpolated_gradient_penalty: option 'key' must be a JAX PRNG key .*, got None",
    ),
    (
        lambda: pw.output_magnitude_penalty(X, target=-0.5),
        (
            "penwatch.output_magnitude_penalty: option 'target' must be a finite real number >= 0"
            ", got -0.5"
        ),
    ),
    (
        lambda: pw.output_magnitude_penalty(X, reduction="none"),
        (
            "penwatch.output_magnitude_penalty: option 'reduction' must be one of 'mean', 'sum'"
            ", got 'none'"
        ),
    ),
    (
        lambda: pw.validate(X, raise_on_error="yes"),
        "penwatch.validate: option 'raise_on_error' must be True or False, got 'yes'",
    ),
]


def _literal(message: str) -> str:
    """Escape a message for ``match=``, keeping a literal ``.*`` as a wildcard."""
    return ".*".join(re.escape(part) for part in message.split(".*"))


@pytest.mark.parametrize(
    "call, message",
    BAD_OPTIONS,
    ids=[m.split(":")[0] + ":" + m.split("'")[1] for _, m in BAD_OPTIONS],
)
def test_invalid_option_raises_documented_error(call, message):
    with pytest.raises(ValueError, match=_literal(message)):
        call()


SHAPE_ERRORS = [
    (
        lambda: pw.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
        (
            "penwatch.kl_divergence: 'p_logprobs' and 'q_logprobs' must have the same shape"
            ", got p_logprobs (2, 3) and q_logprobs (2, 4)"
        ),
    ),
    (
        lambda: pw.js_divergence(jnp.zeros(3), jnp.zeros((1, 3))),
        (
            "penwatch.js_divergence: 'p_logprobs' and 'q_logprobs' must have the same shape"
            ", got p_logprobs (3,) and q_logprobs (1, 3)"
        ),
    ),
    (
        lambda: pw.consistency(jnp.zeros((2, 3)), jnp.zeros((3, 2))),
        "penwatch.consistency: 'a' and 'b' must have the same shape, got a (2, 3) and b (3, 2)",
    ),
    (
        lambda: pw.interpolated_gradient_penalty(
            _critic, jnp.zeros((2, 3)), jnp.zeros((4, 3)), key=KEY
        ),
        (
            "penwatch.interpolated_gradient_penalty: 'fake' and 'real' must have the same shape"
            ", got fake (2, 3) and real (4, 3)"
        ),
    ),
    (
        lambda: pw.entropy(jnp.float32(0.0)),
        (
            "penwatch.entropy: argument 'logprobs' must have at least 1 dimensions"
            ", got shape () (0 dimensions)"
        ),
    ),
    (
        lambda: pw.orthogonality(jnp.float32(1.0)),
        "penwatch.orthogonality: argument 'x' must have at least 1 dimensions, got shape ()",
    ),
    (
        lambda: pw.gradient_penalty(lambda v: v * 2, jnp.ones(3)),
        "penwatch.gradient_penalty: 'fn' must return a scalar, got an output of shape (3,)",
    ),
    (
        lambda: pw.interpolated_gradient_penalty(
            lambda v: v, jnp.ones((2, 3)), jnp.ones((2, 3)), key=KEY
        ),
        (
            "penwatch.interpolated_gradient_penalty:"
            " 'fn' must map a batch of 2 samples to shape (2,) or a scalar,"
            " got an output of shape (2, 3)"
        ),
    ),
]


@pytest.mark.parametrize(
    "call, message", SHAPE_ERRORS, ids=[m.split(":")[0] for _, m in SHAPE_ERRORS]
)
def test_shape_errors_name_both_shapes(call, message):
    with pytest.raises(ValueError, match=_literal(message)):
        call()


def test_traced_option_that_must_be_concrete_says_why():
    with pytest.raises(ValueError, match=r"penwatch\.l2: option 'clip' .*concrete value"):
        jax.jit(lambda c: pw.l2(X, clip=c))(1.0)


# --- the shared checker itself (penwatch._checks) ------------------------------------


def test_checks_return_normalized_values():
    assert _checks.check_choice("f", "mode", "a", ("a", "b")) == "a"
    assert _checks.check_bool("f", "flag", np.bool_(True)) is True
    assert _checks.check_finite_real("f", "x", np.float32(2.5)) == 2.5
    assert _checks.check_finite_real("f", "x", jnp.asarray(3)) == 3.0
    assert _checks.check_positive("f", "x", 1) == 1.0
    assert _checks.check_nonnegative("f", "x", 0) == 0.0
    assert _checks.check_in_range("f", "x", 1, 0, 1) == 1.0
    assert _checks.check_int("f", "n", np.int64(4), min=1) == 4
    assert _checks.check_same_shape("f", "a", np.zeros(2), "b", np.zeros(2)) == (2,)
    assert _checks.check_ndim("f", "x", np.zeros((2, 2)), min_ndim=2) == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: _checks.check_choice("f", "mode", 1, ("1", 2)),
            "f: option 'mode' must be one of '1', 2, got 1",
        ),
        (
            lambda: _checks.check_finite_real("f", "x", 3.0, max=2.0, inclusive=False),
            "f: option 'x' must be a finite real number < 2.0, got 3.0",
        ),
        (
            lambda: _checks.check_finite_real("f", "x", np.ones(2)),
            "f: option 'x' must be a finite real number, got an array of shape (2,)",
        ),
        (lambda: _checks.check_int("f", "n", 2.0), "f: option 'n' must be an integer, got 2.0"),
        (
            lambda: _checks.check_int("f", "n", True, min=0),
            "f: option 'n' must be an integer >= 0, got True",
        ),
        (
            lambda: _checks.check_int("f", "n", 0, min=1, max=3),
            "f: option 'n' must be an integer in [1, 3], got 0",
        ),
        (
            lambda: _checks.check_positive("f", "decay", -1, label="argument"),
            "f: argument 'decay' must be a finite real number > 0, got -1",
        ),
        (
            lambda: _checks.check_ndim("f", "x", np.zeros(2), allowed=(2, 3)),
            "f: argument 'x' must have 2 or 3 dimensions, got shape (2,) (1 dimensions)",
        ),
        (
            lambda: _checks.check_finite_real("f", "x", np.float64(np.nan)),
            "f: option 'x' must be a finite real number, got nan",
        ),
    ],
)
def test_checks_messages(call, message):
    with pytest.raises(ValueError, match=_literal(message)):
        call()


@pytest.mark.parametrize(
    "module", ["_norms", "_divergences", "_constraints", "_gradient", "_validation"]
)
def test_docstring_examples(module):
    mod = importlib.import_module(f"penwatch.penalties.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
