"""validate (host side) and finite_report (jit-safe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

NAN, INF = float("nan"), float("inf")


def test_finite_array_is_ok():
    result = pw.validate(jnp.ones((2, 3)))
    assert result == pw.Validation(ok=True, kind=None, nan_count=0, inf_count=0, path=None)
    assert result  # truthy when ok


@pytest.mark.parametrize(
    "values, kind, nans, infs",
    [
        ([1.0, NAN], "nan", 1, 0),
        ([INF, 1.0, -INF], "inf", 0, 2),
        ([INF, NAN, NAN], "nan", 2, 1),  # NaN wins over Inf
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_counts_and_kind(values, kind, nans, infs, dtype):
    x = np.asarray(values).astype(jnp.dtype(dtype))
    for arr in (x, jnp.asarray(x)):
        result = pw.validate(arr)
        assert not result
        assert (result.ok, result.kind, result.nan_count, result.inf_count, result.path) == (
            False,
            kind,
            nans,
            infs,
            None,
        )


def test_integer_and_bool_arrays_are_always_ok():
    assert pw.validate(jnp.arange(5)).ok
    assert pw.validate(np.array([True, False])).ok
    assert pw.validate({"steps": np.int64(3), "w": jnp.zeros(2)}).ok


def test_python_scalars_and_non_numeric_leaves():
    assert pw.validate(1.5).ok
    assert pw.validate(NAN).kind == "nan"
    assert pw.validate({"name": "run-1", "x": 2.0}).ok  # strings are ignored


def test_pytree_path_of_first_non_finite_leaf():
    tree = {
        "encoder": {"w": jnp.ones(3), "b": jnp.array([0.0, INF])},
        "head": [jnp.zeros(2), jnp.array([NAN, NAN, 1.0])],
    }
    result = pw.validate(tree)
    # flattening order: encoder.b, encoder.w, head[0], head[1]
    assert result.path == "['encoder']['b']"
    assert result.kind == "nan"  # NaN anywhere wins, even though the first leaf holds Inf
    assert (result.nan_count, result.inf_count) == (2, 1)
    assert pw.validate({"a": [1.0, jnp.array([NAN])]}).path == "['a'][1]"


def test_raise_on_error_carries_the_fields():
    tree = {"params": {"w": jnp.array([1.0, NAN, INF])}}
    with pytest.raises(pw.NonFiniteError) as info:
        pw.validate(tree, raise_on_error=True)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.kind, err.nan_count, err.inf_count, err.path) == ("nan", 1, 1, "['params']['w']")
    assert err.validation == pw.validate(tree)
    assert "1 NaN, 1 Inf" in str(err) and "['params']['w']" in str(err)
    with pytest.raises(
        ValueError, match=r"penwatch\.validate: found non-finite values, kind 'inf'"
    ):
        pw.validate(jnp.array([INF]), raise_on_error=True)
    assert pw.validate(jnp.ones(2), raise_on_error=True).ok  # no raise when finite


def test_validate_refuses_traced_values():
    with pytest.raises(TypeError, match="finite_report"):
        jax.jit(pw.validate)(jnp.ones(2))


_report = jax.jit(pw.finite_report)


def test_finite_report_inside_jit():
    tree = {
        "a": jnp.array([INF, 1.0, NAN, NAN]),
        "b": (jnp.array([-INF], jnp.bfloat16), jnp.arange(3)),
        "c": jnp.float16(NAN),
    }
    report = _report(tree)
    assert set(report) == {"nan_count", "inf_count"}
    assert all(v.shape == () and v.dtype == jnp.int32 for v in report.values())
    assert (int(report["nan_count"]), int(report["inf_count"])) == (3, 2)
    clean = _report(
        {"a": jnp.ones(4), "b": (jnp.zeros(1, jnp.bfloat16), jnp.arange(3)), "c": jnp.float16(0)}
    )
    assert (int(clean["nan_count"]), int(clean["inf_count"])) == (0, 0)


def test_finite_report_of_a_penalty_in_a_compiled_step():
    @jax.jit
    def step(x):
        value = pw.l2(x)
        return value, pw.finite_report({"value": value, "grad": jax.grad(pw.l2)(x)})

    _, report = step(jnp.array([1.0, INF]))
    assert int(report["inf_count"]) >= 1
    _, report = step(jnp.array([1.0, 2.0]))
    assert int(report["nan_count"]) == int(report["inf_count"]) == 0
