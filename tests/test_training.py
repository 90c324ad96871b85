"""penwatch.training: loss wrappers, train-step builders, capture, trainer, log_penalties.

Synthetic task: noise-free linear regression ``y = x @ w_true`` with a sparse ``w_true``
(3 of 8 features), small enough that every builder trains in a few hundred steps. The
jitted steps are built once per module and reused; weights change through the state.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import penwatch as pw
from penwatch import training
from penwatch.diagnostics import gradient_diagnostics, l1_term, l2_term
from penwatch.training._state import _split_batch as split_batch

KEY = jax.random.PRNGKey(0)
_kx, _kw, _k1, _k2 = jax.random.split(KEY, 4)
X = jax.random.normal(_kx, (64, 8))
W_TRUE = jnp.array([[1.5], [0.0], [-2.0], [0.0], [0.0], [0.7], [0.0], [0.0]])
Y = X @ W_TRUE
BATCH = (X, Y)
# With observation noise the unpenalized fit has small spurious coefficients.
NOISY = (X, Y + 0.5 * jax.random.normal(jax.random.PRNGKey(7), Y.shape))


def linear(params, x):
    return x @ params["w"] + params["b"]


def mlp(params, x):
    h = pw.capture("hidden1", jax.nn.relu(x @ params["w1"] + params["b1"]))
    return h @ params["w2"] + params["b2"]


LINEAR_PARAMS = {"w": 0.1 * jax.random.normal(_kw, (8, 1)), "b": jnp.zeros((1,))}
MLP_PARAMS = {
    "w1": 0.5 * jax.random.normal(_k1, (8, 16)),
    "b1": jnp.full((16,), 0.1),
    "w2": 0.5 * jax.random.normal(_k2, (16, 1)),
    "b2": jnp.zeros((1,)),
}


class TraceCounter:
    """Counts how often a loss is traced (its Python body runs once per trace)."""

    def __init__(self, fn=optax.l2_loss):
        self.fn, self.count = fn, 0

    def __call__(self, preds, targets):
        self.count += 1
        return self.fn(preds, targets)


def run(step_fn, state, n, batch=BATCH):
    metrics = None
    for _ in range(n):
        state, metrics = step_fn(state, batch)
    return state, metrics


# One output-penalty step and one parameter-penalty step, shared by several tests.
OUT_LOSS = TraceCounter()
OUT_PIPE = pw.pipeline([("l2", 1e-4), ("l1", 1e-4)])
OUT_INIT, OUT_STEP = training.build_train_step(
    linear, OUT_LOSS, OUT_PIPE, optax.adam(0.05), diagnostics_every=50
)
PARAM_PIPE = pw.pipeline([("l1", 0.0), ("l2", 0.0)])
PARAM_INIT, PARAM_STEP = training.build_train_step(
    linear, TraceCounter(), PARAM_PIPE, optax.sgd(0.05), penalty_on="params"
)


def sq_norm(tree):
    return float(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


# --- build_train_step ---------------------------------------------------------------


def test_build_train_step_learns_and_reports_metrics():
    state = OUT_INIT(LINEAR_PARAMS)
    state, first = OUT_STEP(state, BATCH)
    state, last = run(OUT_STEP, state, 199)
    # Loss falls by at least 50x on the synthetic regression in 200 Adam steps.
    assert float(last["base_loss"]) < float(first["base_loss"]) / 50
    assert int(state.step) == 200
    for key in ["loss", "base_loss", "total", "loss_finite", "grads_finite", "grad_norm"]:
        assert key in last
    for name in ("l1", "l2"):
        for suffix in ("", "_weighted", "_weight", "_finite"):
            assert f"{name}{suffix}" in last
    # Metrics stay on the device.
    assert all(isinstance(v, jax.Array) for k, v in last.items() if not k.startswith("_"))
    np.testing.assert_allclose(
        float(last["loss"]), float(last["base_loss"]) + float(last["total"]), rtol=1e-6
    )
    # Independent check of the objective at the pre-update parameters.
    preds = linear(state.params, X)
    base = float(jnp.mean(optax.l2_loss(preds, Y)))
    _, m = OUT_STEP(state, BATCH)
    np.testing.assert_allclose(float(m["base_loss"]), base, rtol=1e-5)
    np.testing.assert_allclose(
        float(m["l2"]), float(np.sum(np.asarray(preds, np.float64) ** 2)), rtol=1e-5
    )


def test_leaf_nonfinite_report_paths_and_counts():
    params = {**LINEAR_PARAMS, "unused": jnp.zeros((3,))}
    init, step = training.build_train_step(linear, optax.l2_loss, None, optax.sgd(0.1))
    state = init(params)
    bad_x = X.at[0, 0].set(jnp.nan)
    _, m = step(state, (bad_x, Y))
    report = m["_leaf_nonfinite"]
    assert set(report) == {"params", "grads"}
    assert set(report["grads"]) == {"['b']", "['unused']", "['w']"}
    nan_w, inf_w = (int(c) for c in report["grads"]["['w']"])
    assert nan_w > 0 and inf_w == 0
    assert [int(c) for c in report["grads"]["['unused']"]] == [0, 0]
    assert int(report["params"]["['w']"][0]) > 0
    assert not bool(m["grads_finite"]) and not bool(m["loss_finite"])
    assert all(c.dtype == jnp.int32 for c in jax.tree.leaves(report))


def test_skip_nonfinite_leaves_params_unchanged_at_poisoned_step():
    init, step = training.build_train_step(
        linear, optax.l2_loss, OUT_PIPE, optax.adam(0.05), skip_nonfinite=True
    )
    state, _ = run(step, init(LINEAR_PARAMS), 3)
    poisoned = (X.at[3, 2].set(jnp.inf), Y)
    new_state, m = step(state, poisoned)
    assert bool(m["update_skipped"])
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == int(state.step) + 1
    after, m = step(new_state, BATCH)  # a clean step updates again
    assert not bool(m["update_skipped"])
    assert not np.allclose(after.params["w"], new_state.params["w"])


def _reference_terms(p):
    preds = linear(p, X)
    base = jnp.mean(optax.l2_loss(preds, Y))
    return base, {"l1": 1e-4 * pw.l1(preds), "l2": 1e-4 * pw.l2(preds)}


DIAG_REFERENCE = jax.jit(
    lambda p: gradient_diagnostics(
        _reference_terms, p, param_terms={"decay": l2_term(0.01)}, weights=OUT_PIPE.weights
    )
)


def test_diagnostics_every_n_steps_only_and_match_reference():
    counter = TraceCounter()
    init, step = training.build_train_step(
        linear,
        counter,
        OUT_PIPE,
        optax.sgd(0.01),
        diagnostics_every=3,
        param_terms={"decay": l2_term(0.01)},
    )
    state = init(LINEAR_PARAMS)
    seen = []
    for _ in range(7):
        before = state.params
        state, m = step(state, BATCH)
        has = "base_grad_share" in m
        seen.append(has)
        if has:
            terms = ["base", "l1", "l2", "decay"]
            assert sum(float(m[f"{t}_grad_share"]) for t in terms) == pytest.approx(1.0, abs=1e-5)

            ref = DIAG_REFERENCE(before)
            for key, value in ref.items():
                np.testing.assert_allclose(float(m[key]), float(value), rtol=2e-4, atol=1e-7)
    assert seen == [True, False, False, True, False, False, True]
    # one trace for the plain step, one for the diagnostics step, and one of the forward
    # pass that orders the leaf report nearest the loss first (shared by both)
    assert counter.count == 3
    # A diagnostics step updates exactly like a plain step.
    a, ma = step.with_diagnostics(state, BATCH)
    b, mb = step.plain(state, BATCH)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)


def test_l1_sparsifies_and_l2_shrinks_parameters_without_recompiling():
    counter = PARAM_STEP.plain  # compiled once; weights change through the state
    results = {}
    for name, weights in {
        "none": {"l1": 0.0, "l2": 0.0},
        "l1": {"l1": 0.1, "l2": 0.0},
        "l2": {"l1": 0.0, "l2": 0.05},
    }.items():
        state = pw.apply_scheduled_weights(PARAM_INIT(LINEAR_PARAMS), weights)
        state, m = run(PARAM_STEP, state, 300, batch=NOISY)
        results[name] = (np.asarray(state.params["w"]).ravel(), float(m["base_loss"]))
    w_none, w_l1, w_l2 = (results[k][0] for k in ("none", "l1", "l2"))
    # The unpenalized fit of noisy targets has spurious coefficients on the 5 zero
    # features; L1 drives them to (near) zero, L2 shrinks the norm.
    near_zero = lambda w: int(np.sum(np.abs(w) < 0.01))  # noqa: E731
    assert near_zero(w_l1) >= 5 > near_zero(w_none) + 2
    assert np.abs(w_l1[[1, 3, 4, 6, 7]]).sum() < 0.2 * np.abs(w_none[[1, 3, 4, 6, 7]]).sum()
    assert np.linalg.norm(w_l2) < 0.95 * np.linalg.norm(w_none)
    # ... while all three still fit the signal (noise variance 0.25 -> l2_loss ~ 0.125).
    assert max(r[1] for r in results.values()) < 0.2
    assert counter._cache_size() == 1


def test_weight_decay_builder_learns_shrinks_and_reports_term():
    init, step = training.build_train_step_with_weight_decay(
        linear, optax.l2_loss, None, optax.sgd(0.05), decay=0.05, kind="l2"
    )
    state, first = step(init(LINEAR_PARAMS), BATCH)
    state, m = run(step, state, 299)
    assert float(m["base_loss"]) < float(first["base_loss"]) / 5
    expected = 0.05 * sq_norm(state.params)  # metrics are at the pre-update params...
    _, m2 = step(state, BATCH)
    np.testing.assert_allclose(float(m2["weight_decay_weighted"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m2["weight_decay"]), sq_norm(state.params), rtol=1e-5)
    assert float(m2["weight_decay_weight"]) == pytest.approx(0.05)
    np.testing.assert_allclose(float(m2["total"]), expected, rtol=1e-5)
    ref_state, _ = run(PARAM_STEP, PARAM_INIT(LINEAR_PARAMS), 300)  # unpenalized, same SGD
    assert sq_norm(state.params) < 0.9 * sq_norm(ref_state.params)
    # The decay weight is schedulable without recompiling.
    state = pw.apply_scheduled_weights(state, {"weight_decay": 0.0})
    _, m3 = step(state, BATCH)
    assert float(m3["weight_decay_weighted"]) == 0.0
    assert step.plain._cache_size() == 1


def test_weight_decay_builder_l1_and_elastic_net_terms():
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(LINEAR_PARAMS)])
    for kind, expect in [
        ("l1", 0.1 * np.sum(np.abs(flat))),
        ("elastic_net", 0.1 * (0.3 * np.sum(np.abs(flat)) + 0.7 * np.sum(flat**2))),
    ]:
        init, _ = training.build_train_step_with_weight_decay(
            linear, optax.l2_loss, None, optax.sgd(0.0), decay=0.1, kind=kind, l1_ratio=0.3
        )
        term = init(LINEAR_PARAMS).param_terms["weight_decay"]
        assert term.kind == kind
        np.testing.assert_allclose(float(term.value(LINEAR_PARAMS)), expect, rtol=1e-5)


def test_activity_step_learns_and_lowers_captured_activations():
    init, step = training.build_activity_train_step(
        mlp, optax.l2_loss, {"hidden1": (pw.l1, 0.0)}, optax.adam(0.01)
    )
    out = {}
    for w in (0.0, 3e-3):
        state = pw.apply_scheduled_weights(init(MLP_PARAMS), {"hidden1": w})
        state, first = step(state, BATCH)
        state, m = run(step, state, 249)
        _, captures = training.collect_activations(mlp, state.params, X)
        out[w] = (float(jnp.mean(jnp.abs(captures["hidden1"]))), first, m)
    (act0, first0, last0), (act1, _, last1) = out[0.0], out[3e-3]
    assert float(last0["base_loss"]) < float(first0["base_loss"]) / 10
    assert float(last1["base_loss"]) < float(first0["base_loss"]) / 5
    assert act1 < 0.7 * act0  # activity L1 lowers the captured activations
    assert {"hidden1", "hidden1_weighted", "hidden1_weight", "hidden1_finite"} <= set(last1)
    assert step.plain._cache_size() == 1


def test_activity_step_accepts_options_and_multipipeline():
    pipe = pw.MultiPipeline(name="act").add("h", pw.l2, inputs=("hidden1",), weight=0.5)
    pipe = pipe.add("out", pw.l1, inputs=("outputs",), weight=0.1)
    init, step = training.build_activity_train_step(mlp, optax.l2_loss, pipe, optax.sgd(0.0))
    _, m = step(init(MLP_PARAMS), BATCH)
    outputs, caps = training.collect_activations(mlp, MLP_PARAMS, X)
    np.testing.assert_allclose(float(m["h"]), float(jnp.sum(caps["hidden1"] ** 2)), rtol=1e-5)
    np.testing.assert_allclose(float(m["out"]), float(jnp.sum(jnp.abs(outputs))), rtol=1e-5)
    init2, step2 = training.build_activity_train_step(
        mlp, optax.l2_loss, {"hidden1": (pw.l2, 0.5, {"clip": 0.1})}, optax.sgd(0.0)
    )
    _, m2 = step2(init2(MLP_PARAMS), BATCH)
    clipped = jnp.clip(caps["hidden1"], -0.1, 0.1)
    np.testing.assert_allclose(float(m2["hidden1"]), float(jnp.sum(clipped**2)), rtol=1e-5)


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="penalty_on"):
        training.build_train_step(linear, optax.l2_loss, None, optax.sgd(0.1), penalty_on="x")
    with pytest.raises(ValueError, match="diagnostics_every"):
        training.build_train_step(linear, optax.l2_loss, None, optax.sgd(0.1), diagnostics_every=-1)
    with pytest.raises(ValueError, match="optimizer"):
        training.build_train_step(linear, optax.l2_loss, None, "sgd")
    with pytest.raises(ValueError, match="both pipeline penalties and param_terms"):
        training.build_train_step(
            linear, optax.l2_loss, OUT_PIPE, optax.sgd(0.1), param_terms={"l1": l1_term(0.1)}
        )
    with pytest.raises(ValueError, match="kind"):
        training.build_train_step_with_weight_decay(
            linear, optax.l2_loss, None, optax.sgd(0.1), kind="l3"
        )
    with pytest.raises(ValueError, match="activity"):
        training.build_activity_train_step(mlp, optax.l2_loss, {}, optax.sgd(0.1))
    with pytest.raises(ValueError, match="batch"):
        OUT_STEP(OUT_INIT(LINEAR_PARAMS), (X,))


def test_dict_batches_and_restored_state():
    state = OUT_INIT(LINEAR_PARAMS)
    _, m0 = OUT_STEP(state, BATCH)
    s1, m1 = OUT_STEP(state, {"x": X, "y": Y})
    np.testing.assert_allclose(m1["loss"], m0["loss"])
    assert split_batch({"inputs": 1, "targets": 2}) == (1, 2)
    assert split_batch([1, 2]) == (1, 2)
    with pytest.raises(KeyError, match="inputs"):
        split_batch({"a": 1})
    # A state rebuilt outside the step function (e.g. restored) still gets the right
    # diagnostics schedule: step 50 is a diagnostics step (diagnostics_every=50).
    restored = s1._replace(step=jnp.asarray(50, jnp.int32))
    _, m = OUT_STEP(restored, BATCH)
    assert "base_grad_share" in m


# --- loss wrappers ------------------------------------------------------------------


def test_wrap_loss_outputs_and_params():
    preds = linear(LINEAR_PARAMS, X)
    loss = training.wrap_loss(optax.l2_loss, pw.l2, weight=0.1, clip=0.5)
    expected = jnp.mean(optax.l2_loss(preds, Y)) + 0.1 * jnp.sum(jnp.clip(preds, -0.5, 0.5) ** 2)
    np.testing.assert_allclose(jax.jit(loss)(preds, Y), expected, rtol=1e-6)
    ploss = training.wrap_loss(optax.l2_loss, pw.l1, weight=0.2, on="params")
    flat = training.flatten_params(LINEAR_PARAMS)
    assert flat.shape == (9,)
    np.testing.assert_allclose(
        ploss(preds, Y, LINEAR_PARAMS),
        jnp.mean(optax.l2_loss(preds, Y)) + 0.2 * jnp.sum(jnp.abs(flat)),
        rtol=1e-6,
    )
    g = jax.grad(lambda p: ploss(linear(p, X), Y, p))(LINEAR_PARAMS)
    assert jax.tree.structure(g) == jax.tree.structure(LINEAR_PARAMS)
    with pytest.raises(ValueError, match=r"wrap_loss.*'on'"):
        training.wrap_loss(optax.l2_loss, pw.l2, on="weights")
    with pytest.raises(ValueError, match=r"wrap_loss.*'weight'"):
        training.wrap_loss(optax.l2_loss, pw.l2, weight=float("inf"))


def test_wrap_loss_with_pipeline():
    preds = linear(LINEAR_PARAMS, X)
    loss = training.wrap_loss_with_pipeline(optax.l2_loss, OUT_PIPE)
    expected = jnp.mean(optax.l2_loss(preds, Y)) + OUT_PIPE.compute_total(preds)
    np.testing.assert_allclose(jax.jit(loss)(preds, Y), expected, rtol=1e-6)
    ploss = training.wrap_loss_with_pipeline(optax.l2_loss, OUT_PIPE, on="params")
    np.testing.assert_allclose(
        ploss(preds, Y, LINEAR_PARAMS),
        jnp.mean(optax.l2_loss(preds, Y))
        + OUT_PIPE.compute_total(training.flatten_params(LINEAR_PARAMS)),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="pipeline"):
        training.wrap_loss_with_pipeline(optax.l2_loss, object())


# --- capture --------------------------------------------------------------------------


def test_capture_is_identity_outside_collection_and_records_inside():
    x = jnp.arange(3.0)
    assert pw.capture("h", x) is x
    outputs, caps = training.collect_activations(mlp, MLP_PARAMS, X)
    np.testing.assert_allclose(outputs, mlp(MLP_PARAMS, X))
    assert set(caps) == {"hidden1"} and caps["hidden1"].shape == (64, 16)
    jitted = jax.jit(lambda p: training.collect_activations(mlp, p, X)[1]["hidden1"])
    np.testing.assert_allclose(jitted(MLP_PARAMS), caps["hidden1"], rtol=1e-6)
    # Gradients flow through a captured activation.
    g = jax.grad(lambda p: jnp.sum(training.collect_activations(mlp, p, X)[1]["hidden1"]))(
        MLP_PARAMS
    )
    assert float(jnp.abs(g["w1"]).sum()) > 0
    with pytest.raises(ValueError, match="captured twice"), training.collect():
        pw.capture("a", x)
        pw.capture("a", x)
    with pytest.raises(ValueError, match="name"):
        pw.capture("", x)


# --- trainer, log_penalties -----------------------------------------------------------


class FakeMonitor:
    def __init__(self):
        self.calls = []

    def record(self, step, metrics, *, loss=None, pipeline="default", dispatched_at_ns=None):
        self.calls.append((step, metrics, loss, pipeline, dispatched_at_ns))


def test_trainer_learns_records_monitor_and_schedules(caplog):
    monitor = FakeMonitor()
    batches = [(X[i : i + 16], Y[i : i + 16]) for i in range(0, 64, 16)]
    schedule = pw.weight_schedule({"l1": ("linear", 0.0, 1e-3), "l2": ("constant", 1e-4)})
    log = training.log_penalties(OUT_PIPE, every=10)
    with caplog.at_level(logging.INFO, logger="penwatch.training"):
        result = pw.trainer(
            linear,
            optax.l2_loss,
            OUT_PIPE,
            optax.adam(0.05),
            LINEAR_PARAMS,
            batches,
            epochs=30,
            monitor=monitor,
            schedule=schedule,
            progress=False,
            callbacks=[log],
            train_step=(OUT_INIT, OUT_STEP),
        )
    assert len(result.history) == 30 and result.history[0]["steps"] == 4
    assert float(result.history[-1]["base_loss"]) < float(result.history[0]["base_loss"]) / 20
    assert result.history[0]["weights"] == {"l1": 0.0, "l2": 1e-4}
    assert result.history[-1]["weights"]["l1"] == pytest.approx(1e-3)
    assert float(result.state.pipeline.weights["l1"]) == pytest.approx(1e-3)
    assert len(monitor.calls) == 120
    step, metrics, loss, label, t0 = monitor.calls[-1]
    assert step == 119 and label == "default" and isinstance(t0, int)
    # the step's packed metrics go as they are; the monitor reads base_loss from them
    assert loss is None and isinstance(metrics, pw.Metrics)
    assert metrics.penalties == ("l2", "l1") and "base_loss" in metrics.scalar_keys
    # log_penalties logged steps 0, 10, ..., 110.
    lines = [r.getMessage() for r in caplog.records if r.name == "penwatch.training"]
    assert len(lines) == 12 and lines[0].startswith("step 0: loss=")
    assert "l1_weighted=" in lines[0] and "l2=" in lines[0]


def test_trainer_builds_its_own_step_with_skip_nonfinite_and_iterator_errors():
    data = [BATCH, (X.at[0, 0].set(jnp.nan), Y), BATCH]
    result = pw.trainer(
        linear,
        optax.l2_loss,
        None,
        optax.sgd(0.05),
        LINEAR_PARAMS,
        lambda epoch: iter(data),
        epochs=2,
        skip_nonfinite=True,
        progress=True,
    )
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.params))
    assert int(result.state.step) == 6
    with pytest.raises(ValueError, match="one-shot iterator"):
        pw.trainer(
            linear, optax.l2_loss, None, optax.sgd(0.05), LINEAR_PARAMS, iter(data), epochs=2
        )
    with pytest.raises(ValueError, match="epochs"):
        pw.trainer(linear, optax.l2_loss, None, optax.sgd(0.05), LINEAR_PARAMS, data, epochs=0)


def test_trainer_with_real_monitor_names_offending_leaf():
    records = []
    monitor = pw.Monitor("test-training", sinks=[pw.sinks.Callback(records.append)], alerts=[])
    data = [BATCH, (X.at[0, 0].set(jnp.inf), Y)]
    with monitor:
        pw.trainer(
            linear,
            optax.l2_loss,
            OUT_PIPE,
            optax.sgd(0.01),
            LINEAR_PARAMS,
            data,
            monitor=monitor,
            skip_nonfinite=True,
            progress=False,
        )
    assert [r.step for r in records] == [0, 1]
    assert records[0].ok and records[0].duration_seconds is not None
    assert set(records[0].penalties) == {"l1", "l2"}
    bad = records[1]
    assert not bad.ok
    assert {leaf.path for leaf in bad.leaves if leaf.tree == "grads"} >= {"['w']"}


def test_log_penalties_validation_and_flush(caplog):
    with pytest.raises(ValueError, match="every"):
        training.log_penalties(every=0)
    log = training.log_penalties(every=1)
    with caplog.at_level(logging.INFO, logger="penwatch.training"):
        log(0, {"loss": jnp.asarray(1.5), "x": jnp.asarray(2.0), "x_weight": jnp.asarray(1.0)})
        log.flush()
    assert any("loss=1.5" in r.getMessage() and "x=2" in r.getMessage() for r in caplog.records)
