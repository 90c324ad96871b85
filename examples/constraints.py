"""Orthogonality and consistency constraints (port of the seed's constraints.exs).

Run: python examples/constraints.py
"""

import jax
import jax.numpy as jnp

import penwatch as pw

# Orthogonality: decorrelate representations (the seed README's hidden states).
hidden_states = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
for mode in ("soft", "hard", "spectral"):
    print(f"orthogonality(mode={mode!r}) = {float(pw.orthogonality(hidden_states, mode=mode)):.4f}")

identity = jnp.eye(3)
spectral_at_identity = float(pw.orthogonality(identity, mode="spectral"))
print(f"orthogonality of the identity (spectral) = {spectral_at_identity:.4f}")

# Spectral mode: all singular values pushed to 1; its gradient is finite even at G = I.
grad = jax.grad(lambda m: pw.orthogonality(m, mode="spectral"))(identity)
print(f"spectral gradient at the optimum is zero: {bool(jnp.all(grad == 0))}")

# Axis options for a 3-D [batch, seq, dim] tensor.
logits = jax.random.normal(jax.random.key(0), (2, 4, 8))
for axis in ("rows", "sequence", "vocabulary"):
    value = float(pw.orthogonality(logits, axis=axis))
    print(f"orthogonality(axis={axis!r}) = {value:.4f}")

# Consistency: penalize divergence between paired outputs (clean vs noisy input).
clean = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
noisy = clean + jnp.array([[0.1, -0.2, 0.0], [0.0, 0.3, -0.1]])
for metric in ("mse", "l1", "cosine"):
    value = float(pw.consistency(clean, noisy, metric=metric))
    print(f"consistency(metric={metric!r}) = {value:.6f}")
logprobs1 = jax.nn.log_softmax(clean)
logprobs2 = jax.nn.log_softmax(noisy)
print(f"consistency(metric='kl') = {float(pw.consistency(logprobs1, logprobs2, metric='kl')):.6f}")
