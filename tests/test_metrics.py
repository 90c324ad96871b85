"""pw.Metrics: the packed metrics mapping (SPEC section 10)."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import penwatch as pw

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)

X = jax.random.normal(jax.random.key(0), (8, 5))
PIPE = pw.pipeline([("l1", 1e-3), ("l2", 1e-2), ("elastic_net", 0.5)])
BUILTINS = pw.pipelines.builtin_penalties()

MIXED = {
    "f32": jnp.float32(1.25),
    "bf16": jnp.bfloat16(0.3),  # not representable in float32's shorter cousins: 0.30078125
    "flag": jnp.array(False),
    "f16": jnp.float16(-2.5e-3),
    "count": jnp.int32(7),
    "py_float": 0.5,
    "py_bool": True,
    "py_int": 3,
    "np_f64": np.float64(2.0),
    "u8": np.uint8(200),
}


def _big_pipeline(n: int = 32) -> pw.Pipeline:
    names = ["l1", "l2", "elastic_net", "output_magnitude"]
    pipe = pw.Pipeline()
    for i in range(n):
        kind = names[i % len(names)]
        pipe = pipe.add(f"{kind}_{i}", BUILTINS[kind], weight=1e-3 * (i + 1))
    return pipe


# --- packing ----------------------------------------------------------------------


def test_pack_groups_values_by_dtype_and_keeps_them_exact():
    m = pw.Metrics.pack(MIXED)
    assert [b.dtype for b in m.buffers] == [jnp.float32, jnp.bool_, jnp.int32]
    assert [b.shape for b in m.buffers] == [(5,), (2,), (3,)]
    for key, value in MIXED.items():
        got = m[key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(value)))
    # bf16/f16 values are exact in the float32 buffer, and read back in their own dtype
    assert m["bf16"].dtype == jnp.bfloat16 and m["f16"].dtype == jnp.float16
    assert float(m["bf16"]) == float(jnp.bfloat16(0.3)) == 0.30078125
    assert m.scalars()["bf16"] == 0.30078125
    assert m["flag"].dtype == jnp.bool_ and m["count"].dtype == jnp.int32
    assert m["u8"].dtype == jnp.uint8 and int(m["u8"]) == 200
    assert m["py_int"].dtype == jnp.int32 and m["py_float"].dtype == jnp.float32


def test_keys_keep_insertion_order_and_penalties_travel_as_data():
    values = {"z": 1.0, "a_finite": True, "a": 2.0, "_r": {"x": 1}, "m": jnp.ones(2), "b": 3}
    m = pw.Metrics.pack(values, penalties=["z", "a"])
    assert list(m) == list(values) and list(m.keys()) == list(values)
    assert m.scalar_keys == ("z", "a_finite", "a", "b")
    assert m.penalties == ("z", "a")
    assert len(m) == 6 and "a" in m and "_r" in m and "nope" not in m and 3 not in m
    assert list(m.scalars()) == ["z", "a_finite", "a", "b"]


def test_reserved_and_non_scalar_values_stay_unpacked():
    leaf = {"params": {"['w']": (jnp.int32(0), jnp.int32(1))}}
    cos = jnp.eye(3)
    m = pw.Metrics.pack({"loss": 1.0, "pairwise_cosine": cos, "_leaf_nonfinite": leaf, "_note": 1})
    assert m.scalar_keys == ("loss",)
    assert set(m.reserved) == {"_leaf_nonfinite", "_note"}
    assert m.reserved["_leaf_nonfinite"] is leaf and m["_leaf_nonfinite"] is leaf
    assert isinstance(m["_note"], int)  # not packed, not converted
    assert set(m.arrays) == {"pairwise_cosine"} and m["pairwise_cosine"] is cos
    assert m.scalars() == {"loss": 1.0}
    assert len(m.buffers) == 1
    assert not m.packed_only
    assert m.unpacked_keys == ("pairwise_cosine", "_leaf_nonfinite", "_note")
    assert pw.Metrics.pack({"loss": 1.0, "ok": True}).packed_only
    assert not pw.Metrics.pack({"loss": 1.0, "_r": 1}).packed_only
    assert not pw.Metrics.pack({"loss": 1.0, "m": jnp.ones(2)}).packed_only


def test_scalars_equal_per_key_values_and_read_numpy_buffers_too():
    _, m = PIPE.compute(X, track_grad_norms=True)
    got = m.scalars()
    assert list(got) == list(m.scalar_keys) == list(m)
    for key, value in got.items():
        assert isinstance(value, float)
        assert value == pytest.approx(float(m[key]), rel=1e-6)
    assert got["l1_finite"] == 1.0
    assert jax.device_get(m).scalars() == got


def test_scalars_of_every_dtype_group_and_of_replaced_slots_in_key_order():
    # float, bool, int and bfloat16 groups, keys interleaved across groups, and a merge
    # that leaves a replaced value unread in its buffer (its offset must be skipped)
    m = pw.Metrics.pack(
        {"a": jnp.float32(0.5), "ok": True, "n": jnp.int32(7), "h": jnp.bfloat16(1.5),
         "b": jnp.float32(-2.0), "bad": False}
    )  # fmt: skip
    m = m.merge({"a": jnp.float32(3.0), "c": jnp.float32(4.0)})
    got = m.scalars()
    assert list(got) == ["a", "ok", "n", "h", "b", "bad", "c"]
    assert got == {"a": 3.0, "ok": 1.0, "n": 7.0, "h": 1.5, "b": -2.0, "bad": 0.0, "c": 4.0}
    assert all(type(v) is float for v in got.values())
    assert pw.Metrics.pack({"only": 2.5}).scalars() == {"only": 2.5}
    assert pw.Metrics.pack({"_reserved": jnp.ones(2)}).scalars() == {}


def test_scalar_rows_of_many_equal_their_scalars_for_every_dtype_group():
    # the dispatcher's batch read: every dtype group, a replaced slot, NaN/Inf, float16
    def make(i: int) -> pw.Metrics:
        m = pw.Metrics.pack(
            {"a": jnp.float32(0.5 * i), "ok": i % 2 == 0, "n": jnp.int32(i),
             "h": jnp.bfloat16(1.5 + i), "f16": jnp.float16(0.1 * i),
             "b": jnp.float32([np.nan, np.inf, -2.0][i % 3]), "bad": False},
            penalties=["a"],
        )  # fmt: skip
        return m.merge({"a": jnp.float32(3.0 + i), "c": jnp.float32(1e-7 * i)})

    many = [make(i) for i in range(7)]
    rows = pw.Metrics.scalar_rows(many)
    for m, row in zip(many, rows, strict=True):
        assert isinstance(row, tuple) and all(type(v) is float for v in row)
        want = list(m.scalars().values())
        np.testing.assert_array_equal(row, want)  # bit for bit, NaN included
    only_float = [pw.Metrics.pack({"x": jnp.float32(i / 3)}) for i in range(3)]
    assert pw.Metrics.scalar_rows(only_float) == [(m.scalars()["x"],) for m in only_float]
    assert pw.Metrics.scalar_rows([]) == []
    host = [jax.device_get(m) for m in many[:2]]  # NumPy buffers read the same way
    np.testing.assert_array_equal(pw.Metrics.scalar_rows(host), rows[:2])


def test_scalar_rows_refuses_mixed_structures_and_batched_buffers():
    a, b = pw.Metrics.pack({"x": 1.0}), pw.Metrics.pack({"y": 1.0})
    with pytest.raises(ValueError, match="differ in structure"):
        pw.Metrics.scalar_rows([a, b])
    batched = jax.vmap(lambda v: pw.Metrics.pack({"x": v}))(jnp.arange(3.0))
    with pytest.raises(ValueError, match="unbatched"):
        pw.Metrics.scalar_rows([batched, batched])


def test_item_assignment_and_attribute_changes_are_refused():
    m = pw.Metrics.pack({"a": 1.0})
    with pytest.raises(TypeError):
        m["a"] = 2.0  # type: ignore[index]
    with pytest.raises(TypeError):
        del m["a"]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="immutable"):
        m.penalties = ("x",)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"Metrics\.pack"):
        pw.Metrics({"a": 1.0})
    copy = dict(m)
    copy["a"] = 3.0
    assert float(m["a"]) == 1.0 and isinstance(copy, dict)


def test_merge_adds_and_replaces_keys_reusing_the_buffers():
    _, m = PIPE.compute(X)
    more = m.merge({"loss": jnp.float32(4.0), "total": jnp.float32(-1.0), "ok": True})
    assert list(more) == [*list(m), "loss", "ok"]  # total replaced in place
    assert float(more["total"]) == -1.0 and float(more["loss"]) == 4.0
    assert more.penalties == m.penalties == ("l1", "l2", "elastic_net")
    assert [b.dtype for b in more.buffers] == [jnp.float32, jnp.bool_]
    assert float(more["l2"]) == pytest.approx(float(m["l2"]))
    other = pw.Metrics.pack({"kl": 0.5}, penalties=["kl"])
    assert m.merge(other).penalties == ("l1", "l2", "elastic_net", "kl")
    assert m.merge(other, penalties=["kl"]).penalties == ("kl",)


def test_from_columns_packs_vectors_in_any_key_order():
    v = jnp.array([0.5, 2.0], jnp.bfloat16)
    m = pw.Metrics.from_columns(
        [(["a", "b"], v), (["a_finite", "b_finite"], jnp.isfinite(v))],
        order=["a", "a_finite", "b", "b_finite"],
        penalties=["a", "b"],
    )
    assert list(m) == ["a", "a_finite", "b", "b_finite"]
    assert [b.dtype for b in m.buffers] == [jnp.float32, jnp.bool_]
    assert m["b"].dtype == jnp.bfloat16 and float(m["b"]) == 2.0
    assert m.scalars() == {"a": 0.5, "a_finite": 1.0, "b": 2.0, "b_finite": 1.0}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pw.Metrics.pack([("a", 1.0)]), TypeError, r"argument 'values' must be a mapp"),
        (lambda: pw.Metrics.pack({1: 1.0}), TypeError, r"keys must be strings, got 1"),
        (lambda: pw.Metrics.pack({"a": "x"}), TypeError, r"entry 'a' must be a real .*got 'x'"),
        (lambda: pw.Metrics.pack({"a": None}), TypeError, r"entry 'a' .*got None"),
        (lambda: pw.Metrics.pack({"a": 1j}), TypeError, r"entry 'a'"),
        (lambda: pw.Metrics.pack({"a": 1.0}, penalties="a"), TypeError, r"option 'penalties'"),
        (lambda: pw.Metrics.pack({"a": 1.0}, penalties=[1]), TypeError, r"hold strings, got 1"),
        (
            lambda: pw.Metrics.from_columns([(["a", "b"], jnp.ones(3))]),
            ValueError,
            r"column \['a', 'b'\] must have 2 entries",
        ),
        (
            lambda: pw.Metrics.from_columns([(["a"], jnp.ones(1)), (["a"], jnp.ones(1))]),
            ValueError,
            r"keys \['a'\] appear more than once",
        ),
        (
            lambda: pw.Metrics.from_columns([(["a"], jnp.ones(1))], order=["b"]),
            ValueError,
            r"option 'order' must be a permutation",
        ),
        (
            lambda: pw.Metrics.from_columns([(["_a"], jnp.ones(1))]),
            TypeError,
            r"strings not starting with '_'",
        ),
        (lambda: pw.Metrics.pack({}).merge(3), TypeError, r"merge: arguments must be mappings"),
    ],
)
def test_bad_input_names_the_argument_the_value_and_what_is_allowed(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- JAX: jit, vmap, grad, device_get, pickle ---------------------------------------


def test_getitem_inside_and_outside_jit():
    _, m = PIPE.compute(X)
    doubled = jax.jit(lambda m: m["l2"] * 2)(m)
    np.testing.assert_allclose(doubled, 2 * pw.l2(X), rtol=1e-6)
    np.testing.assert_allclose(m["l2"], pw.l2(X), rtol=1e-6)

    @jax.jit
    def inside(x):
        _, metrics = PIPE.compute(x)
        assert isinstance(metrics, pw.Metrics)
        return metrics["l1"], metrics["l1_finite"], metrics

    l1, finite, out = inside(X)
    np.testing.assert_allclose(l1, pw.l1(X), rtol=1e-6)
    assert finite.dtype == jnp.bool_ and bool(finite)
    assert isinstance(out, pw.Metrics) and list(out) == list(m)


def test_vmap_gives_batched_buffers_equal_to_a_loop():
    xs = jax.random.normal(jax.random.key(1), (4, 8, 5))
    _, batched = jax.vmap(lambda x: PIPE.compute(x, track_grad_norms=True))(xs)
    assert isinstance(batched, pw.Metrics)
    assert all(b.shape[0] == 4 and b.ndim == 2 for b in batched.buffers)
    assert batched["l1"].shape == (4,) and batched["l1_finite"].shape == (4,)
    for i in range(4):
        _, one = PIPE.compute(xs[i], track_grad_norms=True)
        for key in one:
            np.testing.assert_allclose(batched[key][i], one[key], rtol=1e-5)
    with pytest.raises(ValueError, match="unbatched"):
        batched.scalars()


def test_scan_stacks_metrics_over_steps():
    def body(carry, x):
        _, m = PIPE.compute(x)
        return carry, m

    _, stacked = jax.lax.scan(body, 0, jax.random.normal(jax.random.key(2), (3, 8, 5)))
    assert stacked["total"].shape == (3,) and stacked.penalties == PIPE.names


def test_grad_through_a_metrics_entry_matches_compute_total():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(3), (8, 5), jnp.float64)
        pipe = pw.pipeline([("l1", 1e-3), ("l2", 1e-2), ("elastic_net", 0.5)])
        _, m = pipe.compute(x)
        assert m.buffers[0].dtype == jnp.float64  # float64 values stay exact under x64
        g_metrics = jax.grad(lambda x: pipe.compute(x)[1]["total"])(x)
        g_total = jax.grad(pipe.compute_total)(x)
        np.testing.assert_allclose(g_metrics, g_total, rtol=1e-12, atol=1e-15)
        check_grads(lambda x: pipe.compute(x)[1]["l2_weighted"], (x,), order=1, modes=["rev"])
    g32 = jax.grad(lambda x: PIPE.compute(x)[1]["total"])(X)
    np.testing.assert_allclose(g32, jax.grad(PIPE.compute_total)(X), rtol=1e-5, atol=1e-7)


def test_metrics_as_aux_of_value_and_grad():
    def loss(x):
        total, m = PIPE.compute(x)
        return total, m

    (total, m), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(X)
    assert isinstance(m, pw.Metrics) and float(m["total"]) == pytest.approx(float(total))
    np.testing.assert_allclose(grad, jax.grad(PIPE.compute_total)(X), rtol=1e-5, atol=1e-7)


def test_device_get_gives_numpy_buffers_with_the_same_values():
    _, m = PIPE.compute(X, track_grad_norms=True)
    host = jax.device_get(m)
    assert isinstance(host, pw.Metrics) and list(host) == list(m)
    assert all(isinstance(b, np.ndarray) for b in host.buffers)
    for key in m:
        np.testing.assert_array_equal(np.asarray(host[key]), np.asarray(m[key]))
    assert host.scalars() == m.scalars()


@pytest.mark.parametrize("on_host", [False, True])
def test_pickle_round_trips(on_host):
    m = pw.Metrics.pack(
        {**MIXED, "pairwise_cosine": jnp.eye(2), "_note": jnp.int32(0)},
        penalties=["f32"],
    )
    if on_host:
        m = jax.device_get(m)
    back = pickle.loads(pickle.dumps(m))
    assert isinstance(back, pw.Metrics) and list(back) == list(m)
    assert back.penalties == ("f32",) and back.scalars() == m.scalars()
    assert type(back.buffers[0]) is type(m.buffers[0])
    np.testing.assert_array_equal(back["pairwise_cosine"], np.eye(2))
    assert jax.tree.structure(back) == jax.tree.structure(m)


def test_one_compilation_for_100_calls_with_new_weights():
    traces = []

    @jax.jit
    def f(pipe, x):
        traces.append(1)
        return pipe.compute(x)

    pipe = PIPE
    for i in range(100):
        pipe = pipe.update_weight("l1", 1e-3 * (i + 1))
        _, m = f(pipe, X)
    assert len(traces) == 1 and f._cache_size() == 1
    assert float(m["l1_weight"]) == pytest.approx(0.1)


def test_jitted_compute_of_32_penalties_has_a_few_packed_outputs():
    pipe = _big_pipeline(32)
    x = jax.random.normal(jax.random.key(4), (256, 64))
    f = jax.jit(lambda p, x: p.compute(x))
    total, m = f(pipe, x)
    assert len(m) == 32 * 4 + 1 and len(m.buffers) <= 3
    assert [b.shape for b in m.buffers] == [(32 * 3 + 1,), (32,)]
    compiled = f.lower(pipe, x).compile()
    assert compiled.out_tree.num_leaves == 1 + len(m.buffers)  # total + the buffers
    assert len(jax.tree.leaves((total, m))) == 3
    np.testing.assert_allclose(m["total"], pipe.compute_total(x), rtol=1e-5)


def test_repr_shows_keys_and_values_and_never_fails_on_tracers():
    m = pw.Metrics.pack({"l1": 0.5, "l1_finite": True, "_r": {"a": 1}, "c": jnp.eye(2)})
    text = repr(m)
    assert "'l1': 0.5" in text and "'l1_finite': True" in text
    assert "<reserved>" in text and "<array (2, 2)>" in text
    seen = []
    jax.jit(lambda x: seen.append(repr(PIPE.compute(x)[1])))(X)
    assert "keys=['l1'" in seen[0] and "float32[10]" in seen[0]


# --- what penwatch returns ------------------------------------------------------------


def test_pipelines_and_train_steps_return_metrics_in_pipeline_order():
    pipe = pw.pipeline([("l2", 1e-2), ("l1", 1e-3)])
    _, m = pipe.compute(X)
    assert isinstance(m, pw.Metrics) and m.penalties == ("l2", "l1")
    assert list(m)[:4] == ["l2", "l2_weighted", "l2_weight", "l2_finite"]

    multi = pw.multi_pipeline([("kl", 0.1, ("s", "t")), ("l2", 1e-3, ("s",))])
    lp = jax.nn.log_softmax(X)
    _, mm = multi.compute({"s": lp, "t": lp[::-1]})
    assert isinstance(mm, pw.Metrics) and mm.penalties == ("kl", "l2")

    init_fn, step_fn = pw.training.build_train_step_with_weight_decay(
        lambda p, x: x @ p["w"], optax.l2_loss, pipe, optax.sgd(0.1), diagnostics_every=2
    )
    state = init_fn({"w": jnp.ones((5, 3))})
    y = jnp.zeros((8, 3))
    for _ in range(3):
        state, sm = step_fn(state, (X, y))
        assert isinstance(sm, pw.Metrics)
        assert sm.penalties == ("l2", "l1", "weight_decay")
        assert len(sm.buffers) == 2  # float32 metrics, bool flags
        assert "_leaf_nonfinite" in sm.reserved and "_leaf_nonfinite" not in sm.scalar_keys
        assert list(sm)[:2] == ["loss", "base_loss"]
    values = sm.scalars()
    assert values["loss"] == pytest.approx(values["base_loss"] + values["total"], rel=1e-5)
    assert values["total"] == pytest.approx(
        values["l2_weighted"] + values["l1_weighted"] + values["weight_decay_weighted"],
        rel=1e-5,
    )
    assert step_fn.plain._cache_size() == 1
