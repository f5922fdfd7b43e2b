"""The SeqGAN oracle in JAX against an independent NumPy implementation of the data README's equations."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import oracle as oracle_data
from jaxlm.models.gan import oracle

README_NPZ = os.path.join(os.path.dirname(oracle_data.__file__), "seqgan_oracle.npz")


def _reference_nll(path, tokens):
    """NLL_oracle from the equations, written out independently (float64, loop over time)."""
    z = {k: np.asarray(v, np.float64) for k, v in np.load(path, allow_pickle=False).items()}
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    n, length = tokens.shape
    h = np.zeros((n, 32))
    c = np.zeros((n, 32))
    x = np.repeat(z["embedding"][0][None], n, axis=0)
    total = 0.0
    for t in range(length):
        i = sig(x @ z["W_i"] + h @ z["U_i"] + z["b_i"])
        f = sig(x @ z["W_f"] + h @ z["U_f"] + z["b_f"])
        o = sig(x @ z["W_o"] + h @ z["U_o"] + z["b_o"])
        c = f * c + i * np.tanh(x @ z["W_c"] + h @ z["U_c"] + z["b_c"])
        h = o * np.tanh(c)
        logits = h @ z["W_out"] + z["b_out"]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= logp[np.arange(n), tokens[:, t]].sum()
        x = z["embedding"][tokens[:, t]]
    return total / (n * length)


def test_the_package_ships_the_oracle_arrays():
    params = oracle_data.load_oracle()
    assert params["embedding"].shape == (5000, 32) and params["W_out"].shape == (32, 5000)
    assert all(v.dtype == np.float32 for v in params.values())


def test_oracle_nll_matches_the_numpy_equations_and_its_samples_have_the_published_entropy():
    params = {k: jnp.asarray(v) for k, v in oracle_data.load_oracle().items()}
    samples = np.asarray(jax.jit(oracle.sample, static_argnums=(2, 3))(params, jax.random.key(0), 400, 20))
    assert samples.shape == (400, 20) and samples.min() >= 0 and samples.max() < 5000
    reference = _reference_nll(README_NPZ, samples)
    np.testing.assert_allclose(float(jax.jit(oracle.nll)(params, jnp.asarray(samples))), reference, rtol=1e-5)
    np.testing.assert_allclose(oracle_data.nll(oracle_data.load_oracle(), samples), reference, rtol=1e-5)
    # The oracle's entropy rate is about 5.75 nats (the data README); 400 x 20 tokens give ~+-0.05.
    assert abs(reference - 5.75) < 0.15
    # Uniform tokens: about 11.43.
    uniform = np.random.default_rng(0).integers(0, 5000, (400, 20))
    assert abs(float(oracle.nll(params, jnp.asarray(uniform))) - 11.43) < 0.15
