"""NaN forensics (SPEC section 13): capsules of the first non-finite step, replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import penwatch as pw
from penwatch import forensics
from penwatch.schema import leaf_reports

HERE = Path(__file__).resolve()


def _line_of(marker: str) -> int:
    lines = HERE.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line and "_line_of" not in line)


# --- models with a known offending line ------------------------------------------------


def confidence(probs):
    """An unclamped confidence penalty: -mean(sum p log p) reaches log(0)."""
    return jnp.mean(jnp.sum(probs * jnp.log(probs), axis=-1))  # LOG-LINE


def softmax_apply(params, x):
    return jax.nn.softmax(x @ params["out"]["w"], axis=-1)


def sqrt_apply(params, x):
    return jnp.sqrt(jnp.maximum(x @ params["w"], 0.0))  # SQRT-LINE


W0 = jnp.zeros((3, 4)).at[0].set(jnp.arange(4.0) * 0.01)


def _mse(pred, y):
    return (pred - y) ** 2


def _confidence_step(directory):
    pipe = pw.Pipeline(name="p").add("confidence", confidence, weight=0.1)
    return pw.build_train_step(
        softmax_apply, _mse, pipe, optax.sgd(0.1), nan_capsule=directory, skip_nonfinite=True
    )


def _confidence_run(directory, steps=6, bad=(3, 4)):
    init, step = _confidence_step(directory)
    state = init({"out": {"w": W0}})
    x, y = jnp.ones((2, 3)), jnp.full((2, 4), 0.25)
    good = jnp.ones((2, 3))
    for i in range(steps):
        # a huge input saturates the softmax: a probability reaches exactly 0
        batch = (jnp.array([[1e4, -1e4, 0.0], [1.0, 1.0, 1.0]]), y) if i in bad else (good, y)
        state, _ = step(state, batch)
    step.capsules.flush()
    return init, step, state, x


# --- the capsule ----------------------------------------------------------------------


def test_capsule_holds_the_first_nonfinite_step_and_loads_without_penwatch(tmp_path):
    _, step, _, _ = _confidence_run(tmp_path, bad=(3, 4))
    capsules = step.capsules
    assert [p.name for p in capsules.written] == ["step_00000003"]  # one episode, its first
    assert capsules.nonfinite_steps == 2 and capsules.episodes == 1
    path = capsules.written[0]
    # Plain NumPy + json: every leaf by its keystr path, exactly the step's inputs.
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == forensics.FORMAT and manifest["step"] == 3
    with np.load(path / "inputs.npz") as npz:
        assert sorted(npz.files) == sorted(e["path"] for e in manifest["leaves"])
        x = npz["[1][0]"]  # batch x
    np.testing.assert_array_equal(x, [[1e4, -1e4, 0.0], [1.0, 1.0, 1.0]])
    assert manifest["report"]["nonfinite"][0]["key"] == "confidence"


def test_capsule_loads_in_a_process_without_penwatch(tmp_path):
    _, step, _, _ = _confidence_run(tmp_path, bad=(2,))
    path = step.capsules.written[0]
    code = (
        "import json, sys, numpy as np\n"
        "sys.modules['penwatch'] = None  # importing penwatch would fail\n"
        f"m = json.load(open({str(path / 'manifest.json')!r}))\n"
        f"z = np.load({str(path / 'inputs.npz')!r})\n"
        "print(m['step'], z[\"[0].params['out']['w']\"].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "(3,", "4)"]


def test_one_capsule_per_episode_at_most_max_capsules(tmp_path):
    writer = forensics.CapsuleWriter(tmp_path, max_capsules=2)
    init, step = _confidence_step(writer)
    state = init({"out": {"w": W0}})
    y = jnp.full((2, 4), 0.25)
    bad = jnp.array([[1e4, -1e4, 0.0], [1.0, 1.0, 1.0]])
    for i in range(9):
        x = bad if i in (1, 2, 4, 7) else jnp.ones((2, 3))
        state, _ = step(state, (x, y))
    writer.close()
    assert [p.name for p in writer.written] == ["step_00000001", "step_00000004"]
    assert writer.episodes == 3 and writer.skipped == 1 and writer.nonfinite_steps == 4


def test_capsules_disabled_or_enabled_compile_the_same_program(tmp_path):
    state_batch = None
    texts = []
    for capsule in (None, tmp_path):
        init, step = _confidence_step(capsule)
        state = init({"out": {"w": W0}})
        state_batch = (state, (jnp.ones((2, 3)), jnp.full((2, 4), 0.25)))
        texts.append(step.plain.lower(*state_batch).as_text())
    assert texts[0] == texts[1]
    assert "custom_call" not in texts[1]  # no host callback was added either


def test_hand_written_loop_wrap(tmp_path):
    @jax.jit
    def train_step(w, x):
        loss = jnp.sum(jnp.log(x * w))  # HAND-LINE
        return w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.log(x * w)))(w), {"loss": loss}

    writer = forensics.CapsuleWriter(tmp_path)
    step = writer.wrap(train_step)
    w = jnp.ones(3)
    for x in (jnp.ones(3), jnp.array([1.0, 0.0, 1.0]), jnp.ones(3)):
        w, _ = step(w, x)
    writer.close()
    assert [p.name for p in writer.written] == ["step_00000001"]
    report = forensics.replay(writer.written[0], train_step)
    assert report.primitive == "log" and report.where.line == _line_of("HAND-LINE")
    assert report.pass_ == "forward" and report.reproduced


def test_capsule_writer_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="option 'max_capsules'"):
        forensics.CapsuleWriter(tmp_path, max_capsules=0)
    with pytest.raises(ValueError, match="option 'step_fn_spec'"):
        forensics.CapsuleWriter(tmp_path, step_fn_spec="no-colon")
    with pytest.raises(ValueError, match="option 'nan_capsule'"):
        pw.build_train_step(softmax_apply, _mse, None, optax.sgd(0.1), nan_capsule=3)


# --- replay ---------------------------------------------------------------------------


def test_replay_names_log_its_line_the_forward_pass_and_the_term(tmp_path):
    _, step, _, _ = _confidence_run(tmp_path, bad=(3,))
    report = forensics.replay(step.capsules.written[0], step)
    assert report.step == 3
    assert report.primitive == "log"
    assert report.where.file == str(HERE) and report.where.line == _line_of("LOG-LINE")
    assert report.where.function == "confidence"
    assert report.pass_ == "forward"
    assert report.term == "confidence"
    assert report.reproduced
    text = str(report)
    assert f"{HERE}:{_line_of('LOG-LINE')}" in text and "primitive: log" in text


def test_replay_reproduces_the_recorded_counts_exactly(tmp_path):
    _, step, _, _ = _confidence_run(tmp_path, bad=(3,))
    capsule = forensics.load(step.capsules.written[0])
    report = forensics.replay(capsule, step)
    assert report.original == capsule.manifest["report"]
    assert list(report.nonfinite) == capsule.manifest["report"]["nonfinite"]
    assert list(report.leaves) == capsule.manifest["report"]["leaves"]
    # and the counts match the step's own metrics, read as the monitor reads them
    state, batch = capsule.args
    _, metrics = step.plain(state, batch)
    counts = jax.device_get(metrics.reserved["_leaf_nonfinite"])
    leaves = leaf_reports(counts, max_leaves=99)
    assert [(x.tree, x.path, x.nan_count, x.inf_count) for x in leaves] == [
        (x["tree"], x["path"], x["nan"], x["inf"]) for x in report.leaves
    ]


def test_replay_names_a_nonfinite_backward_pass(tmp_path):
    init, step = pw.build_train_step(sqrt_apply, _mse, None, optax.sgd(0.1), nan_capsule=tmp_path)
    state = init({"w": jnp.zeros((3, 1))})  # sqrt(0): finite value, infinite slope
    state, metrics = step(state, (jnp.ones((2, 3)), jnp.ones((2, 1))))
    step.capsules.flush()
    assert bool(metrics["loss_finite"]) and not bool(metrics["grads_finite"])
    report = forensics.replay(step.capsules.written[0], step)
    assert report.pass_ == "backward"
    assert report.derivative_of == "sqrt" and report.primitive == "div"
    assert report.where.line == _line_of("SQRT-LINE") and report.where.file == str(HERE)
    assert report.reproduced
    assert report.leaves[0]["path"] == "['w']" and report.leaves[0]["inf"] == 3


def test_replay_names_inputs_that_were_already_nonfinite(tmp_path):
    init, step = pw.build_train_step(sqrt_apply, _mse, None, optax.sgd(0.1), nan_capsule=tmp_path)
    state = init({"w": jnp.ones((3, 1))})
    state, _ = step(state, (jnp.array([[1.0, jnp.nan, 1.0]]), jnp.ones((1, 1))))
    step.capsules.flush()
    report = forensics.replay(step.capsules.written[0], step)
    assert report.pass_ == "inputs" and report.primitive is None
    assert report.input_leaves == ({"path": "[1][0]", "nan": 1, "inf": 0},)


def test_replay_cli(tmp_path):
    _, step, _, _ = _confidence_run(tmp_path, bad=(3,))
    module = tmp_path / "replay_target.py"
    module.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE.parent)!r})\n"
        "import test_forensics as t\n"
        "def make():\n"
        "    return t._confidence_step(None)[1]\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "penwatch.cli", "replay", str(step.capsules.written[0]),
           "--step-fn", "replay_target:make"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "primitive: log" in out.stdout and f"{HERE}:{_line_of('LOG-LINE')}" in out.stdout
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=300)
    data = json.loads(out.stdout)
    assert data["primitive"] == "log" and data["pass"] == "forward" and data["reproduced"]


# --- where the value entered: the leaf order --------------------------------------------


class _ThreeLayers(nn.Module):
    """Layer names chosen so that neither tree order nor its reverse is forward order."""

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(4, name="b_in")(x))
        h = nn.tanh(nn.Dense(4, name="c_mid")(h))
        return nn.Dense(2, name="a_out")(h)


def test_leaves_nearest_the_loss_first_on_a_flax_model():
    model = _ThreeLayers()
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    init, step = pw.build_train_step(model.apply, _mse, None, optax.sgd(0.1))
    state = init(params)
    # the output layer's bias holds an Inf: it enters there, NaN spreads to the rest
    bad = jax.tree_util.tree_map_with_path(
        lambda p, v: v.at[0].set(jnp.inf) if "a_out" in str(p) and "bias" in str(p) else v,
        state.params,
    )
    _, metrics = step(state._replace(params=bad), (jnp.ones((2, 3)), jnp.ones((2, 2))))
    counts = jax.device_get(metrics.reserved["_leaf_nonfinite"])
    grads_order = [p.split("]")[1] + "]" for p in counts["grads"].paths]
    assert grads_order[::2] == ["['a_out']", "['c_mid']", "['b_in']"]
    first = leaf_reports(counts, max_leaves=3)[0]
    assert first.tree == "params" and "a_out" in first.path and first.inf_count > 0


def test_trainer_writes_the_capsule_of_a_diagnostics_step_and_replays_it(tmp_path):
    bad = jnp.array([[1e4, -1e4, 0.0], [1.0, 1.0, 1.0]])
    y = jnp.full((2, 4), 0.25)
    data = [(bad if i == 4 else jnp.ones((2, 3)), y) for i in range(6)]
    pipe = pw.Pipeline(name="p").add("confidence", confidence, weight=0.1)
    result = pw.trainer(
        softmax_apply, _mse, pipe, optax.sgd(0.1), {"out": {"w": W0}}, data,
        diagnostics_every=2, skip_nonfinite=True, progress=False, nan_capsule=tmp_path,
    )  # fmt: skip
    assert result.history[0]["steps"] == 6
    path = tmp_path / "step_00000004"  # written before trainer returned
    capsule = forensics.load(path)
    assert capsule.manifest["program"] == "with_diagnostics"
    _, step = pw.build_train_step(
        softmax_apply, _mse, pipe, optax.sgd(0.1), diagnostics_every=2, skip_nonfinite=True
    )
    report = forensics.replay(capsule, step)
    assert report.reproduced and report.primitive == "log" and report.term == "confidence"
    with pytest.raises(ValueError, match="option 'nan_capsule'"):
        pw.trainer(None, None, None, None, {}, [], train_step=(None, step), nan_capsule=tmp_path)


def test_activity_train_step_capsule_names_the_captured_penalty(tmp_path):
    def apply(params, x):
        h = pw.capture("hidden", x @ params["w"])
        return jnp.sum(h, axis=-1)

    def log_activity(h):
        return -jnp.mean(jnp.log(jnp.abs(h)))  # ACTIVITY-LINE

    init, step = pw.training.build_activity_train_step(
        apply, _mse, {"hidden": (log_activity, 0.1)}, optax.sgd(0.01), nan_capsule=tmp_path
    )
    state0 = init({"w": jnp.ones((3, 2))})
    batch = (jnp.zeros((2, 3)), jnp.zeros((2,)))
    step(state0, batch)  # h = 0: log(0)
    step.capsules.flush()
    capsule = forensics.load(step.capsules.written[0])
    # a local penalty function cannot be pickled: no treedef, the npz has every leaf
    assert capsule.manifest["treedef"] is None and capsule.args is None
    with pytest.raises(ValueError, match="pass like="):
        forensics.replay(capsule, step)
    report = forensics.replay(capsule, step, like=(state0, batch))
    assert report.primitive == "log" and report.where.line == _line_of("ACTIVITY-LINE")
    assert report.term == "hidden" and report.pass_ == "forward" and report.reproduced


def test_capsule_keeps_typed_prng_keys_and_replays_the_same_draw(tmp_path):
    @jax.jit
    def noisy_step(w, key, x):
        key, sub = jax.random.split(key)
        noise = jax.random.uniform(sub, x.shape)
        loss = jnp.sum(jnp.log(x * w * (noise > 0.5)))  # KEY-LINE: log(0) where masked
        return (w, key), {"loss": loss}

    writer = forensics.CapsuleWriter(tmp_path)
    step = writer.wrap(lambda state, x: noisy_step(*state, x))
    state = (jnp.ones(4), jax.random.key(3))
    state, metrics = step(state, jnp.ones(4))
    writer.close()
    assert not np.isfinite(float(metrics["loss"]))
    capsule = forensics.load(writer.written[0])
    entry = next(e for e in capsule.manifest["leaves"] if e.get("prng_impl"))
    assert entry["prng_impl"] == str(jax.random.key_impl(jax.random.key(3)))
    (_, key), _ = capsule.args
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    report = forensics.replay(capsule, lambda state, x: noisy_step(*state, x))
    assert report.reproduced and report.primitive == "log"
    assert report.where.line == _line_of("KEY-LINE")


def make_confidence_step():
    """A ``--step-fn`` factory for the CLI tests."""
    return _confidence_step(None)[1]


def test_replay_cli_exit_status(tmp_path, capsys, monkeypatch):
    from penwatch.cli import main

    monkeypatch.syspath_prepend(str(HERE.parent))
    spec = f"{__name__}:make_confidence_step"
    assert main(["replay", str(tmp_path / "missing"), "--step-fn", spec]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    _, step, _, _ = _confidence_run(tmp_path, bad=(3,))
    path = step.capsules.written[0]
    assert main(["replay", str(path), "--step-fn", spec]) == 0
    # a manifest whose recorded report differs: not reproduced, exit status 1
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["report"]["leaves"] = []
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["replay", str(path), "--step-fn", spec]) == 1
    assert "reproduced: NO" in capsys.readouterr().out
