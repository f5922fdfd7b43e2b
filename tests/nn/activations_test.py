"""Hand-differentiated activations against flax.linen's and autodiff's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.nn import activations

CASES = [
    (activations.gelu_tanh, lambda x: nn.gelu(x, approximate=True)),
    (activations.gelu_exact, lambda x: nn.gelu(x, approximate=False)),
    (activations.silu, nn.silu),
]


def _x(dtype=jnp.float32):
    # Covers the tails (where tanh / erf saturate) and the region around 0.
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 801), jax.random.normal(jax.random.key(0), (1000,)) * 3])
    return x.astype(dtype)


@pytest.mark.parametrize("fn, reference", CASES, ids=["gelu_tanh", "gelu_exact", "silu"])
def test_values_and_gradients_match_autodiff_of_the_reference_in_float32(fn, reference):
    x = _x()
    np.testing.assert_allclose(fn(x), reference(x), rtol=1e-6, atol=1e-6)
    # A non-trivial cotangent: d/dx sum(sin(f(x))) = cos(f(x)) f'(x).
    grad = jax.grad(lambda v: jnp.sum(jnp.sin(fn(v))))(x)
    expected = jax.grad(lambda v: jnp.sum(jnp.sin(reference(v))))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, reference", CASES, ids=["gelu_tanh", "gelu_exact", "silu"])
def test_bfloat16_in_bfloat16_out_within_one_rounding_of_the_float32_value(fn, reference):
    x = _x(jnp.bfloat16)
    y = fn(x)
    assert y.dtype == jnp.bfloat16
    exact = reference(x.astype(jnp.float32))
    np.testing.assert_allclose(y.astype(jnp.float32), exact, rtol=2**-8, atol=1e-6)
    g = jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32)))(x)
    assert g.dtype == jnp.bfloat16
    expected = jax.grad(lambda v: jnp.sum(reference(v)))(x.astype(jnp.float32))
    np.testing.assert_allclose(g.astype(jnp.float32), expected, rtol=2**-7, atol=1e-6)


def test_the_mlp_uses_them():
    from jaxlm.nn import linears

    assert linears.activation("gelu") is activations.gelu_tanh
    assert linears.activation("swiglu") is activations.silu
