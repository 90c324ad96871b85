"""L1, L2 and elastic-net penalties (port of the seed's examples/basic_usage.exs).

Run: python examples/basic_usage.py
"""

import jax
import jax.numpy as jnp

import penwatch as pw

weights = jnp.array([1.0, -2.0, 3.0, 0.5])
print(f"weights = {weights.tolist()}")

# The seed README's numbers.
print(f"l1 = {float(pw.l1(weights)):.4f}")  # |1| + |-2| + |3| + |0.5| = 6.5
print(f"l2(strength=0.01) = {float(pw.l2(weights, strength=0.01)):.4f}")  # 0.01 * 14.25
print(f"elastic_net(l1_ratio=0.5) = {float(pw.elastic_net(weights, l1_ratio=0.5)):.4f}")

# Reductions: "sum" (default), "mean", "none" (element-wise values).
print(f"l1(reduction='mean') = {float(pw.l1(weights, reduction='mean')):.4f}")
print(f"l2(reduction='none') = {pw.l2(weights, reduction='none').tolist()}")

# Centering happens before clipping.
print(f"l2(center='mean') = {float(pw.l2(weights, center='mean')):.4f}")
print(f"l2(clip=1.0) = {float(pw.l2(weights, clip=1.0)):.4f}")
print(f"l2(center=0.5, clip=2.0) = {float(pw.l2(weights, center=0.5, clip=2.0)):.4f}")

# Add a penalty to a task loss and differentiate: the L1 subgradient at 0 is 0.
x, y = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([1.0, 2.0])
params = jnp.array([0.5, 0.0])


def loss(p):
    base = jnp.mean((x @ p - y) ** 2)
    return base + pw.l1(p, strength=0.01)


value, grad = jax.value_and_grad(loss)(params)
print(f"regularized loss = {float(value):.4f}")
print(f"gradient = {[round(g, 4) for g in grad.tolist()]}")

# Precision is kept: bfloat16 in, bfloat16 out.
print(f"l2 of bfloat16 weights has dtype {pw.l2(weights.astype(jnp.bfloat16)).dtype}")

# Bad options fail early with a message naming the function, option and allowed values.
try:
    pw.l2(weights, clip=-1.0)
except ValueError as err:
    print(f"ValueError: {err}")
