"""Gradient norms and gradient diagnostics: what one pass costs (SPEC sections 3, 4, 9).

* Per-penalty input-gradient norms (``compute(x, track_grad_norms=True)``, ≥ 4
  differentiable penalties, the element-wise built-ins by their closed forms) vs a plain
  ``jax.value_and_grad`` of ``compute_total``: ≤ 1.2×; and, where the pipeline holds ≥ 3
  element-wise penalties, vs one separate jitted pass per penalty giving the same
  information (its value and gradient norm; plus one pass for the total's gradient norm,
  as the seed's ``GradientTracker.total_grad_norm``): ≥ 2× faster. Three workloads:
  log-probabilities of a classifier head ``[256, 10]``, log-probabilities
  ``[1024, 256]`` (5 penalties: l1, l2, elastic_net, entropy, output_magnitude), and
  activations ``[256, 128]`` (l1, l2, orthogonality, output_magnitude). Informative:
  the seed's pattern, a ``float()`` host sync after each penalty's pass.
* Gradient diagnostics (per-term parameter-gradient norms, shares, cosines; 3 model
  terms + 1 closed-form parameter term) vs a plain ``value_and_grad`` of the total loss of
  a small MLP (SPEC sets no bar: reported for the "every N steps" trade-off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import penwatch as pw
from benchmarks._harness import Report, quick, time_interleaved
from benchmarks._mlp import mlp as _mlp
from benchmarks._mlp import mlp_params as _mlp_params
from benchmarks._mlp import nll as _nll

ELEMENTWISE = frozenset({"l1", "l2", "elastic_net", "entropy", "output_magnitude"})
"""The built-ins whose input-gradient norms have closed forms (SPEC §9)."""

# A round of the four timings takes 2-5 ms, so 101 rounds cost well under a second per
# workload and steady each median against sampling noise; what remains from run to run
# is the machine's (docs/benchmarks.md, "Orthogonality's gradient by rule").
REPEATS = 5 if quick() else 101


def _penalty_pipeline() -> pw.Pipeline:
    return pw.pipeline(
        [
            ("l1", 1e-3),
            ("l2", 1e-2),
            ("elastic_net", 1e-2, {"l1_ratio": 0.3}),
            ("entropy", 0.1, {"mode": "bonus"}),
            ("output_magnitude", 0.05),
        ]
    )


def _workloads() -> list[tuple[str, pw.Pipeline, jax.Array]]:
    """(label, pipeline, input): log-probabilities of a classifier, and activations."""
    out = []
    for batch, classes in ((256, 10), (1024, 256)):
        logits = jax.random.normal(jax.random.key(1), (batch, classes), jnp.float32)
        out.append(
            (f"[{batch},{classes}] log-probs", _penalty_pipeline(), jax.nn.log_softmax(logits))
        )
    activations = jax.random.normal(jax.random.key(5), (256, 128), jnp.float32)
    out.append(("[256,128] activations", _activation_pipeline(), activations))
    return out


def _activation_pipeline() -> pw.Pipeline:
    return pw.pipeline(
        [("l1", 1e-4), ("l2", 1e-3), ("orthogonality", 0.01), ("output_magnitude", 0.05)]
    )


def bench_input_grad_norms(report: Report, shape: str, pipe: pw.Pipeline, x: jax.Array) -> None:

    tracked = jax.jit(lambda p, x: p.compute(x, track_grad_norms=True))
    plain = jax.jit(jax.value_and_grad(lambda x, p: p.compute_total(x)))
    # one compiled pass per penalty giving its value and gradient norm (a pipeline holding
    # only that penalty), plus one for the total's gradient norm: the same information
    value_and_norm = jax.jit(
        lambda x, p: (lambda v, g: (v, jnp.linalg.norm(g.ravel())))(
            *jax.value_and_grad(lambda x: p.compute_total(x))(x)
        )
    )
    singles = [_only(pipe, name) for name in pipe.names]

    def per_penalty() -> list[tuple[jax.Array, jax.Array]]:
        return [value_and_norm(x, p) for p in (*singles, pipe)]

    def seed_pattern() -> list[float]:
        # the seed's GradientTracker: a float (host sync) after each penalty's pass
        return [float(value_and_norm(x, p)[1]) for p in (*singles, pipe)]

    # the one-pass norms equal the separate passes' (up to float32 rounding)
    _, metrics = tracked(pipe, x)
    for name, (_, norm) in zip(pipe.names, per_penalty()[:-1], strict=True):
        weight = abs(float(pipe.weights[name]))
        np.testing.assert_allclose(float(metrics[f"{name}_grad_norm"]) * weight, norm, rtol=2e-3)
    np.testing.assert_allclose(metrics["total_grad_norm"], per_penalty()[-1][1], rtol=2e-3)

    t = time_interleaved(
        {
            "one_pass": lambda: tracked(pipe, x),
            "value_and_grad": lambda: plain(x, pipe),
            "per_penalty": per_penalty,
            "seed_pattern": seed_pattern,
        },
        repeats=REPEATS,
        warmup=3,
    )
    ratio = t["one_pass"] / t["value_and_grad"]
    report.add(
        f"one-pass grad norms ({len(pipe)} penalties, {shape}) / value_and_grad",
        ratio,
        bar="<= 1.2x",
        passed=ratio <= 1.2,
    )
    speedup = t["per_penalty"] / t["one_pass"]
    elementwise = sum(n in ELEMENTWISE for n in pipe.names)
    report.add(
        f"one pass per penalty (+ total), {shape} ({elementwise} element-wise) "
        "/ one-pass grad norms",
        speedup,
        bar=">= 2x" if elementwise >= 3 else "(< 3 element-wise: no bar)",
        passed=speedup >= 2.0 if elementwise >= 3 else None,
    )
    report.add(
        f"seed pattern (pass + float() per penalty), {shape} / one-pass grad norms",
        t["seed_pattern"] / t["one_pass"],
    )
    for name, seconds in t.items():
        report.add(f"  time {shape}: {name}", 1e3 * seconds, unit=" ms")


def _only(pipe: pw.Pipeline, keep: str) -> pw.Pipeline:
    for name in pipe.names:
        if name != keep:
            pipe = pipe.set_enabled(name, False)
    return pipe


def bench_diagnostics(report: Report) -> None:
    key = jax.random.key(2)
    params = _mlp_params(key, (64, 256, 256, 10))
    x = jax.random.normal(jax.random.key(3), (256, 64), jnp.float32)
    y = jax.random.randint(jax.random.key(4), (256,), 0, 10)
    pipe = pw.pipeline([("entropy", 0.1, {"mode": "bonus"}), ("output_magnitude", 0.05)])
    decay = {"l2": pw.diagnostics.l2_term(1e-4)}

    def total(params: dict[str, jax.Array], pipe: pw.Pipeline, decay: dict) -> jax.Array:
        logp = _mlp(params, x)
        loss = jnp.mean(_nll(logp, y)) + pipe.compute_total(logp)
        return loss + sum(t.value(params) for t in decay.values())

    plain = jax.jit(jax.value_and_grad(total))

    @jax.jit
    def diag(params: dict, pipe: pw.Pipeline, decay: dict) -> pw.diagnostics.DiagnosticsResult:
        terms_fn = pw.diagnostics.pipeline_terms_fn(_mlp, _nll, pipe, (x, y))
        return pw.diagnostics.value_and_grad_with_diagnostics(
            terms_fn, params, param_terms=decay, has_aux=True
        )

    res = diag(params, pipe, decay)
    loss, grads = plain(params, pipe, decay)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), res.grads, grads
    )

    t = time_interleaved(
        {"diag": lambda: diag(params, pipe, decay), "vg": lambda: plain(params, pipe, decay)},
        repeats=30,
        warmup=3,
    )
    report.add(
        "gradient diagnostics (MLP 64-256-256-10, batch 256, 3 model terms + L2) / value_and_grad",
        t["diag"] / t["vg"],
        bar="(no bar: informative)",
    )
    for name, seconds in t.items():
        report.add(f"  time: {name}", 1e3 * seconds, unit=" ms")


def run(report: Report) -> None:
    for label, pipe, x in _workloads():
        bench_input_grad_norms(report, label, pipe, x)
    bench_diagnostics(report)
