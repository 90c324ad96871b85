"""weight_schedule / apply_scheduled_weights: documented values, validation, no recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import penwatch as pw
from penwatch import training
from penwatch.diagnostics import l2_term

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)


@pytest.mark.parametrize(
    ("spec", "total", "expected"),
    [
        # linear: start + (end - start) * min(e / max(E - 1, 1), 1)
        (("linear", 0.0, 0.01), 11, {0: 0.0, 5: 0.005, 10: 0.01, 20: 0.01}),
        (("linear", 1.0, 0.0), 5, {0: 1.0, 1: 0.75, 2: 0.5, 4: 0.0}),
        (("linear", 0.2, 0.4), 1, {0: 0.2, 1: 0.4}),  # one epoch: max(E - 1, 1) = 1
        # warmup: final * min(e / n, 1)
        (("warmup", 0.1, 10), 100, {0: 0.0, 5: 0.05, 9: 0.09, 10: 0.1, 50: 0.1}),
        (("warmup", 0.3, 0), 10, {0: 0.3, 3: 0.3}),
        # decay: initial * rate ** e
        (("decay", 1.0, 0.5), 10, {0: 1.0, 1: 0.5, 3: 0.125}),
        (("decay", 0.2, 0.9), 10, {2: 0.2 * 0.81}),
        # constant
        (("constant", 0.001), 10, {0: 0.001, 9: 0.001}),
    ],
)
def test_schedule_values_at_given_epochs(spec, total, expected):
    fn = pw.weight_schedule({"p": spec})
    for epoch, value in expected.items():
        assert fn(epoch, total)["p"] == pytest.approx(value, rel=1e-12, abs=1e-15)


def test_optax_schedules_are_evaluated_at_the_epoch():
    cosine = optax.cosine_decay_schedule(1.0, decay_steps=10)
    linear = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    fn = pw.weight_schedule({"a": cosine, "b": linear, "c": ("constant", 2.0)})
    for epoch in (0, 2, 5, 10, 12):
        w = fn(epoch, 20)
        assert float(w["a"]) == pytest.approx(0.5 * (1 + np.cos(np.pi * min(epoch, 10) / 10)))
        assert float(w["b"]) == pytest.approx(min(epoch / 4, 1.0))
        assert w["c"] == 2.0
    assert fn.names == ("a", "b", "c")


def test_seed_readme_example():
    fn = pw.weight_schedule(
        {"l2": ("linear", 0.0, 0.01), "kl": ("warmup", 0.1, 10), "entropy": ("constant", 0.001)}
    )
    w = fn(5, 100)
    assert w["l2"] == pytest.approx(0.01 * 5 / 99)
    assert w["kl"] == pytest.approx(0.05)
    assert w["entropy"] == 0.001


@pytest.mark.parametrize(
    ("schedules", "match"),
    [
        ({"p": ("cubic", 1.0, 2.0)}, r"weight_schedule.*schedules\['p'\].*'linear'"),
        ({"p": ("linear", 1.0)}, r"'linear' schedule with 2 value"),
        ({"p": ("warmup", 0.1, 2.5)}, r"epochs.*integer"),
        ({"p": ("warmup", 0.1, -1)}, r"epochs.*>= 0"),
        ({"p": ("decay", 1.0, -0.5)}, r"rate.*>= 0"),
        ({"p": ("constant", float("nan"))}, r"finite"),
        ({"p": 0.5}, r"schedules\['p'\]"),
        ([("p", ("constant", 1.0))], r"mapping"),
    ],
)
def test_bad_schedules_raise_value_error(schedules, match):
    with pytest.raises(ValueError, match=match):
        pw.weight_schedule(schedules)


def test_bad_epochs_raise_value_error():
    fn = pw.weight_schedule({"p": ("constant", 1.0)})
    with pytest.raises(ValueError, match="epoch"):
        fn(-1, 10)
    with pytest.raises(ValueError, match="total_epochs"):
        fn(0, 0)


def test_apply_scheduled_weights_to_pipeline_and_state():
    pipe = pw.pipeline([("l1", 0.0), ("l2", 0.0)])
    fn = pw.weight_schedule({"l1": ("linear", 0.0, 1.0), "l2": ("decay", 1.0, 0.5)})
    new = pw.apply_scheduled_weights(pipe, fn(2, 5))
    assert float(new.weights["l1"]) == pytest.approx(0.5)
    assert float(new.weights["l2"]) == pytest.approx(0.25)
    assert float(pipe.weights["l1"]) == 0.0  # immutable
    with pytest.raises(KeyError, match="kl"):
        pw.apply_scheduled_weights(pipe, {"kl": 0.1})

    init, _ = training.build_train_step(
        lambda p, x: x @ p["w"],
        optax.l2_loss,
        pipe,
        optax.sgd(0.1),
        param_terms={"decay": l2_term(0.0)},
    )
    state = init({"w": jnp.ones((2, 1))})
    state = pw.apply_scheduled_weights(state, {"l1": 0.3, "decay": 0.2})
    assert float(state.pipeline.weights["l1"]) == pytest.approx(0.3)
    assert float(state.param_terms["decay"].weight) == pytest.approx(0.2)
    assert state.param_terms["decay"].weight.dtype == jnp.float32
    with pytest.raises(KeyError):
        pw.apply_scheduled_weights(state, {"missing": 1.0})
    with pytest.raises(ValueError, match="weights"):
        pw.apply_scheduled_weights(pipe, [("l1", 1.0)])


def test_scheduled_weights_never_recompile():
    traces = []

    @jax.jit
    def objective(pipe, x):
        traces.append(1)
        return pipe.compute_total(x)

    pipe = pw.pipeline([("l1", 0.0), ("l2", 0.0)])
    fn = pw.weight_schedule(
        {"l1": ("linear", 0.0, 1.0), "l2": optax.exponential_decay(1.0, 1, 0.5)}
    )
    x = jnp.array([1.0, -2.0])
    for epoch in range(6):
        pipe = pw.apply_scheduled_weights(pipe, fn(epoch, 6))
        expected = epoch / 5 * 3.0 + 0.5**epoch * 5.0
        assert float(objective(pipe, x)) == pytest.approx(expected, rel=1e-6)
    assert len(traces) == 1
