"""Pipeline composition: build, compute, adjust and jit penalty pipelines.

Port of the seed's ``pipeline_composition.exs``. Run: ``python examples/pipeline_composition.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import penwatch as pw


def show(title: str, metrics: pw.Metrics) -> None:
    print(f"\n{title}")
    # pw.Metrics packs the values into one buffer per dtype; scalars() reads each
    # buffer once. Keys come in computation order, penalties in pipeline order.
    for key, value in metrics.scalars().items():
        print(f"  {key:<24} {value: .6f}")


def main() -> None:
    key = jax.random.key(0)
    logits = jax.random.normal(key, (8, 5))
    logprobs = jax.nn.log_softmax(logits)

    # 1. From built-in names: "name", ("name", weight) or ("name", weight, {options}).
    pipe = pw.pipeline([("l1", 1e-3), ("l2", 1e-2), ("entropy", 0.1, {"mode": "bonus"})])
    print("pipeline:", pipe)
    total, metrics = pipe.compute(logprobs)  # device arrays, no host sync
    show("1. built-in pipeline", metrics)

    # 2. The builder API, with options and a non-differentiable custom penalty.
    def argmax_collapse(x: jax.Array) -> jax.Array:
        """Fraction of rows predicting class 0 (piecewise constant: no useful gradient)."""
        return jnp.mean((jnp.argmax(x, axis=-1) == 0).astype(x.dtype))

    custom = (
        pw.Pipeline(name="reg")
        .add("l1", pw.l1, weight=1e-3)
        .add("l2", pw.l2, weight=1e-2, clip=10.0)
        .add("collapse", argmax_collapse, weight=0.1, differentiable=False)
    )
    total, metrics = custom.compute(logprobs)
    show("2. builder pipeline (name='reg')", metrics)

    # 3. Dynamic adjustment: every mutator returns a new pipeline.
    adjusted = (
        pipe.update_weight("l1", 0.01).update_weight("l2", 1e-3).set_enabled("entropy", False)
    )
    _, metrics = adjusted.compute(logprobs)
    show("3. adjusted (l1 up, l2 down, entropy disabled)", metrics)
    print("  original weights unchanged:", {k: round(float(v), 6) for k, v in pipe.weights.items()})

    # 4. compute_total is a scalar you can differentiate.
    grad = jax.grad(pipe.compute_total)(logprobs)
    print("\n4. grad of compute_total: shape", grad.shape, "norm", float(jnp.linalg.norm(grad)))

    # 5. Pipelines are pytrees: pass one into a jitted step; new weights do not recompile.
    traces = 0

    @jax.jit
    def step(p: pw.Pipeline, x: jax.Array) -> jax.Array:
        nonlocal traces
        traces += 1
        return p.compute_total(x)

    for i in range(100):
        step(pipe.update_weight("l1", 1e-3 * (i + 1)), logprobs)
    print(f"\n5. 100 weight updates under jit -> {traces} trace(s)")

    # 6. Multi-input pipelines for divergences and consistency.
    teacher = jax.nn.log_softmax(logits + 0.5 * jax.random.normal(jax.random.key(1), logits.shape))
    noisy = logits + 0.1 * jax.random.normal(jax.random.key(2), logits.shape)
    multi = pw.multi_pipeline(
        [
            ("kl", 0.1, ("student", "teacher")),
            ("consistency", 0.2, ("clean", "noisy"), {"metric": "mse"}),
        ]
    )
    total, metrics = multi.compute(
        {"student": logprobs, "teacher": teacher, "clean": logits, "noisy": noisy}
    )
    show("6. multi-input pipeline", metrics)
    print(f"  multi total = {float(total):.6f}")

    # 7. Telemetry events: host-side compute calls emit start/stop events.
    def on_stop(event: tuple[str, ...], measurements: dict, metadata: dict) -> None:
        print(
            f"  event {'.'.join(event)}: pipeline={metadata['pipeline']!r} "
            f"dispatch={measurements['duration'] / 1e3:.0f}us total={float(metadata['total']):.6f}"
        )

    print("\n7. events")
    pw.events.attach("example-logger", pw.events.PIPELINE_COMPUTE_STOP, on_stop)
    try:
        custom.compute(logprobs)
    finally:
        pw.events.detach("example-logger")


if __name__ == "__main__":
    main()
