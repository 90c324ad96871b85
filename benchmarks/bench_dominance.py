"""What the SPEC §12 answers cost (SPEC sections 9 and 12).

* A diagnostics train step (per-term gradients, one pass, then an Adam update) with the
  term Gram matrix, per-group norms and update-space shares vs the same step with the
  SPEC §4 figures only (today's diagnostics step): ≤ 1.1×. Workload: an MLP
  ``(64, 256, 256, 10)``, batch 256, task loss + 2 output penalties + 1 closed-form L2.
* ``what_if`` and ``suggest_weights`` on the host for a 16-term Gram matrix: ≤ 1 ms each
  (median).

``PENWATCH_BENCH_SMALL=1`` runs a tiny MLP and few repeats (a smoke test of the
benchmark itself, not a measurement).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import penwatch as pw
from benchmarks._harness import Report, time_interleaved
from benchmarks._mlp import mlp as _mlp
from benchmarks._mlp import mlp_params as _mlp_params
from benchmarks._mlp import nll as _nll

_SMALL = os.environ.get("PENWATCH_BENCH_SMALL") == "1"


def bench_diagnostics_step(report: Report) -> None:
    sizes, batch = (
        (tuple(int(v) for v in os.environ.get("PENWATCH_BENCH_SIZES", "8,16,16,4").split(",")), 16)
        if _SMALL
        else ((64, 256, 256, 10), 256)
    )
    params = _mlp_params(jax.random.key(2), sizes)
    x = jax.random.normal(jax.random.key(3), (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(jax.random.key(4), (batch,), 0, sizes[-1])
    pipe = pw.pipeline([("entropy", 0.1, {"mode": "bonus"}), ("output_magnitude", 0.05)])
    decay = {"l2": pw.diagnostics.l2_term(1e-4)}
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    def make(full: bool):
        @jax.jit
        def step(params, opt_state, pipe, decay):
            terms_fn = pw.diagnostics.pipeline_terms_fn(_mlp, _nll, pipe, (x, y))

            done = {}

            def precondition(grads):
                # as the train steps do: the update run here is the one applied
                done["update"] = opt.update(grads, opt_state, params)
                return pw.diagnostics.diagonal_preconditioner(done["update"][1], params)

            res = pw.diagnostics.value_and_grad_with_diagnostics(
                terms_fn,
                params,
                param_terms=decay,
                has_aux=True,
                weights=pipe.weights,
                gram=full,
                groups=full,
                preconditioner=precondition if full else None,
            )
            updates, new_state = done.get("update") or opt.update(res.grads, opt_state, params)
            return optax.apply_updates(params, updates), new_state, res.metrics

        return step

    today, answers = make(False), make(True)
    t = time_interleaved(
        {
            "today": lambda: today(params, opt_state, pipe, decay),
            "answers": lambda: answers(params, opt_state, pipe, decay),
        },
        repeats=5 if _SMALL else 40,
        warmup=2 if _SMALL else 5,
    )
    ratio = t["answers"] / t["today"]
    report.add(
        "diagnostics step + Gram, group norms, update shares vs SPEC §4 only "
        f"(MLP {sizes}, batch {batch}, Adam)",
        ratio,
        bar="≤ 1.1x",
        passed=ratio <= 1.1,
    )


def bench_host_answers(report: Report) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(16, 200))
    vectors[1:] -= 0.5 * vectors[0]
    gram = vectors @ vectors.T
    names = ("base", *(f"p{i}" for i in range(1, 16)))
    weights = {n: 3.0 for n in names[1:]}
    calls = {
        "what_if": lambda: pw.diagnostics.what_if(gram, weights, terms=names),
        "suggest_weights": lambda: pw.diagnostics.suggest_weights(gram, weights, terms=names),
    }
    for name, fn in calls.items():
        fn()
        samples = []
        for _ in range(20 if _SMALL else 200):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        ms = statistics.median(samples) * 1e3
        report.add(f"{name}, 16 terms (host, NumPy)", ms, unit=" ms", bar="≤ 1 ms", passed=ms <= 1)


def run(report: Report) -> None:
    bench_diagnostics_step(report)
    bench_host_answers(report)
