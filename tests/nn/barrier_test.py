"""jaxlm.nn.barrier.materialize_grad: an identity whose backward is unchanged but not fused away."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.nn.barrier import materialize_grad


def _stack(x, ws, barrier):
    # A pre-norm-like residual chain: x + tanh(layer_norm(x) @ w), layer after layer.
    for w in ws:
        if barrier:
            x = materialize_grad(x)
        h = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
        x = x + jnp.tanh(h @ w)
    return jnp.sum(x**2)


def test_forward_and_gradients_are_unchanged():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((8, 8)) * 0.3, jnp.float32) for _ in range(4)]
    assert _stack(x, ws, True) == _stack(x, ws, False)
    with_barrier = jax.jit(jax.grad(_stack, argnums=(0, 1)), static_argnums=2)(x, ws, True)
    without = jax.jit(jax.grad(_stack, argnums=(0, 1)), static_argnums=2)(x, ws, False)
    for a, b in zip(jax.tree.leaves(with_barrier), jax.tree.leaves(without)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_backward_holds_a_conditional_that_xla_keeps():
    x, ws = jnp.ones((16, 8)), [jnp.eye(8)] * 3
    hlo = jax.jit(jax.grad(_stack), static_argnums=2).lower(x, ws, True).compile().as_text()
    assert hlo.count("conditional(") == 3


def test_non_finite_gradients_stay_non_finite():
    grad = jax.jit(jax.grad(lambda x, g: jnp.sum(materialize_grad(x) * g)))
    x = jnp.ones((3, 4))
    g = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(grad(x, g), g)
    g_nan_first = g.at[0, 0].set(jnp.nan)
    assert bool(jnp.all(jnp.isnan(grad(x, g_nan_first))))
    g_inf = g.at[2, 1].set(jnp.inf)
    np.testing.assert_array_equal(grad(x, g_inf), g_inf)
