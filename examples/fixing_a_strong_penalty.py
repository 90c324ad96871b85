"""Fixing a too-strong penalty with penwatch's answers (SPEC section 12).

A small MLP with an L1 activity penalty on its hidden layer, weight 5.0: far too strong.
Its gradient share oscillates around 0 (the penalty and the task cancel), so the
share-based ``GradientDominance`` stays silent. This example walks through what answers
the question instead:

1. train with ``GradientTugOfWar``, ``ActivityCollapse`` and ``FirstStepLint``: the tug of
   war names the penalty, with its suggested weight;
2. read the last diagnostics step: the term Gram matrix gives the exact shares, cosines
   and norms under other weights (``pw.diagnostics.what_if``), and
   ``pw.diagnostics.suggest_weights`` the nearest weight in the band;
3. retrain with the suggested weight: no tug of war, fewer dead units, a lower task loss.

Run: ``python examples/fixing_a_strong_penalty.py`` (``PENWATCH_EXAMPLE_QUICK=1``: fewer
steps).
"""

from __future__ import annotations

import os
import statistics

import jax
import jax.numpy as jnp
import optax

import penwatch as pw

QUICK = os.environ.get("PENWATCH_EXAMPLE_QUICK", "0") == "1"
STEPS = 150 if QUICK else 400


def model(params, x):
    hidden = jax.nn.relu(x @ params["dense1"]["w"] + params["dense1"]["b"])
    hidden = pw.training.capture("hidden", hidden)  # the activation the penalty reads
    return hidden @ params["dense2"]["w"] + params["dense2"]["b"]


def data():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "dense1": {"w": jax.random.normal(k[0], (8, 32)) / jnp.sqrt(8), "b": jnp.zeros(32)},
        "dense2": {"w": jax.random.normal(k[1], (32, 1)) / jnp.sqrt(32), "b": jnp.zeros(1)},
    }
    x = jax.random.normal(k[2], (64, 8))
    y = jnp.sin(x @ jax.random.normal(k[3], (8, 1)))
    return params, (x, y)


def l1_activity(h):
    return jnp.mean(jnp.abs(h))


def train(weight: float, run: str):
    """Train ``STEPS`` steps; return (events, diagnostics records, last record)."""
    params, batch = data()
    init, step = pw.training.build_activity_train_step(
        model,
        lambda out, y: (out - y) ** 2,
        {"hidden": (l1_activity, weight)},
        optax.adam(0.01),
        diagnostics_every=5,
    )
    events, records = [], []
    alerts = [pw.alerts.GradientTugOfWar(), pw.alerts.ActivityCollapse(), pw.alerts.FirstStepLint()]
    state = init(params)
    with pw.Monitor(
        run, sinks=[pw.sinks.Callback(records.append, on_event=events.append)], alerts=alerts
    ) as monitor:
        for i in range(STEPS):
            state, metrics = step(state, batch)
            monitor.record(i, metrics)
    diagnostics = [r for r in records if r.gram() is not None]
    return events, diagnostics, records[-1]


def main() -> None:
    print("== 1. Train with the penalty at weight 5.0")
    events, diagnostics, last = train(5.0, "too-strong")
    for event in events:
        print(f"  [{event.name}] {event.message}")
    print(f"  last record: task loss {last.values['base_loss']:.4f}, dead units "
          f"{last.dead_fractions()['hidden']:.0%}")  # fmt: skip
    step = diagnostics[-1]
    hidden = step.term("hidden")
    print(f"  last diagnostics step {step.step}: hidden grad share {hidden.grad_share:+.3f}, "
          f"cosine {hidden.grad_cosine:+.3f} (the share alone looks harmless)")  # fmt: skip

    print("== 2. What if? Exact figures of that step under other weights (from its Gram matrix)")
    print("  weight  hidden share  base share  hidden pull  ‖g_hidden‖/‖g_task‖")
    for weight in (5.0, 2.0, 1.0, 0.5, 0.1):
        r = pw.diagnostics.what_if(step, {"hidden": weight})
        ratio = r.param_grad_norm["hidden"] / r.param_grad_norm["base"]
        print(f"  {weight:6.2f}  {r.grad_share['hidden']:+12.3f}  {r.grad_share['base']:+10.3f}"
              f"  {r.pull['hidden']:+11.3f}  {ratio:19.3f}")  # fmt: skip
    found = pw.diagnostics.suggest_weights(step)
    print(f"  suggest_weights: feasible={found.feasible}, hidden -> {found.weights['hidden']:.3g} "
          f"(pull {found.result.pull['hidden']:.2f}, base share "
          f"{found.result.grad_share['base']:.2f})")  # fmt: skip
    # one batch's gradient is noisy: take the median suggestion of the last steps
    recent = [r.term("hidden").suggested_weight for r in diagnostics[-6:]]
    suggested = statistics.median(w for w in recent if w is not None)
    print(f"  median suggested weight over the last {len(recent)} diagnostics steps: "
          f"{suggested:.3g}")  # fmt: skip

    print(f"== 3. Retrain with the suggested weight {suggested:.3g}")
    events, _, fixed = train(suggested, "fixed")
    for event in events:
        print(f"  [{event.name}] {event.message}")
    # Near convergence every active penalty balances the task (ratio -> 1, cosine -> -1):
    # a tug of war at the new, lower weight says where training settles, not that it is
    # wrong. What the weight changed is *where*: the task loss and the dead units.
    dead_now, dead_was = fixed.dead_fractions()["hidden"], last.dead_fractions()["hidden"]
    loss_now, loss_was = fixed.values["base_loss"], last.values["base_loss"]
    print(f"  after the fix: task loss {loss_now:.4f} (was {loss_was:.4f}), "
          f"dead units {dead_now:.0%} (was {dead_was:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
