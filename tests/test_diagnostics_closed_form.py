"""Closed-form parameter terms (l1_term, l2_term, elastic_net_term) against autodiff.

The reference is ``jax.grad`` of ``penwatch.penalties``' own ``l1`` / ``l2`` /
``elastic_net`` (``reduction="sum"``), whose subgradient at 0 is ``sign(0) = 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from penwatch import diagnostics as D
from penwatch.penalties import elastic_net, l1, l2

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize(
    ("term", "ref"),
    [
        (D.l1_term(0.7), lambda p: l1(p, strength=0.7)),
        (D.l2_term(-0.3), lambda p: l2(p, strength=-0.3)),
        (D.elastic_net_term(1.5, 0.4), lambda p: elastic_net(p, strength=1.5, l1_ratio=0.4)),
        (D.elastic_net_term(2.0, 1.0), lambda p: l1(p, strength=2.0)),
        (D.elastic_net_term(2.0, 0.0), lambda p: l2(p, strength=2.0)),
    ],
)
def test_closed_form_equals_autodiff_of_penalties(term, ref):
    theta = jnp.array([[0.0, -1.5, 2.0], [0.0, 3.0, -0.25]])  # exact zeros included
    value, grad = jax.jit(lambda t, p: t.value_and_grad(p))(term, theta)
    np.testing.assert_allclose(value, ref(theta), rtol=1e-12)
    np.testing.assert_allclose(grad, jax.grad(ref)(theta), rtol=1e-12, atol=0)
    assert np.all(np.asarray(grad)[:, 0] == 0.0) or term.kind == "l2"  # sign(0) = 0


def test_closed_form_masks():
    params = {
        "a": {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.0, 3.0])},
        "c": jnp.array([4.0, -5.0]),
    }
    # prefix mask: the whole "a" subtree on, "c" off
    term = D.l1_term(0.5, mask={"a": True, "c": False})
    v, g = term.value_and_grad(params)
    np.testing.assert_allclose(v, 0.5 * 6.0)
    np.testing.assert_allclose(g["a"]["w"], [0.5, -0.5])
    np.testing.assert_allclose(g["a"]["b"], [0.0, 0.5])
    np.testing.assert_allclose(g["c"], [0.0, 0.0])
    # element-wise boolean array mask, callable mask, under jit
    term = D.l2_term(
        2.0, mask=lambda p: {"a": {"w": jnp.array([True, False]), "b": False}, "c": True}
    )
    v, g = jax.jit(lambda t, p: t.value_and_grad(p))(term, params)
    np.testing.assert_allclose(v, 2.0 * (1.0 + 16.0 + 25.0))
    np.testing.assert_allclose(g["a"]["w"], [4.0, 0.0])
    np.testing.assert_allclose(g["a"]["b"], [0.0, 0.0])
    np.testing.assert_allclose(g["c"], [16.0, -20.0])
    with pytest.raises(ValueError, match="prefix"):
        D.l1_term(1.0, mask={"zzz": True}).value(params)


def test_terms_are_pytrees_with_weights_as_leaves():
    term = D.elastic_net_term(0.5, 0.25, mask=lambda p: {"w": True})
    leaves, treedef = jax.tree.flatten(term)
    assert [float(v) for v in leaves] == [0.5, 0.25]
    again = jax.tree.unflatten(treedef, [2.0, 1.0])
    assert again.kind == "elastic_net" and again.mask_fn is term.mask_fn
    traces = []

    @jax.jit
    def value(t, p):
        traces.append(1)
        return t.value(p)

    p = {"w": jnp.array([1.0, -2.0])}
    np.testing.assert_allclose(value(D.l2_term(1.0), p), 5.0)
    np.testing.assert_allclose(value(D.l2_term(3.0), p), 15.0)
    assert len(traces) == 1
