"""MultiPipeline: named inputs, built-ins, errors, gradient norms over all named inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)


@pytest.fixture(scope="module")
def inputs() -> dict[str, jax.Array]:
    k = jax.random.split(jax.random.key(7), 4)
    return {
        "student": jax.nn.log_softmax(jax.random.normal(k[0], (4, 5))),
        "teacher": jax.nn.log_softmax(jax.random.normal(k[1], (4, 5))),
        "clean": jax.random.normal(k[2], (4, 3)),
        "noisy": jax.random.normal(k[3], (4, 3)),
    }


@pytest.fixture(scope="module")
def multi() -> pw.MultiPipeline:
    return pw.multi_pipeline(
        [
            ("kl", 0.1, ("student", "teacher"), {"direction": "reverse"}),
            ("js", 0.3, ("student", "teacher")),
            ("consistency", 0.2, ("clean", "noisy"), {"metric": "l1"}),
            ("l2", 0.05, ("clean",)),
        ],
        name="distill",
    )


def kl_rows(p_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    return (np.exp(p_lp) * (p_lp - q_lp)).sum(-1)


def test_values_match_float64_references(multi, inputs):
    total, metrics = multi.compute({**inputs, "unused": "not an array"})
    s, t = (np.asarray(inputs[k], np.float64) for k in ("student", "teacher"))
    c, n = (np.asarray(inputs[k], np.float64) for k in ("clean", "noisy"))
    m = np.log((np.exp(s) + np.exp(t)) / 2)
    ref = {
        "kl": kl_rows(t, s).mean(),  # reverse: KL(Q || P)
        "js": ((kl_rows(s, m) + kl_rows(t, m)) / 2).mean(),
        "consistency": np.abs(c - n).mean(),
        "l2": (c**2).sum(),
    }
    weights = {"kl": 0.1, "js": 0.3, "consistency": 0.2, "l2": 0.05}
    for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5)
        np.testing.assert_allclose(metrics[f"{name}_weighted"], weights[name] * value, rtol=1e-5)
        assert bool(metrics[f"{name}_finite"])
    np.testing.assert_allclose(total, sum(weights[k] * v for k, v in ref.items()), rtol=1e-5)
    np.testing.assert_allclose(multi.compute_total(inputs), total, rtol=1e-6)
    assert multi.name == "distill"
    assert multi.required_inputs == ("clean", "noisy", "student", "teacher")


def test_grad_norms_are_over_all_named_inputs_together(multi, inputs):
    _, metrics = multi.compute(inputs, track_grad_norms=True)

    @jax.jit
    def reference(inputs):
        out = {}
        for e in multi.entries:

            def f(*xs, e=e):
                return e.fn(*xs, **e.options)

            grads = jax.grad(f, argnums=tuple(range(len(e.inputs))))(*(inputs[k] for k in e.inputs))
            out[e.name] = jnp.sqrt(sum(jnp.sum(g**2) for g in grads))
        g_total = jax.grad(multi.compute_total)(inputs)
        out["total"] = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(g_total)))
        return out

    ref = reference(inputs)
    for name in multi.names:
        np.testing.assert_allclose(metrics[f"{name}_grad_norm"], ref[name], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["total_grad_norm"], ref["total"], rtol=1e-4)


def test_missing_input_raises_key_error_naming_penalty_and_key(multi, inputs):
    partial = {k: v for k, v in inputs.items() if k != "teacher"}
    with pytest.raises(KeyError, match=r"penalty 'kl' needs input 'teacher'"):
        multi.compute(partial)
    with pytest.raises(KeyError, match=r"'teacher'"):
        multi.compute_total(partial)
    # Disabled penalties need no inputs.
    only_clean = multi.set_enabled("kl", False).set_enabled("js", False)
    total, _ = only_clean.compute(partial)
    assert np.isfinite(float(total))


def test_multi_pipeline_errors():
    with pytest.raises(ValueError, match="unknown penalty 'nope'; valid names are consistency"):
        pw.multi_pipeline([("nope", 1.0, ("a", "b"))])
    with pytest.raises(ValueError, match="needs its inputs"):
        pw.multi_pipeline([("kl", 1.0)])
    with pytest.raises(ValueError, match="takes 2 input"):
        pw.multi_pipeline([("kl", 1.0, ("a",))])
    with pytest.raises(ValueError, match="duplicate"):
        pw.multi_pipeline([("kl", 1.0, ("a", "b")), ("kl", 2.0, ("c", "d"))])
    with pytest.raises(ValueError, match="direction"):
        pw.multi_pipeline([("kl", 1.0, ("a", "b"), {"direction": "sideways"})])
    with pytest.raises(ValueError, match="weight for penalty 'js'"):
        pw.multi_pipeline([("js", float("nan"), ("a", "b"))])
    with pytest.raises(ValueError, match="inputs"):
        pw.MultiPipeline().add("kl", pw.kl_divergence, inputs="student")
    with pytest.raises(ValueError, match="inputs"):
        pw.MultiPipeline().add("kl", pw.kl_divergence, inputs=("a", 3))
    with pytest.raises(TypeError):
        pw.MultiPipeline().add("kl", pw.kl_divergence)  # inputs is required
    with pytest.raises(ValueError, match="mapping"):
        pw.multi_pipeline([("kl", 1.0, ("a", "b"))]).compute(jnp.ones(3))
    with pytest.raises(KeyError, match="no penalty named"):
        pw.MultiPipeline().remove("kl")


def test_builder_api_immutability_and_no_recompile(inputs):
    base = pw.MultiPipeline(name="m").add(
        "cos", pw.consistency, inputs=("clean", "noisy"), weight=0.5, metric="cosine"
    )
    assert dict(base.entries[0].options) == {"metric": "cosine"}
    traces = 0

    @jax.jit
    def step(p, xs):
        nonlocal traces
        traces += 1
        return p.compute(xs)[0]

    p = base
    for i in range(200):
        p = p.update_weight("cos", 0.01 * i)
        step(p, inputs)
    assert traces == 1 and float(base.weights["cos"]) == 0.5
    assert isinstance(jax.tree.map(lambda w: w, base), pw.MultiPipeline)


def test_grad_of_compute_total_wrt_the_inputs_dict(inputs):
    p = pw.multi_pipeline([("consistency", 2.0, ("clean", "noisy"))])  # mse, mean
    grads = jax.grad(p.compute_total)({"clean": inputs["clean"], "noisy": inputs["noisy"]})
    diff = inputs["clean"] - inputs["noisy"]
    np.testing.assert_allclose(grads["clean"], 2.0 * 2 * diff / diff.size, rtol=1e-5)
    np.testing.assert_allclose(grads["noisy"], -2.0 * 2 * diff / diff.size, rtol=1e-5)
