"""The dashboard's dominance section (dashboard/_dominance.py): pure functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from penwatch.dashboard import _dominance as dom

from penwatch.diagnostics import what_if
from penwatch.schema import gram_key, group_key, term_key

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)


def _balance_values(update_share=None):
    """The issue's balance case: ‖g_hidden‖ = 0.85 ‖g_task‖, cosine -0.9, weight 5."""
    base = np.array([1.0, 0.0, 0.0])
    hidden = 0.85 * np.array([-0.9, math.sqrt(1 - 0.81), 0.0]) / 5.0  # unweighted
    hidden[2] = 0.0
    vec = {"base": base, "hidden": hidden}
    w = {"base": 1.0, "hidden": 5.0}
    g = sum(w[t] * v for t, v in vec.items())
    values = {"base_loss": 0.1, "hidden_weight": 5.0, "hidden_weighted": 0.34}
    for t, v in vec.items():
        gt = w[t] * v
        values[term_key(t, "param_grad_norm")] = float(np.linalg.norm(gt))
        values[term_key(t, "grad_share")] = float(gt @ g / (g @ g))
        values[term_key(t, "grad_cosine")] = float(
            gt @ base / (np.linalg.norm(gt) * np.linalg.norm(base))
        )
        values[group_key(t, "dense1")] = float(np.linalg.norm(gt[:2]))
        values[group_key(t, "dense2")] = float(np.linalg.norm(gt[2:]))
    for i, a in enumerate(vec):
        for b in list(vec)[i:]:
            values[gram_key(a, b)] = float(vec[a] @ vec[b])
    values["hidden_suggested_weight"] = 0.4
    if update_share is not None:
        values["base_update_share"] = 1 - update_share
        values["hidden_update_share"] = update_share
    return values


def test_step_from_values_reads_every_figure():
    step = dom.step_from_values(12, _balance_values())
    assert step.terms == ("base", "hidden") and step.step == 12
    assert step.weights == {"base": 1.0, "hidden": 5.0}
    assert step.suggested_weight == {"hidden": 0.4}
    assert step.groups == ("dense1", "dense2")
    assert step.gram is not None and len(step.gram) == 2
    assert dom.step_from_values(3, {"loss": 1.0}) is None


def test_sentence_names_the_penalty_in_words_first():
    step = dom.step_from_values(12, _balance_values())
    (sentence,) = dom.sentences(step)
    assert sentence == (
        "hidden holds the task back: ‖g‖ ratio 0.85, cosine -0.9; suggested weight 0.4 (now 5)"
    )


def test_sentences_for_dead_terms_update_shares_and_a_quiet_step():
    values = _balance_values(update_share=0.7)
    step = dom.step_from_values(1, values)
    assert "under the optimizer hidden takes 0.7 of the update" in dom.sentences(step)[1]
    quiet = {
        "base_param_grad_norm": 1.0,
        "base_grad_share": 0.95,
        "base_grad_cosine": 1.0,
        "l2_param_grad_norm": 0.05,
        "l2_grad_share": 0.05,
        "l2_grad_cosine": 0.1,
    }
    (line,) = dom.sentences(dom.step_from_values(4, quiet))
    assert line == "No penalty holds the task back at step 4: the task carries 0.95 of the gradient"
    dead = {**quiet, "l2_param_grad_norm": 0.0, "l2_weight": 1.0}
    assert dom.sentences(dom.step_from_values(4, dead))[0].startswith("l2 is a dead term")


def test_what_if_table_equals_what_if_and_keeps_the_current_figures():
    step = dom.step_from_values(12, _balance_values())
    table = dom.what_if_table(step, {"hidden": 0.4})
    ref = what_if((step.terms, step.gram), {"hidden": 0.4})
    rows = table.set_index("term")
    for t in step.terms:
        assert rows.loc[t, "what-if share"] == pytest.approx(ref.grad_share[t])
        assert rows.loc[t, "what-if cosine"] == pytest.approx(ref.grad_cosine[t])
        assert rows.loc[t, "what-if ‖g‖"] == pytest.approx(ref.param_grad_norm[t])
        assert rows.loc[t, "grad share"] == pytest.approx(step.grad_share[t], rel=1e-9)
    assert rows.loc["total", "what-if ‖g‖"] == pytest.approx(ref.grad_norm)
    assert rows.loc["hidden", "weight"] == 5.0 and rows.loc["hidden", "what-if weight"] == 0.4
    no_gram = dom.step_from_values(
        1, {k: v for k, v in _balance_values().items() if "gram" not in k}
    )
    assert dom.what_if_table(no_gram, {"hidden": 1.0}) is None


def test_suggestion_note_from_the_gram_matrix():
    step = dom.step_from_values(12, _balance_values())
    note = dom.suggestion_note(step)
    assert note.startswith("Suggested: hidden ") and "(now 5)" in note


def test_heatmap_shows_every_term_and_layer_label():
    step = dom.step_from_values(12, _balance_values())
    spec = dom.heatmap(step).to_dict()
    data = next(iter(spec["datasets"].values()))
    assert {(r["term"], r["group"]) for r in data} == {
        (t, g) for t in ("base", "hidden") for g in ("dense1", "dense2")
    }
    for layer in spec["layer"]:
        for channel in ("x", "y"):
            axis = layer["encoding"][channel]["axis"]
            assert axis["labelLimit"] == 0 and axis["labelOverlap"] is False
    assert spec["layer"][0]["encoding"]["y"]["sort"] == ["base", "hidden"]
    assert dom.heatmap(dom.step_from_values(1, {"base_grad_share": 1.0})) is None


def test_share_table_puts_gradient_and_update_shares_side_by_side():
    table = dom.share_table(dom.step_from_values(12, _balance_values(update_share=0.7)))
    assert list(table.columns) == ["term", "grad share", "update share"]
    assert table.set_index("term").loc["hidden", "update share"] == 0.7


def test_slider_options_are_log_spaced_around_the_current_weight():
    options = dom.slider_options(5.0, 0.4)
    assert 5.0 in options and 0.4 in options and options == sorted(options)
    assert min(options) == pytest.approx(5e-3) and max(options) == pytest.approx(5e3)
    ratios = np.diff(np.log10([w for w in options if w not in (0.4,)]))
    assert np.allclose(ratios, 1 / dom.SLIDER_STOPS)
    labels = [dom.weight_label(w) for w in options]
    assert len(set(labels)) == len(labels)  # a slider maps labels to options
    assert all(w < 0 for w in dom.slider_options(-2.0))  # a bonus term keeps its sign
    assert {0.0, 1.0} <= set(dom.slider_options(0.0))
    # the current weight wins a label tie with the suggestion
    assert 5.0 in dom.slider_options(5.0, 5.0001) and 5.0001 not in dom.slider_options(5.0, 5.0001)
