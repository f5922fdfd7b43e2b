"""16-bit dropout draws: the dropped fraction, unbiasedness, determinism and the module's interface."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.nn import dropout as d


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(64, 128, 96), (33, 1001)], ids=["even", "odd-last-axis"])
def test_dropped_fraction_matches_the_rate(rate, shape):
    keep = np.asarray(d.keep_mask(jax.random.key(0), rate, shape))
    assert keep.shape == shape and keep.dtype == bool
    n = keep.size
    # Binomial standard deviation; 5 sigma.
    assert abs((1 - keep.mean()) - rate) < 5 * np.sqrt(rate * (1 - rate) / n)


def test_both_halves_of_each_word_are_used_independently():
    keep = np.asarray(d.keep_mask(jax.random.key(1), 0.5, (4096, 64)))
    even, odd = keep[:, 0::2].ravel(), keep[:, 1::2].ravel()
    # Neighbouring draws from the same 32-bit word agree about half the time, not always.
    assert abs(np.mean(even == odd) - 0.5) < 0.02


def test_dropout_is_unbiased_and_deterministic_per_key():
    x = jnp.full((256, 512), 3.0)
    rate = 0.3
    y = d.dropout(x, rate, jax.random.key(2))
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 3.0 * d.keep_scale(rate), rtol=1e-6)
    # The scale is the exact inverse of the keep probability the draws realize.
    assert d.keep_scale(rate) == pytest.approx(65536 / (65536 - round(rate * 65536)))
    assert float(y.mean()) == pytest.approx(3.0, rel=0.01)
    np.testing.assert_array_equal(y, d.dropout(x, rate, jax.random.key(2)))
    assert not np.array_equal(np.asarray(y), np.asarray(d.dropout(x, rate, jax.random.key(3))))


def test_extreme_rates_and_dtypes():
    x = jnp.ones((4, 6), jnp.bfloat16)
    assert bool(jnp.all(d.dropout(x, 0.0, jax.random.key(0)) == x))
    out = d.dropout(x, 1.0, jax.random.key(0))
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(out == 0))
    assert d.dropout(x, 0.5, jax.random.key(0)).dtype == jnp.bfloat16


def test_module_follows_flax_dropout_interface():
    x = jnp.ones((8, 10))
    module = d.Dropout(0.5)
    assert module.apply({}, x, deterministic=True) is x
    y = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert set(np.unique(np.asarray(y))) <= {0.0, float(d.keep_scale(0.5))}
    with pytest.raises(flax.errors.InvalidRngError):
        module.apply({}, x, deterministic=False)
