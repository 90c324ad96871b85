"""SPEC section 12: the Gram matrix, what-if, suggestions, update shares, per-group norms,
tug of war, collapse and first-step lint."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import penwatch as pw
from penwatch.diagnostics import (
    diagonal_preconditioner,
    gradient_diagnostics,
    l2_term,
    suggest_weights,
    suggested_weight_metrics,
    what_if,
)
from penwatch.schema import StepRecord, gram_key, group_key, term_key
from penwatch.schema import thresholds as th

# --- what-if against a float64 direct recomputation -----------------------------------


def _direct(vectors: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Shares, cosines to base and norms recomputed from the weighted gradients."""
    g_terms = w[:, None] * vectors
    g = g_terms.sum(0)
    norms = np.linalg.norm(g_terms, axis=1)
    cos = g_terms @ g_terms[0] / (norms * norms[0])
    return {"share": g_terms @ g / (g @ g), "cos": cos, "norm": norms, "total": np.linalg.norm(g)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_what_if_equals_direct_recomputation(seed):
    rng = np.random.default_rng(seed)
    k = 2 + seed * 3
    vectors = rng.normal(size=(k, 50))
    gram = vectors @ vectors.T
    names = ("base", *(f"p{i}" for i in range(1, k)))
    w = np.concatenate([[1.0], rng.uniform(-2, 5, size=k - 1)])
    got = what_if(gram, w, terms=names)
    ref = _direct(vectors, w)
    np.testing.assert_allclose([got.grad_share[n] for n in names], ref["share"], rtol=1e-10)
    np.testing.assert_allclose([got.grad_cosine[n] for n in names], ref["cos"], rtol=1e-10)
    np.testing.assert_allclose([got.param_grad_norm[n] for n in names], ref["norm"], rtol=1e-10)
    assert got.grad_norm == pytest.approx(ref["total"], rel=1e-10)
    # a mapping of some weights keeps the others; the tuple form works too
    part = what_if((names, gram), {names[-1]: 0.5})
    assert part.weights[names[-1]] == 0.5 and part.weights[names[1 % k]] in (1.0, 0.5)


def test_what_if_on_a_real_model_matches_a_rerun():
    """Gram from a run at weight 0.1 -> what-if at 3.0 equals a diagnostics run at 3.0."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"dense1": jax.random.normal(k1, (6, 5)), "dense2": jax.random.normal(k2, (5, 2))}
    x = jnp.linspace(-1, 1, 24).reshape(4, 6)

    def terms(p, w_ent):
        out = jnp.tanh(x @ p["dense1"]) @ p["dense2"]
        ent = jnp.mean(jax.nn.softmax(out) * jax.nn.log_softmax(out))
        return jnp.mean((out - 0.3) ** 2), {"ent": w_ent * ent}

    def run(w_ent, w_l2):
        return gradient_diagnostics(
            lambda p: terms(p, w_ent),
            params,
            param_terms={"l2": l2_term(w_l2)},
            weights={"ent": w_ent},
        )

    first = {k: float(v) for k, v in run(0.1, 0.2).items()}
    record = StepRecord(run="r", process=0, step=0, pipeline="p", wall_time=0.0, values=first)
    names, _ = record.gram()
    assert names == ("base", "ent", "l2")
    predicted = what_if(record, {"ent": 3.0, "l2": 0.05})
    rerun = run(3.0, 0.05)
    for n in names:
        assert predicted.grad_share[n] == pytest.approx(
            float(rerun[term_key(n, "grad_share")]), abs=2e-5
        )
        assert predicted.grad_cosine[n] == pytest.approx(
            float(rerun[term_key(n, "grad_cosine")]), abs=2e-5
        )
        assert predicted.param_grad_norm[n] == pytest.approx(
            float(rerun[term_key(n, "param_grad_norm")]), rel=1e-5
        )
    # per-group norms: the closed-form L2 acts on both groups, their squares add up
    groups = [float(rerun[group_key("l2", g)]) for g in ("dense1", "dense2")]
    assert np.hypot(*groups) == pytest.approx(
        float(rerun[term_key("l2", "param_grad_norm")]), rel=1e-5
    )


def test_what_if_rejects_bad_input():
    with pytest.raises(ValueError, match="terms=") as err:
        what_if(np.eye(2), [1.0, 1.0])
    with pytest.raises(ValueError, match="base term's weight is 1"):
        what_if(np.eye(2), [2.0, 1.0], terms=("base", "a"))
    with pytest.raises(ValueError, match="unknown terms"):
        what_if(np.eye(2), {"zzz": 1.0}, terms=("base", "a"))
    with pytest.raises(ValueError, match="square"):
        what_if(np.eye(3), [1.0, 1.0], terms=("base", "a"))
    assert "what_if" in str(err.value)


# --- suggestions -----------------------------------------------------------------------


def _in_band(result, penalty_max=th.SUGGEST_PENALTY_MAX_SHARE, base_min=th.SUGGEST_BASE_MIN_SHARE):
    tol = 1e-8
    assert result.grad_share["base"] >= base_min - tol
    for t in result.terms[1:]:
        assert result.grad_share[t] <= penalty_max + tol
        assert result.pull[t] <= penalty_max + tol


@pytest.mark.parametrize("seed", range(6))
def test_suggest_weights_lands_every_share_in_the_band(seed):
    rng = np.random.default_rng(100 + seed)
    k = 2 + seed
    vectors = rng.normal(size=(k, 40))
    vectors[1:] -= 0.8 * vectors[0]  # penalties that oppose the task
    names = ("base", *(f"p{i}" for i in range(1, k)))
    w = {n: float(rng.uniform(1, 20)) for n in names[1:]}
    found = suggest_weights(vectors @ vectors.T, w, terms=names)
    assert found.feasible and found.reason == ""
    _in_band(found.result)
    # only lowered, and each changed weight is tight: 1 % more breaks the band
    for n in names[1:]:
        assert found.weights[n] <= w[n]
    for n in found.changed:
        bumped = what_if(
            vectors @ vectors.T, {**found.weights, n: found.weights[n] * 1.01}, terms=names
        )
        with pytest.raises(AssertionError):
            _in_band(bumped)


def test_suggest_weights_balance_case_names_a_lower_weight():
    """The issue's case: ‖g_l1‖ = 0.85 ‖g_task‖, cosine -0.9, shares inside the band."""
    base = np.array([1.0, 0.0])
    l1 = 0.85 * np.array([-0.9, np.sqrt(1 - 0.81)]) / 5.0  # unweighted, weight 5
    vectors = np.stack([base, l1])
    now = what_if(vectors @ vectors.T, [1.0, 5.0], terms=("base", "l1"))
    assert abs(now.grad_share["l1"]) < th.SUGGEST_PENALTY_MAX_SHARE  # shares can't see it
    found = suggest_weights(vectors @ vectors.T, {"l1": 5.0}, terms=("base", "l1"))
    assert found.feasible and found.weights["l1"] < 5.0 and found.changed == ("l1",)
    assert found.result.pull["l1"] == pytest.approx(th.SUGGEST_PENALTY_MAX_SHARE, rel=1e-6)


def test_suggest_weights_says_when_infeasible():
    gram = np.array([[0.0, 0.0], [0.0, 4.0]])  # the task gradient is zero
    found = suggest_weights(gram, {"l1": 1.0}, terms=("base", "l1"))
    assert not found.feasible and "task gradient is zero" in found.reason
    assert found.weights == {"l1": 1.0}
    # a negative-weight penalty cannot be lowered in log space: reported, not hidden
    vectors = np.array([[1.0, 0.0], [3.0, 0.1]])
    found = suggest_weights(vectors @ vectors.T, {"p": -2.0}, terms=("base", "p"))
    assert not found.feasible and "p" in found.reason
    with pytest.raises(ValueError, match="penalty_max"):
        suggest_weights(np.eye(2), terms=("base", "a"), penalty_max=1.5)


def test_what_if_and_suggest_take_under_a_millisecond_for_16_terms():
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(16, 200))
    vectors[1:] -= 0.5 * vectors[0]
    gram = vectors @ vectors.T
    names = ("base", *(f"p{i}" for i in range(1, 16)))
    w = {n: 3.0 for n in names[1:]}
    for fn in (
        lambda: what_if(gram, w, terms=names),
        lambda: suggest_weights(gram, w, terms=names),
    ):
        fn()
        medians = []
        for _ in range(5):  # the best of 5 medians: robust to a loaded machine
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            medians.append(np.median(times))
        assert min(medians) < 1e-3, medians


def test_suggested_weight_metrics_from_step_values():
    vectors = np.array([[1.0, 0.0], [-0.9 * 0.17, 0.17 * np.sqrt(0.19)]])
    gram = vectors @ vectors.T
    values = {
        "l1_weight": 5.0,
        term_key("base", "grad_share"): 1.0,
        term_key("l1", "grad_share"): 0.0,
        gram_key("base", "base"): gram[0, 0],
        gram_key("base", "l1"): gram[0, 1],
        gram_key("l1", "l1"): gram[1, 1],
    }
    out = suggested_weight_metrics(values)
    assert set(out) == {"l1_suggested_weight"} and 0 < out["l1_suggested_weight"] < 5.0
    assert suggested_weight_metrics({"l1_weight": 1.0}) == {}


# --- update-space shares ------------------------------------------------------------------


def _mlp_setup():
    def model(p, x):
        h = pw.training.capture("hidden", jax.nn.relu(x @ p["dense1"]["w"] + p["dense1"]["b"]))
        return h @ p["dense2"]["w"] + p["dense2"]["b"]

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "dense1": {"w": jax.random.normal(k[0], (8, 32)) / jnp.sqrt(8), "b": jnp.zeros(32)},
        "dense2": {"w": jax.random.normal(k[1], (32, 1)) / jnp.sqrt(32), "b": jnp.zeros(1)},
    }
    x = jax.random.normal(k[2], (64, 8))
    y = jnp.sin(x @ jax.random.normal(k[3], (8, 1)))
    return model, params, (x, y)


def _l1_mean(h):
    return jnp.mean(jnp.abs(h))


def _mse(a, b):
    return (a - b) ** 2


def test_update_shares_equal_a_hand_computation_with_adams_nu():
    model, params, (x, y) = _mlp_setup()
    b2, eps = 0.999, 1e-8
    opt = optax.adam(1e-2, b2=b2, eps=eps)
    init, step = pw.training.build_activity_train_step(
        model, _mse, {"hidden": (_l1_mean, 0.5)}, opt, diagnostics_every=1
    )
    state = init(params)
    state, _ = step(state, (x, y))
    before = state
    state, metrics = step(state, (x, y))

    # by hand: per-term gradients, Adam's nu after this step, P = 1/(sqrt(nu) + eps)
    def base_loss(p):
        return jnp.mean(_mse(model(p, x), y))

    def penalty(p):
        with pw.training.collect() as cap:
            model(p, x)
        return 0.5 * _l1_mean(cap["hidden"])

    g0 = jax.grad(base_loss)(before.params)
    g1 = jax.grad(penalty)(before.params)
    g = jax.tree.map(jnp.add, g0, g1)
    nu_old = before.opt_state[0].nu
    nu = jax.tree.map(lambda n, gi: b2 * n + (1 - b2) * gi**2, nu_old, g)
    flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)]).astype(np.float64)  # noqa: E731
    p_diag = 1.0 / (np.sqrt(flat(nu)) + eps)
    pg = p_diag * flat(g)
    for name, gi in (("base", g0), ("hidden", g1)):
        hand = (p_diag * flat(gi)) @ pg / (pg @ pg)
        assert float(metrics[term_key(name, "update_share")]) == pytest.approx(
            hand, rel=1e-4, abs=1e-6
        )
    # and diagonal_preconditioner reads the same nu from the state after the update
    got = diagonal_preconditioner(state.opt_state, state.params)
    np.testing.assert_allclose(
        flat(got), 1.0 / (np.sqrt(flat(state.opt_state[0].nu)) + eps), rtol=1e-6
    )


def test_update_shares_absent_for_plain_sgd_and_preconditioner_kinds():
    model, params, batch = _mlp_setup()
    init, step = pw.training.build_activity_train_step(
        model, _mse, {"hidden": (_l1_mean, 0.5)}, optax.sgd(0.1), diagnostics_every=1
    )
    _, metrics = step(init(params), batch)
    assert term_key("hidden", "update_share") not in metrics
    assert diagonal_preconditioner(optax.sgd(0.1).init(params)) is None
    for opt in (optax.rmsprop(0.1), optax.adagrad(0.1), optax.adamw(0.1)):
        assert diagonal_preconditioner(opt.init(params), params) is not None


# --- scenarios: balance (tug of war) and collapse ----------------------------------------


def _run_scenario(weight, steps, tmp_path=None, alerts=()):
    model, params, batch = _mlp_setup()
    init, step = pw.training.build_activity_train_step(
        model, _mse, {"hidden": (_l1_mean, weight)}, optax.adam(0.01), diagnostics_every=5
    )
    events, records = [], []
    sinks = [pw.sinks.Callback(records.append, on_event=events.append)]
    if tmp_path is not None:
        sinks.append(pw.sinks.SQLite(tmp_path / "run.db"))
    state = init(params)
    with pw.Monitor("scenario", sinks=sinks, alerts=list(alerts)) as monitor:
        for i in range(steps):
            state, metrics = step(state, batch)
            monitor.record(i, metrics)
    return events, records


def test_balance_scenario_fires_tug_of_war_naming_the_penalty(tmp_path):
    events, records = _run_scenario(
        5.0,
        160,
        tmp_path,
        alerts=[pw.alerts.GradientTugOfWar(), pw.alerts.GradientDominance()],
    )
    tug = [e for e in events if e.name == "GradientTugOfWar"]
    assert tug, [e.message for e in events]
    event = tug[0]
    assert event.attributes["penalty"] == "hidden"
    assert event.attributes["grad_norm_ratio"] >= th.TUG_RATIO
    assert event.attributes["grad_cosine"] < th.TUG_COSINE
    assert "value_ratio" in event.attributes
    assert 0 < event.attributes["suggested_weight"] < 5.0 and event.attributes["weight"] == 5.0
    assert "holds the task back" in event.message and "suggested weight" in event.message
    # the Gram matrix and the suggestion are in the stored records
    diag = [r for r in records if r.gram() is not None]
    assert diag and all(r.term("hidden").suggested_weight is not None for r in diag[-3:])
    reader = pw.store.StoreReader(tmp_path / "run.db")
    try:
        stored = [v for _, _, v in reader.records("scenario") if gram_key("base", "hidden") in v]
    finally:
        reader.close()
    assert len(stored) == len(diag)
    assert stored[-1][group_key("hidden", "dense1")] > 0


def test_collapse_scenario_fires_activity_collapse():
    events, records = _run_scenario(50.0, 100, alerts=[pw.alerts.ActivityCollapse()])
    collapse = [e for e in events if e.name == "ActivityCollapse"]
    assert len(collapse) == 1, [e.message for e in events]
    assert collapse[0].attributes["capture"] == "hidden"
    assert collapse[0].attributes["penalty"] == "hidden"
    assert collapse[0].attributes["dead_fraction"] > th.COLLAPSE_DEAD_FRACTION
    assert records[-1].dead_fractions()["hidden"] > 0.9


# --- first-step lint -------------------------------------------------------------------


def test_dead_term_behind_stop_gradient_is_reported_at_the_first_diagnostics_step():
    model, params, batch = _mlp_setup()
    init, step = pw.training.build_activity_train_step(
        model,
        _mse,
        {"hidden": (lambda h: _l1_mean(jax.lax.stop_gradient(h)), 1.0)},
        optax.sgd(0.01),
        diagnostics_every=3,
    )
    events = []
    state = init(params)
    with pw.Monitor(
        "lint",
        sinks=[pw.sinks.Callback(lambda r: None, on_event=events.append)],
        alerts=[pw.alerts.FirstStepLint()],
    ) as monitor:
        for i in range(7):
            state, metrics = step(state, batch)
            monitor.record(i, metrics)
    (event,) = events
    assert event.step == 0 and event.attributes == {
        "alert": "FirstStepLint",
        "pipeline": event.attributes["pipeline"],
        "penalty": "hidden",
        "lint": "dead_term",
        "param_grad_norm": 0.0,
    }
    assert "dead term" in event.message


def test_first_step_lint_reports_a_drowning_share_once():
    values = {
        "base_param_grad_norm": 1.0,
        "base_grad_share": 0.05,
        "l1_param_grad_norm": 10.0,
        "l1_grad_share": 0.95,
        "l1_weight": 2.0,
    }
    lint = pw.alerts.FirstStepLint()
    rec = StepRecord(run="r", process=0, step=0, pipeline="p", wall_time=0.0, values=values)
    (event,) = lint.evaluate(rec)
    assert event.attributes["lint"] == "share" and event.attributes["penalty"] == "l1"
    assert lint.evaluate(rec) == []  # only the first diagnostics record
    with pytest.raises(ValueError, match="cosine_below"):
        pw.alerts.GradientTugOfWar(cosine_below=-2.0)
    with pytest.raises(ValueError, match="dead_above"):
        pw.alerts.ActivityCollapse(dead_above=1.5)


def test_dead_fraction_counts_units_zero_for_the_whole_batch():
    from penwatch.training._capture import dead_fraction

    x = np.ones((3, 4))
    x[:, 1] = 0.0
    x[0, 2] = 0.0  # not dead: nonzero elsewhere in the batch
    assert float(dead_fraction(x)) == 0.25
    assert float(jax.jit(dead_fraction)(x)) == 0.25


# --- export ------------------------------------------------------------------------------


def test_prometheus_exports_pair_cosines_update_shares_groups_and_dead_fractions():
    import prometheus_client

    values = {
        "base_grad_share": 1.0,
        "l1_grad_share": 0.0,
        "base_param_grad_norm": 1.0,
        "l1_param_grad_norm": 0.5,
        gram_key("base", "base"): 1.0,
        gram_key("base", "l1"): -0.4,
        gram_key("l1", "l1"): 0.25,
        term_key("l1", "update_share"): 0.2,
        term_key("l1", "suggested_weight"): 0.4,
        group_key("l1", "dense1"): 0.3,
        "hidden_dead_fraction": 0.7,
    }
    sink = pw.sinks.Prometheus(port=None)
    sink.open(pw.schema.RunInfo("r", 0, "0", "cpu", 1, 0.0))
    sink.write_step(
        StepRecord(run="r", process=0, step=1, pipeline="p", wall_time=0.0, values=values)
    )
    text = prometheus_client.generate_latest(sink.registry).decode()
    labels = 'pipeline="p",process="0",run="r"'
    assert f'penwatch_penalty_pair_cosine{{other="l1",penalty="base",{labels}}} -0.8' in text
    assert f'penwatch_penalty_update_share{{penalty="l1",{labels}}} 0.2' in text
    assert f'penwatch_penalty_suggested_weight{{penalty="l1",{labels}}} 0.4' in text
    assert f'penwatch_penalty_group_grad_norm{{group="dense1",penalty="l1",{labels}}} 0.3' in text
    assert f'penwatch_capture_dead_fraction{{capture="hidden",{labels}}} 0.7' in text
    # the pair set is bounded: one series per unordered pair of terms, none for a term with itself
    assert text.count("penwatch_penalty_pair_cosine{") == 1


def test_zero_weight_term_has_a_zero_gram_row_and_is_not_a_dead_term():
    params = {"w": jnp.arange(1.0, 4.0)}
    m = gradient_diagnostics(
        lambda p: (jnp.sum((p["w"] - 1.0) ** 2), {"pull": 0.0 * jnp.sum(p["w"] ** 2)}),
        params,
        weights={"pull": 0.0},
    )
    assert float(m[gram_key("base", "pull")]) == 0.0 and float(m[gram_key("pull", "pull")]) == 0.0
    values = {k: float(v) for k, v in m.items()} | {"pull_weight": 0.0}
    rec = StepRecord(run="r", process=0, step=0, pipeline="p", wall_time=0.0, values=values)
    assert pw.alerts.FirstStepLint().evaluate(rec) == []


def test_custom_preconditioner_function_and_unmirrored_states():
    model, params, batch = _mlp_setup()
    ones = lambda opt_state: jax.tree.map(jnp.ones_like, params)  # noqa: E731
    init, step = pw.training.build_activity_train_step(
        model, _mse, {"hidden": (_l1_mean, 0.5)}, optax.sgd(0.1), diagnostics_every=1,
        preconditioner=ones,
    )  # fmt: skip
    _, m = step(init(params), batch)
    for t in ("base", "hidden"):  # P = 1: the update share is the gradient share
        assert float(m[term_key(t, "update_share")]) == pytest.approx(
            float(m[term_key(t, "grad_share")]), rel=1e-5, abs=1e-7
        )
    # a masked Adam's nu does not mirror the parameters: no preconditioner, no guess
    mask = {"dense1": {"w": True, "b": True}, "dense2": {"w": False, "b": False}}
    masked = optax.masked(optax.adam(0.1), mask)
    assert diagonal_preconditioner(masked.init(params), params) is None
    with pytest.raises(ValueError, match="preconditioner"):
        pw.training.build_train_step(model, _mse, None, optax.sgd(0.1), preconditioner="adam")


def test_gram_needs_the_weights_of_model_terms():
    params = {"w": jnp.arange(1.0, 4.0)}

    def terms(p):
        return jnp.sum((p["w"] - 1.0) ** 2), {"pull": 0.5 * jnp.sum(p["w"] ** 2)}

    assert gram_key("base", "pull") not in gradient_diagnostics(terms, params)
    m = gradient_diagnostics(terms, params, weights={"pull": 0.5})
    ref = 2 * (params["w"] - 1.0) @ (2 * params["w"])  # ⟨ĝ_base, ĝ_pull⟩, unweighted
    assert float(m[gram_key("base", "pull")]) == pytest.approx(float(ref))
    # parameter-only terms carry their weights: the matrix is emitted without `weights`
    only = gradient_diagnostics(
        lambda p: (terms(p)[0], {}), params, param_terms={"l2": l2_term(3.0)}
    )
    assert float(only[gram_key("l2", "l2")]) == pytest.approx(
        float(jnp.sum((2 * params["w"]) ** 2))
    )


def test_key_grammar_parses_gram_group_and_capture_keys():
    from penwatch.schema import capture_key, find_nonfinite, layout_of

    terms = ("base", "a,b", "l1_act")
    values = {term_key(t, "grad_share"): 0.0 for t in terms}
    values.update({gram_key(a, b): 1.0 for i, a in enumerate(terms) for b in terms[i:]})
    values[group_key("l1_act", "dense[0]")] = 2.0
    values[capture_key("hidden", "dead_fraction")] = 0.5
    layout = layout_of(values)
    assert layout.terms == terms
    assert layout.gram_keys[("l1_act", "a,b")] == gram_key("a,b", "l1_act")
    assert layout.group_keys == {("l1_act", "dense[0]"): group_key("l1_act", "dense[0]")}
    assert layout.groups == ("dense[0]",) and layout.captures == ("hidden",)
    rec = StepRecord(run="r", process=0, step=0, pipeline="p", wall_time=0.0, values=values)
    assert rec.gram()[0] == terms and rec.dead_fractions() == {"hidden": 0.5}
    assert rec.group_norms() == {("l1_act", "dense[0]"): 2.0}
    # a NaN in a Gram entry is attributed to the gradients
    bad = {**values, gram_key("base", "base"): float("nan")}
    (found,) = find_nonfinite(tuple(bad.values()), layout_of(bad))
    assert found.key == gram_key("base", "base") and found.source == "gradient"
