"""Gradient penalties and their cheap proxy (port of the seed's gradient_penalty.exs).

Gradient penalties need a backward pass to compute and a second-order pass to train
with: apply them every N steps, or use output_magnitude_penalty as a proxy.

Run: python examples/gradient_penalty.py
"""

import jax
import jax.numpy as jnp

import penwatch as pw


# Full gradient penalty: (||grad f(x)|| - target)^2.
def loss_fn(x):
    return jnp.sum(x**2)


tensor = jnp.array([0.3, -0.4])  # grad = 2x = [0.6, -0.8], norm 1.0
print(f"gradient norm = {float(jnp.linalg.norm(jax.grad(loss_fn)(tensor))):.4f}")
print(f"gradient_penalty(target_norm=1.0) = {float(pw.gradient_penalty(loss_fn, tensor)):.4f}")
half = pw.gradient_penalty(loss_fn, tensor, target_norm=0.5)
print(f"gradient_penalty(target_norm=0.5) = {float(half):.4f}")

# Per-sample: one norm per sample (all axes but the first), averaged over the batch.
batch = jnp.array([[0.3, -0.4], [0.0, 1.0], [0.0, 0.0]])  # norms 1, 2, 0
per_sample = pw.gradient_penalty(loss_fn, batch, per_sample=True)
print(f"per-sample gradient_penalty = {float(per_sample):.4f}")  # (0 + 1 + 1) / 3

# Cheaper proxy: output magnitude.
model_output = jnp.array([[1.0, 2.0], [2.0, 1.0]])  # RMS = sqrt(2.5)
print(
    f"output_magnitude_penalty(target=1.0) = {float(pw.output_magnitude_penalty(model_output)):.4f}"
)


# WGAN-GP: interpolate fake and real samples (one epsilon per sample, explicit key).
def critic(x):  # per-sample scores; treats samples independently (no batch norm!)
    return 2.0 * jnp.sum(x, axis=-1)  # gradient (2, 2) per sample: norm 2*sqrt(2)


fake = jnp.zeros((8, 2))
real = jnp.ones((8, 2))
key = jax.random.key(42)
gp = pw.interpolated_gradient_penalty(critic, fake, real, key=key, target_norm=1.0)
print(f"interpolated_gradient_penalty = {float(gp):.4f}")  # (2*sqrt(2) - 1)^2
same = pw.interpolated_gradient_penalty(critic, fake, real, key=key)
print(f"same key, same value: {bool(gp == same)}")

# Apply the expensive penalty every N steps only (inside a jitted step use lax.cond).
N = 5
params = jnp.array([1.0, -1.0])


@jax.jit
def penalized(params, step):
    def model(x):
        return jnp.sum(jnp.tanh(params * x))

    return jax.lax.cond(
        step % N == 0,
        lambda: pw.gradient_penalty(model, real[0]),
        lambda: jnp.zeros(()),
    )


applied = [int(step) for step in range(12) if float(penalized(params, step)) > 0]
print(f"gradient penalty applied at steps {applied}")
