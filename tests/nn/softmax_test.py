"""jaxlm.nn.softmax.masked_softmax: values and gradients against the plain expression and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.nn.blockwise import NEG
from jaxlm.nn.softmax import masked_softmax


def _plain(logits, mask):
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    p = jax.nn.softmax(jnp.where(mask, logits, NEG), axis=-1)
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), p, 0.0)


def _case(masked):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 3, 5, 7)) * 3, jnp.float32)
    if not masked:
        return logits, None
    mask = rng.random((2, 1, 5, 7)) < 0.6
    mask[0, 0, 2] = False  # a row that may attend to nothing
    return logits, jnp.asarray(mask)


@pytest.mark.parametrize("masked", [False, True])
def test_values_match_numpy(masked):
    logits, mask = _case(masked)
    x = np.asarray(logits, np.float64)
    if mask is not None:
        x = np.where(np.asarray(mask), x, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(-1, keepdims=True))
        want = np.nan_to_num(e / e.sum(-1, keepdims=True))
    got = masked_softmax(logits, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if mask is not None:
        assert not np.asarray(got[0, :, 2]).any()  # the empty row is zeros, not uniform


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_matches_autodiff_of_the_plain_expression(masked):
    logits, mask = _case(masked)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(logits.shape), jnp.float32)
    got = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * g))(logits)
    want = jax.grad(lambda x: jnp.sum(_plain(x, mask) * g))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if mask is not None:
        assert not np.asarray(got)[~np.broadcast_to(np.asarray(mask), got.shape)].any()


def test_jit_and_a_mask_argument_that_broadcasts():
    logits, _ = _case(False)
    mask = jnp.tril(jnp.ones((5, 7), bool))[None, None]
    out = jax.jit(jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) ** 2)))(logits)
    assert out.shape == logits.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("masked", [False, True])
def test_bfloat16_probabilities_are_the_float32_ones_rounded_and_keep_the_gradient(masked):
    logits, mask = _case(masked)
    p32 = masked_softmax(logits, mask)
    p16 = masked_softmax(logits, mask, jnp.bfloat16)
    assert p16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(p16, p32.astype(jnp.bfloat16))
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(logits.shape), jnp.float32)
    g32 = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * cot))(logits)
    g16 = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask, jnp.bfloat16).astype(jnp.float32) * cot))(logits)
    assert g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, g32, rtol=2e-2, atol=2e-2 * float(jnp.abs(g32).max()))
