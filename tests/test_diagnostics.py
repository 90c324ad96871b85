"""Gradient diagnostics (SPEC section 4) against independent float64 NumPy references.

The reference computes each term's gradient with its own ``jax.grad`` (parameter-only
terms from their textbook formulas through autodiff), ravels them into NumPy float64
vectors and derives norms, shares and cosines with NumPy — nothing shared with the
one-pass implementation under test.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw
from penwatch import diagnostics as D
from penwatch.diagnostics import _dominance
from penwatch.penalties import elastic_net, l1, l2
from penwatch.schema import gram_key, group_key

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=["vmap", "loop"])
def backward(request, monkeypatch):
    """Both ways of running the per-term backward passes (batched, or in turn)."""
    monkeypatch.setattr(_dominance, "_BACKWARD", request.param)
    return request.param


# --- a small MLP with two output-dependent penalties -----------------------------------

TRACES = {"apply": 0}


def apply_fn(params, x):
    TRACES["apply"] += 1
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _make(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 8))),
        "b1": jnp.asarray(rng.normal(size=(8,)) * 0.1),
        "w2": jnp.asarray(rng.normal(size=(8, 3))),
        "b2": jnp.zeros((3,)),  # exact zeros: sign(0) = 0 in closed forms
    }
    x = jnp.asarray(rng.normal(size=(16, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=(16,)))
    return params, x, y


def base_loss(params, x, y):
    logp = jax.nn.log_softmax(apply_fn(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def entropy_term(params, x, w):
    logp = jax.nn.log_softmax(apply_fn(params, x))
    return w * jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))  # -H: entropy bonus


def magnitude_term(params, x, w):
    return w * jnp.mean(apply_fn(params, x) ** 2)


def make_terms_fn(x, y, w_ent, w_mag):
    def terms_fn(params):
        out = apply_fn(params, x)
        logp = jax.nn.log_softmax(out)
        base = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        ent = w_ent * jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))
        return base, {"entropy": ent, "magnitude": w_mag * jnp.mean(out**2)}

    return terms_fn


def matrices_only(params):
    return {k: v.ndim > 1 for k, v in params.items()}


def param_terms(l1_w=0.01, l2_w=0.02, en_w=0.03):
    return {
        "l1": D.l1_term(l1_w, mask=matrices_only),
        "l2": D.l2_term(l2_w),
        "en": D.elastic_net_term(
            en_w, 0.25, mask={"w1": False, "b1": True, "w2": True, "b2": True}
        ),
    }


PT_W = (0.01, 0.02, 0.03)  # the default param_terms() weights
EN_MASK = {"w1": False, "b1": True, "w2": True, "b2": True}


# penwatch.penalties use the subgradient sign(0) = 0 (jnp.abs's derivative at 0 is 1)
def _l1_ref(p):
    return sum(l1(v, strength=PT_W[0]) for v in p.values() if v.ndim > 1)


def _l2_ref(p):
    return sum(jnp.sum(v**2) for v in p.values()) * PT_W[1]


def _en_ref(p):
    return PT_W[2] * sum(0.25 * l1(v) + 0.75 * jnp.sum(v**2) for k, v in p.items() if EN_MASK[k])


@jax.jit
def _reference_grads(params, x, y, w_ent, w_mag):
    fns = {
        "base": lambda p: base_loss(p, x, y),
        "entropy": lambda p: entropy_term(p, x, w_ent),
        "magnitude": lambda p: magnitude_term(p, x, w_mag),
        "l1": _l1_ref,
        "l2": _l2_ref,
        "en": _en_ref,
    }
    return {n: jax.flatten_util.ravel_pytree(jax.grad(f)(params))[0] for n, f in fns.items()}


def reference_grads(params, x, y, w_ent, w_mag):
    """Each term's gradient by its own jax.grad, raveled to float64 NumPy."""
    grads = _reference_grads(params, x, y, w_ent, w_mag)
    return {
        name: np.asarray(grads[name]) for name in ("base", "entropy", "magnitude", "l1", "l2", "en")
    }


def numpy_metrics(grads):
    names = ["base", *sorted(n for n in grads if n != "base")]  # the documented order
    G = np.stack([grads[n] for n in names])
    g = G.sum(0)
    norms = np.linalg.norm(G, axis=1)
    shares = G @ g / (g @ g)
    pair = (G @ G.T) / np.outer(norms, norms)
    return names, norms, shares, pair


DIAG = jax.jit(D.value_and_grad_with_diagnostics, static_argnums=0, static_argnames=("pairwise",))


def test_metrics_match_numpy_reference(backward):
    params, x, y = _make()
    terms_fn = make_terms_fn(x, y, 0.1, 0.05)
    weights = {"entropy": 0.1, "magnitude": 0.05}
    res = DIAG(terms_fn, params, param_terms=param_terms(), pairwise=True, weights=weights)
    grads = reference_grads(params, x, y, 0.1, 0.05)
    names, norms, shares, pair = numpy_metrics(grads)
    assert D.term_names(terms_fn, params, param_terms=param_terms()) == tuple(names)
    m = res.metrics
    gram = {gram_key(a, b) for i, a in enumerate(names) for b in names[i:]}
    groups = {group_key(n, leaf) for n in names for leaf in ("b1", "b2", "w1", "w2")}
    assert (
        set(m)
        == {f"{n}_{q}" for n in names for q in ("param_grad_norm", "grad_share", "grad_cosine")}
        | {"pairwise_cosine"}
        | gram
        | groups
    )
    # SPEC §12: the Gram matrix of the *unweighted* gradients, in float64
    w = {"base": 1.0, **weights, "l1": PT_W[0], "l2": PT_W[1], "en": PT_W[2]}
    for i, a in enumerate(names):
        for b in names[i:]:
            ref = grads[a] @ grads[b] / (w[a] * w[b])
            np.testing.assert_allclose(m[gram_key(a, b)], ref, rtol=1e-9, atol=1e-12)
    # per-group norms: the raveled gradient split at the leaves (sorted keys b1 b2 w1 w2)
    sizes = np.cumsum([v.size for _, v in sorted(params.items())])[:-1]
    for n in names:
        parts = np.split(grads[n], sizes)
        for leaf, part in zip(("b1", "b2", "w1", "w2"), parts, strict=True):
            np.testing.assert_allclose(
                m[group_key(n, leaf)], np.linalg.norm(part), rtol=1e-9, atol=1e-14
            )
    for i, n in enumerate(names):
        assert m[f"{n}_param_grad_norm"].dtype == jnp.float64
        np.testing.assert_allclose(m[f"{n}_param_grad_norm"], norms[i], rtol=1e-10)
        np.testing.assert_allclose(m[f"{n}_grad_share"], shares[i], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(m[f"{n}_grad_cosine"], pair[i, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m["pairwise_cosine"], pair, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sum(float(m[f"{n}_grad_share"]) for n in names), 1.0, rtol=1e-12)
    assert float(m["base_grad_cosine"]) == 1.0


def test_total_value_and_grad_match_autodiff(backward):
    params, x, y = _make(1)
    terms_fn = make_terms_fn(x, y, 0.1, 0.05)
    pt = param_terms()

    def total(p):
        base, terms = terms_fn(p)
        return base + sum(terms.values()) + sum(t.value(p) for t in pt.values())

    res = DIAG(terms_fn, params, param_terms=pt)
    loss, grads = jax.jit(jax.value_and_grad(total))(params)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-12)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), res.grads, grads
    )
    assert list(res.values) == ["base", "en", "entropy", "l1", "l2", "magnitude"]
    np.testing.assert_allclose(res.values["base"], base_loss(params, x, y), rtol=1e-12)
    # every term's value equals penwatch.penalties with reduction="sum"
    np.testing.assert_allclose(
        res.values["l1"],
        l1(params["w1"], strength=0.01) + l1(params["w2"], strength=0.01),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        res.values["l2"], sum(l2(v, strength=0.02) for v in params.values()), rtol=1e-12
    )
    en = sum(elastic_net(params[k], strength=0.03, l1_ratio=0.25) for k in ("b1", "w2", "b2"))
    np.testing.assert_allclose(res.values["en"], en, rtol=1e-12)


def test_dominating_penalty_has_share_near_one():
    params, x, y = _make(2)
    terms_fn = make_terms_fn(x, y, 0.1, 0.05)
    m = DIAG(terms_fn, params, param_terms={"l2": D.l2_term(1e3)}).metrics
    assert float(m["l2_grad_share"]) > 0.99
    assert float(m["base_grad_share"]) < 0.01
    assert float(m["l2_param_grad_norm"]) > 100 * float(m["base_param_grad_norm"])


def test_conflicting_penalty_has_negative_cosine_and_share():
    params, x, y = _make(3)

    def terms_fn(p):
        base = base_loss(p, x, y)
        return base, {"anti": -0.5 * base, "mag": magnitude_term(p, x, 0.01)}

    m = DIAG(terms_fn, params).metrics
    np.testing.assert_allclose(m["anti_grad_cosine"], -1.0, rtol=1e-12)
    assert float(m["anti_grad_share"]) < 0
    shares = sum(float(m[f"{n}_grad_share"]) for n in ("base", "anti", "mag"))
    np.testing.assert_allclose(shares, 1.0, rtol=1e-12)
    # without "mag": g = 0.5 g0, so shares are exactly 2 and -1
    m = DIAG(lambda p: (base_loss(p, x, y), {"anti": -0.5 * base_loss(p, x, y)}), params).metrics
    np.testing.assert_allclose(m["base_grad_share"], 2.0, rtol=1e-12)
    np.testing.assert_allclose(m["anti_grad_share"], -1.0, rtol=1e-12)


def _count_prims(jaxpr, name):
    """Occurrences of a primitive in a jaxpr, nested jaxprs (pjit, custom_jvp) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                count += _count_prims(inner, name)
    return count


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_one_pass_forward_traced_once_and_no_extra_backward(mode, monkeypatch):
    monkeypatch.setattr(_dominance, "_BACKWARD", mode)
    params, x, y = _make(4)

    def dots_and_traces(terms_fn, pt=None):
        TRACES["apply"] = 0
        jaxpr = jax.make_jaxpr(lambda p: D.gradient_diagnostics(terms_fn, p, param_terms=pt))(
            params
        )
        return _count_prims(jaxpr.jaxpr, "dot_general"), TRACES["apply"]

    dots_1, traces_1 = dots_and_traces(lambda q: (base_loss(q, x, y), {}))
    dots_3, traces_3 = dots_and_traces(make_terms_fn(x, y, 0.1, 0.05))
    dots_5, traces_5 = dots_and_traces(make_terms_fn(x, y, 0.1, 0.05), param_terms())
    assert traces_1 == traces_3 == traces_5 == 1  # one forward for all model terms
    assert dots_5 == dots_3  # closed-form terms need no backward pass at all
    if mode == "vmap":  # the backward pass is vectorized over the model terms
        assert dots_1 == dots_3, (dots_1, dots_3)
    else:  # one backward pass per model term, sharing the forward's residuals
        assert dots_3 > dots_1


def test_jit_changing_weights_does_not_retrace():
    params, x, y = _make(5)
    traces = []

    @jax.jit
    def step(params, w_ent, pt):
        traces.append(1)
        return D.gradient_diagnostics(make_terms_fn(x, y, w_ent, 0.05), params, param_terms=pt)

    outs = [step(params, jnp.asarray(w), param_terms(l2_w=w)) for w in (0.1, 0.5, 2.0, 7.0)]
    assert len(traces) == 1
    # the weights really are used: a bigger L2 weight takes a bigger share
    shares = [float(o["l2_grad_share"]) for o in outs]
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_zero_gradients_are_finite():
    zeros = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    m = DIAG(
        lambda p: (jnp.sum(p["b"]) * 0.0, {"c": jnp.asarray(3.0)}),
        zeros,
        param_terms={"l1": D.l1_term(1.0), "l2": D.l2_term(1.0)},
        pairwise=True,
    ).metrics
    for k, v in m.items():
        assert np.all(np.isfinite(v)), k
        np.testing.assert_array_equal(v, 0.0, err_msg=k)
    # a zero base gradient: cosines 0, the penalty takes the whole share
    m = DIAG(
        lambda p: (jnp.asarray(1.0), {"pen": jnp.sum(p["w"] ** 2)}), {"w": jnp.ones(3)}
    ).metrics
    assert float(m["pen_grad_cosine"]) == 0.0 and float(m["base_grad_cosine"]) == 0.0
    np.testing.assert_allclose(m["pen_grad_share"], 1.0)
    assert float(m["base_grad_share"]) == 0.0


def test_has_aux_and_integer_leaves():
    params = {"w": jnp.array([1.0, 2.0]), "step": jnp.asarray(3)}

    def terms_fn(p):
        out = p["w"] * 2.0
        return (jnp.sum(out), {"sq": jnp.sum(out**2)}), {"out": out}

    res = D.value_and_grad_with_diagnostics(terms_fn, params, has_aux=True)
    np.testing.assert_allclose(res.aux["out"], [2.0, 4.0])
    np.testing.assert_allclose(res.grads["w"], [2.0 + 8.0, 2.0 + 16.0])
    assert res.grads["step"].dtype == jax.dtypes.float0
    np.testing.assert_allclose(res.metrics["base_param_grad_norm"], np.sqrt(8.0))


def test_vmap_over_parameter_sets():
    params, x, y = _make(6)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    terms_fn = make_terms_fn(x, y, 0.1, 0.05)
    batched = jax.jit(
        jax.vmap(lambda p: D.gradient_diagnostics(terms_fn, p, param_terms=param_terms()))
    )(stacked)
    for i in range(2):  # against the NumPy reference of each parameter set
        p_i = jax.tree.map(lambda a, i=i: a[i], stacked)
        names, norms, shares, _ = numpy_metrics(reference_grads(p_i, x, y, 0.1, 0.05))
        for j, n in enumerate(names):
            np.testing.assert_allclose(batched[f"{n}_param_grad_norm"][i], norms[j], rtol=1e-10)
            np.testing.assert_allclose(batched[f"{n}_grad_share"][i], shares[j], rtol=1e-9)


def test_float32_params_give_float32_metrics():
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.float32)}
    m = DIAG(
        lambda p: (jnp.sum(p["w"] ** 3), {}), params, param_terms={"l2": D.l2_term(0.1)}
    ).metrics
    assert m["l2_grad_share"].dtype == jnp.float32


def test_top_level_reexports():
    assert pw.gradient_diagnostics is D.gradient_diagnostics
    assert pw.diagnostics is D


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: D.l1_term(float("nan")), "l1_term.*weight"),
        (lambda: D.l2_term("big"), "l2_term.*weight"),
        (lambda: D.elastic_net_term(1.0, 1.5), "elastic_net_term.*l1_ratio.*\\[0"),
        (
            lambda: D.gradient_diagnostics(lambda p: (p, {}), jnp.ones(2)),
            "base loss must be a scalar",
        ),
        (
            lambda: D.gradient_diagnostics(lambda p: (p.sum(), {"v": p}), jnp.ones(2)),
            "'v' must be a scalar",
        ),
        (lambda: D.gradient_diagnostics(lambda p: (p.sum(), [p.sum()]), jnp.ones(2)), "mapping"),
        (
            lambda: D.gradient_diagnostics(lambda p: (p.sum(), {"base": p.sum()}), jnp.ones(2)),
            "base",
        ),
        (
            lambda: D.gradient_diagnostics(
                lambda p: (p.sum(), {"l1": p.sum()}),
                jnp.ones(2),
                param_terms={"l1": D.l1_term(1.0)},
            ),
            "unique",
        ),
        (
            lambda: D.gradient_diagnostics(
                lambda p: (p.sum(), {}), jnp.ones(2), param_terms={"l1": 0.1}
            ),
            "ParamTerm",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- pipeline_diagnostics: a model's outputs feeding a penwatch pipeline ----------------


def apply_logp(params, x):
    return jax.nn.log_softmax(apply_fn(params, x))


def nll(logp, y):
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]  # per-example: averaged


def argmax_penalty(logp):
    return jnp.mean(jnp.argmax(logp, axis=-1).astype(logp.dtype))


def _pipe():
    return (
        pw.pipeline([("entropy", 0.125, {"mode": "bonus"}), ("l2", 0.015625)])
        .add("argmax", argmax_penalty, weight=0.5, differentiable=False)
        .add("off", pw.l1, weight=3.0, enabled=False)
    )


def test_pipeline_diagnostics_match_hand_built_terms():
    params, x, y = _make(7)
    pipe = _pipe()
    pt = {"decay": D.l2_term(0.02, mask=matrices_only)}
    got = D.pipeline_diagnostics(
        apply_logp, nll, pipe, params, (x, y), param_terms=pt, pairwise=True
    )

    def terms_fn(p):
        logp = apply_logp(p, x)
        terms = {
            "entropy": 0.125 * pw.entropy(logp, mode="bonus"),  # weights exact in float32
            "l2": 0.015625 * pw.l2(logp),
            "argmax": 0.5 * argmax_penalty(jax.lax.stop_gradient(logp)),
        }
        return jnp.mean(nll(logp, y)), terms

    want = DIAG(terms_fn, params, param_terms=pt, pairwise=True).metrics
    assert set(got) == set(want)
    assert "off_grad_share" not in got  # a disabled penalty is not a term
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-14, err_msg=k)
    # a non-differentiable penalty moves nothing: zero norm, share and cosine
    assert float(got["argmax_param_grad_norm"]) == 0.0 == float(got["argmax_grad_share"])
    names = D.term_names(terms_fn, params, param_terms=pt)
    assert names == ("base", "argmax", "decay", "entropy", "l2")


def test_pipeline_diagnostics_compiles_once_across_weights():
    params, x, y = _make(8)
    TRACES["apply"] = 0
    shares = []
    for w in (0.01, 1.0, 100.0):
        pipe = _pipe().update_weight("l2", w)
        batch = {"x": x, "y": y}
        m = D.pipeline_diagnostics(
            apply_logp, nll, pipe, params, batch, param_terms={"d": D.l1_term(w)}
        )
        shares.append(float(m["l2_grad_share"]))
    assert TRACES["apply"] == 1
    assert shares[0] < shares[1] < shares[2]


def test_pipeline_terms_fn_with_aux_gives_pipeline_metrics():
    params, x, y = _make(9)
    pipe = _pipe()
    res = jax.jit(
        lambda p, pp: D.value_and_grad_with_diagnostics(
            D.pipeline_terms_fn(apply_logp, nll, pp, (x, y)), p, has_aux=True
        )
    )(params, pipe)
    _, metrics = pipe.compute(apply_logp(params, x))
    np.testing.assert_allclose(res.aux["total"], metrics["total"], rtol=1e-10)
    np.testing.assert_allclose(
        res.loss, jnp.mean(nll(apply_logp(params, x), y)) + metrics["total"], rtol=1e-10
    )
    with pytest.raises(ValueError, match=r"pipeline_terms_fn.*batch"):
        D.pipeline_terms_fn(apply_logp, nll, pipe, (x, y, y))
    with pytest.raises(ValueError, match=r"pipeline_terms_fn.*pipeline"):
        D.pipeline_terms_fn(apply_logp, nll, {"l1": 1.0}, (x, y))
