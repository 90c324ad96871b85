"""Flax NNX and Equinox, idiomatic (SPEC section 14): the examples' hand-written loops
train, their gradient diagnostics match an independent computation, and the monitor
records every step and names a non-finite one. (Flax Linen: tests/test_flax.py.)"""

from __future__ import annotations

import importlib.util
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EXAMPLES

import penwatch as pw
from penwatch import store

pytest.importorskip("flax")
pytest.importorskip("equinox")

STEPS, NAN_AT, EVERY = 30, 15, 10


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


nnx_example = _example("nnx_training")
eqx_example = _example("equinox_training")


def _nnx_terms(model, x, y):
    """Per-term parameter gradients of the NNX model, computed directly with jax.grad."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pipe = nnx_example.make_pipeline()

    def logprobs(p):
        return jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(x))

    return params, logprobs, pipe


def _eqx_terms(model, x, y):
    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_inexact_array)
    pipe = eqx_example.make_pipeline()

    def logprobs(p):
        return eqx_example.log_probs(eqx.combine(p, static), x)

    return params, logprobs, pipe


def _nll(logprobs, labels):
    return -jnp.take_along_axis(logprobs, labels[:, None], axis=1)[:, 0]


def _reference_diagnostics(params, logprobs, pipe, y) -> dict[str, float]:
    """Norms and shares from one jax.grad per term (float64 on the host)."""
    terms = {
        "base": lambda p: jnp.mean(_nll(logprobs(p), y)),
        "entropy": lambda p: pipe.compute(logprobs(p))[1]["entropy_weighted"],
        "output_magnitude": lambda p: pipe.compute(logprobs(p))[1]["output_magnitude_weighted"],
        "l2": lambda p: nnx_example.L2.value_and_grad(p)[0],
    }
    grads = {
        t: np.concatenate(
            [np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(jax.grad(f)(params))]
        )
        for t, f in terms.items()
    }
    total = sum(grads.values())
    out = {}
    for t, g in grads.items():
        out[f"{t}_param_grad_norm"] = float(np.linalg.norm(g))
        out[f"{t}_grad_share"] = float(g @ total / (total @ total))
    return out


FRAMEWORKS = {
    "nnx": (nnx_example, _nnx_terms),
    "equinox": (eqx_example, _eqx_terms),
}


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_diagnostics_match_per_term_jax_grad(framework):
    example, terms = FRAMEWORKS[framework]
    if framework == "nnx":
        from flax import nnx

        model = example.Classifier(rngs=nnx.Rngs(0))
    else:
        model = example.Classifier(jax.random.key(0))
    x, y = example.make_data()
    got = example.diagnose(model, example.make_pipeline(), x, y)
    ref = _reference_diagnostics(*terms(model, x, y), y)
    for key, value in ref.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=2e-4, atol=1e-7, err_msg=key)
    shares = sum(
        float(got[f"{t}_grad_share"]) for t in ("base", "entropy", "output_magnitude", "l2")
    )
    assert shares == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_training_loop_with_monitor_records_every_step_and_names_the_nan(framework, tmp_path):
    example, _ = FRAMEWORKS[framework]
    db = tmp_path / "runs.db"
    seen = []
    monitor = pw.Monitor(
        f"{framework}-test",
        sinks=[pw.sinks.SQLite(db), pw.sinks.Callback(seen.append)],
        alerts=[pw.alerts.NonFinite()],
    )
    with monitor:
        _, history = example.train(
            monitor, steps=STEPS, diagnostics_every=EVERY, inject_nan_at=NAN_AT
        )
    assert [r.step for r in seen] == list(range(STEPS))
    assert {r.pipeline for r in seen} == {framework}
    # it learns, and the NaN batch's update was skipped (the next steps are finite)
    assert history[-1]["base_loss"] < 0.5 * history[0]["base_loss"]
    assert math.isnan(history[NAN_AT]["base_loss"])
    assert all(math.isfinite(h["base_loss"]) for h in history[NAN_AT + 1 :])
    # diagnostics every EVERY steps, penalties in pipeline order
    assert seen[0].penalties == ("entropy", "output_magnitude")
    assert [r.step for r in seen if "base_grad_share" in r.values] == list(range(0, STEPS, EVERY))
    # a NaN batch: the model's outputs are NaN, so the penalties on them (computed first,
    # in pipeline order) and the base loss all are; the first offender is the first penalty
    bad = seen[NAN_AT]
    assert bad.first_offender.key == "entropy"
    assert {"entropy", "output_magnitude", "base_loss"} <= {nf.key for nf in bad.nonfinite}
    assert all(r.ok for r in seen if r.step != NAN_AT)
    reader = store.StoreReader(db)
    (run,) = reader.runs()
    assert run.status == "finished" and run.last_step == STEPS - 1
    events = reader.events([run.id])
    assert [(e.step, e.name) for e in events] == [(NAN_AT, "NonFinite")]


@pytest.mark.parametrize("name", ["nnx_training", "equinox_training"])
def test_example_script_runs(name, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PENWATCH_EXAMPLE_QUICK", "1")
    example = nnx_example if name == "nnx_training" else eqx_example
    example.main(["--steps", "20", "--db", str(tmp_path / "x.db"), "--inject-nan-at", "5"])
    out = capsys.readouterr().out
    assert "steps ==" in out and "base_loss" in out and "gradient shares at step 0" in out
    assert "monitor: 20 steps recorded, 1 events" in out
