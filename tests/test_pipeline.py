"""Pipeline: metric keys and values, totals, immutability, recompiles, errors (SPEC §3)."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

WEIGHTS = {
    "l1": 1e-3,
    "l2": 1e-2,
    "elastic_net": 0.1,
    "entropy": 0.1,
    "orthogonality": 0.05,
    "output_magnitude": 0.2,
}


@pytest.fixture(scope="module")
def logprobs() -> jax.Array:
    return jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (6, 4)) * 2.0)


@pytest.fixture(scope="module")
def pipe() -> pw.Pipeline:
    return pw.pipeline(
        [
            ("l1", WEIGHTS["l1"]),
            ("l2", WEIGHTS["l2"], {"clip": 1.5}),
            ("elastic_net", WEIGHTS["elastic_net"], {"l1_ratio": 0.3}),
            ("entropy", WEIGHTS["entropy"], {"mode": "bonus"}),
            ("orthogonality", WEIGHTS["orthogonality"]),
            ("output_magnitude", WEIGHTS["output_magnitude"], {"target": 0.5}),
        ],
        name="reg",
    )


def reference_values(x: jax.Array) -> dict[str, float]:
    """Independent float64 NumPy references (SPEC §2 formulas)."""
    x = np.asarray(x, np.float64)
    p = np.exp(x)
    m = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    gram = m @ m.T
    return {
        "l1": np.abs(x).sum(),
        "l2": (np.clip(x, -1.5, 1.5) ** 2).sum(),
        "elastic_net": 0.3 * np.abs(x).sum() + 0.7 * (x**2).sum(),
        "entropy": -np.mean(-(p * x).sum(axis=-1)),  # bonus: -H
        "orthogonality": (gram**2).sum() - (np.diag(gram) ** 2).sum(),
        "output_magnitude": (np.sqrt(np.mean(x**2)) - 0.5) ** 2,
    }


def test_metric_keys_and_values_match_manual_computation(pipe, logprobs):
    total, metrics = pipe.compute(logprobs)
    ref = reference_values(logprobs)
    expected_keys = {"total"} | {
        f"{n}{s}" for n in WEIGHTS for s in ("", "_weighted", "_weight", "_finite")
    }
    assert set(metrics) == expected_keys
    for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(metrics[f"{name}_weight"], WEIGHTS[name], rtol=1e-7)
        np.testing.assert_allclose(
            metrics[f"{name}_weighted"], WEIGHTS[name] * value, rtol=2e-5, atol=1e-7
        )
        assert metrics[f"{name}_finite"].dtype == jnp.bool_ and bool(metrics[f"{name}_finite"])
    weighted_sum = sum(WEIGHTS[n] * v for n, v in ref.items())
    np.testing.assert_allclose(total, weighted_sum, rtol=2e-5)
    np.testing.assert_allclose(metrics["total"], total, rtol=1e-7)
    assert all(isinstance(v, jax.Array) for v in metrics.values())


def test_compute_total_jit_grad_and_vmap(pipe, logprobs):
    total, _ = pipe.compute(logprobs)
    np.testing.assert_allclose(pipe.compute_total(logprobs), total, rtol=1e-6)
    jitted_total, jitted_metrics = jax.jit(lambda p, x: p.compute(x))(pipe, logprobs)
    np.testing.assert_allclose(jitted_total, total, rtol=1e-6)
    assert set(jitted_metrics) == set(pipe.compute(logprobs)[1])
    # grad of the total = weighted sum of each penalty's own gradient.
    grad = jax.grad(pipe.compute_total)(logprobs)
    expected = jax.jit(
        lambda x: sum(
            e.weight * jax.grad(lambda x, e=e: e.fn(x, **e.options))(x) for e in pipe.entries
        )
    )(logprobs)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    batch = jnp.stack([logprobs, 0.5 * logprobs, 2.0 * logprobs])
    per_sample = jax.vmap(pipe.compute_total)(batch)
    np.testing.assert_allclose(
        per_sample, [pipe.compute_total(b) for b in batch], rtol=1e-5, atol=1e-6
    )


def test_every_mutator_leaves_the_original_unchanged(pipe):
    before = (pipe.names, {k: float(v) for k, v in pipe.weights.items()}, pipe.enabled_names)
    results = [
        pipe.update_weight("l1", 0.5),
        pipe.update_weights({"l1": 0.5, "l2": 0.25}),
        pipe.set_enabled("entropy", False),
        pipe.remove("l2"),
        pipe.add("extra", pw.l1, weight=2.0),
    ]
    after = (pipe.names, {k: float(v) for k, v in pipe.weights.items()}, pipe.enabled_names)
    assert before == after
    assert float(results[0].weights["l1"]) == pytest.approx(0.5)
    assert float(results[1].weights["l2"]) == pytest.approx(0.25)
    assert "entropy" not in results[2].enabled_names and "entropy" in results[2].names
    assert "l2" not in results[3]
    assert results[4].names[-1] == "extra"
    with pytest.raises(AttributeError):
        pipe._weights = ()  # type: ignore[misc]
    clone = copy.deepcopy(pipe)
    assert isinstance(clone, pw.Pipeline) and clone.names == pipe.names
    assert jax.tree.structure(clone) == jax.tree.structure(pipe)


def test_no_recompile_over_1000_weight_updates(pipe, logprobs):
    traces = 0

    @jax.jit
    def step(p, x):
        nonlocal traces
        traces += 1
        return p.compute(x)[0]

    p = pipe
    for i in range(1000):
        p = p.update_weight("l1", 1e-3 * (i % 7 + 1)).update_weight("entropy", np.float32(i))
        step(p, logprobs)
    assert traces == 1
    np.testing.assert_allclose(step(p, logprobs), p.compute_total(logprobs), rtol=1e-5)
    # Structure changes recompile (documented), once per distinct structure.
    step(p.set_enabled("l2", False), logprobs)
    step(p.set_enabled("l2", False).update_weight("l1", 3.0), logprobs)
    assert traces == 2


def test_eager_compute_is_compiled_once_per_structure(logprobs):
    calls = 0

    def counted(x):
        nonlocal calls
        calls += 1
        return jnp.sum(x**2)

    p = pw.Pipeline().add("sq", counted).add("l1", pw.l1, weight=0.1)
    for i in range(20):
        p = p.update_weight("sq", float(i))
        p.compute(logprobs)
        p.compute(logprobs, track_grad_norms=True)
    # one trace for compute, one for the tracked compute (its single forward)
    assert calls == 2


def test_weights_are_leaves_with_stable_dtypes():
    p = pw.Pipeline().add("a", pw.l1, weight=1).add("b", pw.l2, weight=jnp.asarray(2, jnp.bfloat16))
    leaves = jax.tree.leaves(p)
    assert [leaf.dtype for leaf in leaves] == [jnp.float32, jnp.bfloat16]
    q = p.update_weight("b", 0.5)
    assert q.weights["b"].dtype == jnp.bfloat16  # Python numbers keep the leaf's dtype
    assert jax.tree.structure(q) == jax.tree.structure(p)
    doubled = jax.tree.map(lambda w: w * 2, p)
    assert isinstance(doubled, pw.Pipeline) and float(doubled.weights["a"]) == 2.0


def test_differentiable_false_penalty_is_forward_only(logprobs):
    def argmax_rate(x):
        return jnp.mean((jnp.argmax(x, axis=-1) == 0).astype(x.dtype))

    p = pw.pipeline([("l2", 0.1)]).add("am", argmax_rate, weight=0.5, differentiable=False)
    total, metrics = p.compute(logprobs, track_grad_norms=True)
    assert "am_grad_norm" not in metrics and "l2_grad_norm" in metrics
    np.testing.assert_allclose(metrics["am"], argmax_rate(logprobs))
    np.testing.assert_allclose(total, 0.1 * metrics["l2"] + 0.5 * metrics["am"], rtol=1e-6)
    grad = jax.grad(p.compute_total)(logprobs)  # no gradient through the argmax term
    np.testing.assert_allclose(grad, 0.1 * 2 * logprobs, rtol=1e-5)
    np.testing.assert_allclose(metrics["total_grad_norm"], jnp.linalg.norm(grad), rtol=1e-5)


@pytest.mark.parametrize("track", [False, True])
def test_empty_and_all_disabled_pipelines_return_zero(logprobs, track):
    for p in (
        pw.Pipeline(),
        pw.pipeline(["l1", "l2"]).set_enabled("l1", False).set_enabled("l2", False),
    ):
        total, metrics = p.compute(logprobs, track_grad_norms=track)
        assert float(total) == 0.0 and list(metrics) == ["total"] and float(metrics["total"]) == 0
        assert float(p.compute_total(logprobs)) == 0.0


def test_disabled_penalty_is_not_computed(logprobs):
    def boom(x):
        raise AssertionError("a disabled penalty must not be called")

    p = pw.Pipeline().add("l1", pw.l1).add("boom", boom, enabled=False)
    _total, metrics = p.compute(logprobs)
    assert set(metrics) == {"l1", "l1_weighted", "l1_weight", "l1_finite", "total"}
    assert "boom" in p.names and p.enabled_names == ("l1",)


def test_finite_flag_reports_non_finite_values():
    p = pw.Pipeline().add("log", lambda x: jnp.sum(jnp.log(x)))
    _, metrics = p.compute(jnp.array([1.0, -1.0]))
    assert not bool(metrics["log_finite"]) and np.isnan(metrics["log"])


def test_views_and_defaults(pipe):
    assert pipe.name == "reg" and pw.Pipeline().name == "default"
    assert (
        pipe.names == tuple(WEIGHTS)
        and len(pipe) == 6
        and "l1" in pipe
        and list(pipe) == list(WEIGHTS)
    )
    entry = pipe.entries[1]
    assert (entry.name, entry.fn, dict(entry.options)) == ("l2", pw.l2, {"clip": 1.5})
    assert entry.enabled and entry.differentiable and entry.inputs is None
    assert float(pw.pipeline(["l1"]).weights["l1"]) == 1.0  # default weight
    assert pw.Pipeline().add("l1").entries[0].fn is pw.l1  # built-in fn may be omitted
    assert "l2(weight=0.01" in repr(pipe)
    disabled = pw.Pipeline().add("x", pw.l1, enabled=False)
    assert disabled.enabled_names == () and "disabled" in repr(disabled)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([("nope", 1.0)], "valid names are elastic_net, entropy, l1, l2, orthogonality"),
        ([("kl", 0.1)], "multi_pipeline"),
        ([("js", 0.1)], "multi_pipeline"),
        (["consistency"], "multi_pipeline"),
        (["l1", ("l1", 2.0)], "duplicate penalty name 'l1'"),
        ([("l2", 0.1, {"clip": -1.0})], "clip"),
        ([("entropy", 0.1, {"mode": "bogus"})], "mode"),
        ([("l1", 0.1, {"bogus": 1})], "bogus"),
        ([("l1", 0.1, {"strength": [1.0]})], "hashable"),
        ([("l1", 0.1, {"strength": jnp.ones(())})], "scalar"),
        ([("l1", 0.1, {}, "extra")], "each entry must be"),
        ([("l1", 0.1, ["clip"])], "options of entry 'l1'"),
        ("l1", "list of entries"),
    ],
)
def test_pipeline_builder_errors(entries, match):
    with pytest.raises(ValueError, match=match):
        pw.pipeline(entries)


@pytest.mark.parametrize(
    "weight",
    [float("nan"), float("inf"), -np.inf, "0.1", None, True, [1.0], jnp.ones(2), np.ones((1,))],
)
def test_bad_weights_are_rejected_with_clear_errors(weight):
    with pytest.raises(ValueError, match=r"weight for penalty 'l1' must be"):
        pw.Pipeline().add("l1", pw.l1, weight=weight)
    with pytest.raises(ValueError, match=r"update_weight: weight for penalty 'l1'"):
        pw.pipeline(["l1"]).update_weight("l1", weight)


def test_builder_method_errors(logprobs):
    p = pw.pipeline(["l1"])
    with pytest.raises(KeyError, match="no penalty named 'zz'"):
        p.remove("zz")
    with pytest.raises(KeyError):
        p.update_weight("zz", 1.0)
    with pytest.raises(KeyError):
        p.set_enabled("zz", False)
    with pytest.raises(ValueError, match="True or False"):
        p.set_enabled("l1", 1)
    with pytest.raises(ValueError, match="reserved"):
        p.add("total", pw.l1)
    with pytest.raises(ValueError, match="clash"):
        p.add("l1_weighted", pw.l1)
    with pytest.raises(ValueError, match="callable"):
        p.add("x", 3.0)
    with pytest.raises(ValueError, match="needs a function"):
        p.add("custom")
    with pytest.raises(ValueError, match="clip"):
        p.add("l2", pw.l2, clip=0.0)  # built-in options are checked by add as well
    with pytest.raises(ValueError, match="must return a scalar"):
        p.add("l2", pw.l2, reduction="none").compute(logprobs)
    with pytest.raises(ValueError, match="options"):
        p.add("l2", pw.l2, options={"clip": 1.0}, clip=2.0)
