"""Gradient tracking: which penalty drives the gradient?

Port of the seed's ``gradient_tracking.exs``, in two parts:

1. input-gradient norms per penalty (``track_grad_norms=True``): the norm of each raw
   penalty's gradient with respect to the pipeline input, all from one compiled pass;
2. parameter-gradient diagnostics (``pw.diagnostics.gradient_diagnostics``): each loss
   term's share of the parameter update and its cosine with the task gradient, showing
   a case where an over-weighted penalty dominates and fights the task loss.

Run: ``python examples/gradient_tracking.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import penwatch as pw


def input_gradient_norms() -> None:
    print("== 1. input-gradient norms per penalty ==")
    logprobs = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (16, 10)))

    def argmax_confidence(x: jax.Array) -> jax.Array:
        return jnp.mean(jnp.take_along_axis(x, jnp.argmax(x, -1)[:, None], -1))

    pipe = pw.pipeline([("l1", 1e-3), ("l2", 1e-2), ("entropy", 0.1, {"mode": "penalty"})]).add(
        "argmax_conf", argmax_confidence, weight=0.1, differentiable=False
    )
    _total, metrics = pipe.compute(logprobs, track_grad_norms=True)
    for name in pipe.names:
        norm = metrics.get(f"{name}_grad_norm")
        shown = "skipped (differentiable=False)" if norm is None else f"{float(norm):.6f}"
        print(f"  {name + '_grad_norm':<24} {shown}")
    print(f"  {'total_grad_norm':<24} {float(metrics['total_grad_norm']):.6f}")
    # These are d(penalty)/d(pipeline input): here the log-probabilities, not parameters.
    direct = jnp.linalg.norm(jax.grad(pipe.compute_total)(logprobs))
    print(f"  check: |grad compute_total| = {float(direct):.6f}")


def parameter_gradient_dominance() -> None:
    print("\n== 2. which term drives the parameter update? ==")
    kx, kw, kn = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (64, 8))
    w_true = jax.random.normal(kw, (8,))
    y = x @ w_true + 0.01 * jax.random.normal(kn, (64,))
    params = {"w": 0.5 * w_true}  # halfway to the solution: the task pulls w outwards

    # Compile once; the pipeline is an argument, so a new weight is new data, not a
    # new program (the same function serves every N steps of a training run).
    @jax.jit
    def diagnose(pipe: pw.Pipeline, params: dict) -> dict:
        def terms(p):
            pred = x @ p["w"]
            base = jnp.mean((pred - y) ** 2)
            _, metrics = pipe.compute(p["w"])  # penalties of the weights
            return base, {name: metrics[f"{name}_weighted"] for name in pipe.enabled_names}

        return pw.diagnostics.gradient_diagnostics(terms, params)

    pipe = pw.pipeline([("l2", 1e-3), ("l1", 1e-3)])
    for label, p in [("balanced", pipe), ("l2 over-weighted", pipe.update_weight("l2", 5.0))]:
        diag = diagnose(p, params)
        print(f"  {label}:")
        for term in ("base", "l2", "l1"):
            print(
                f"    {term:<5} grad_norm={float(diag[f'{term}_param_grad_norm']):9.4f}"
                f"  share={float(diag[f'{term}_grad_share']):8.3f}"
                f"  cosine_to_task={float(diag[f'{term}_grad_cosine']):7.3f}"
            )
        dominant = max(("base", "l2", "l1"), key=lambda t: float(diag[f"{t}_grad_share"]))
        fights = float(diag["l2_grad_cosine"]) < 0
        print(f"    -> dominant term: {dominant}; l2 fights the task: {fights}")


def main() -> None:
    input_gradient_norms()
    parameter_gradient_dominance()


if __name__ == "__main__":
    main()
