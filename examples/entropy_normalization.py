"""Entropy penalty/bonus, normalization and temperature (port of entropy_normalization.exs).

Sign convention: the value is a term you add to the loss. mode="penalty" returns +H
(minimizing lowers entropy: confident predictions); mode="bonus" returns -H (minimizing
raises entropy: exploration).

Run: python examples/entropy_normalization.py
"""

import math

import jax
import jax.numpy as jnp

import penwatch as pw

distributions = {
    "uniform": jnp.full((4,), 0.25),
    "peaked": jnp.array([0.7, 0.1, 0.1, 0.1]),
    "one-hot": jnp.array([1.0, 0.0, 0.0, 0.0]),  # log(0) = -inf is handled
}
print(f"max entropy for 4 classes: log(4) = {math.log(4):.4f}")
for name, probs in distributions.items():
    logprobs = jnp.log(probs)
    h = float(pw.entropy(logprobs))
    h_norm = float(pw.entropy(logprobs, normalize=True))
    bonus = float(pw.entropy(logprobs, mode="bonus"))
    print(f"{name:8s} entropy = {h:.4f}  normalized = {h_norm:.4f}  bonus = {bonus:.4f}")

# Temperature re-normalizes log_softmax(logprobs / T): T < 1 sharpens, T > 1 flattens.
logprobs = jnp.log(distributions["peaked"])
for t in (0.5, 1.0, 2.0):
    value = float(pw.entropy(logprobs, temperature=t, normalize=True))
    print(f"temperature {t}: normalized entropy = {value:.4f}")

# A batch of rows: reduction over rows ("mean" by default, or "none" per row).
batch = jnp.log(jnp.stack(list(distributions.values())))
per_row = pw.entropy(batch, normalize=True, reduction="none")
print(f"per-row normalized entropy = {[round(v, 4) for v in per_row.tolist()]}")
print(f"mean normalized entropy = {float(pw.entropy(batch, normalize=True)):.4f}")

# Gradients stay finite at zero probabilities; a bonus step raises entropy.
logits = jnp.array([2.0, 0.5, -1.0, -jnp.inf])


def bonus(z):
    return pw.entropy(jax.nn.log_softmax(z), mode="bonus")


grad = jax.grad(bonus)(logits)
print(f"bonus gradient finite: {bool(jnp.all(jnp.isfinite(grad)))}")
before = float(pw.entropy(jax.nn.log_softmax(logits)))
after = float(pw.entropy(jax.nn.log_softmax(logits - 1.0 * grad)))
print(f"entropy before bonus step = {before:.4f}, after = {after:.4f}")
