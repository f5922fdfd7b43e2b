"""Each position encoding's defining property."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import logical_axes as ax
from jaxlm.nn.embeddings import LearnedPositions, SinusoidalPositions, positions_like, sinusoidal_table
from jaxlm.nn.positions import (
    POSITION_ENCODINGS,
    RelativePositionBias,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    relative_position_bucket,
    rope_inv_frequencies,
)


def test_position_encoding_names():
    assert set(POSITION_ENCODINGS) == {"learned", "sinusoidal", "relative", "rope", "alibi", "none"}


# ---------------------------------------------------------------------------------------------
# Absolute encodings.


def test_sinusoidal_dot_products_depend_only_on_offset():
    table = sinusoidal_table(64, 16).astype(np.float64)
    for offset in (1, 5, 17):
        dots = [table[p] @ table[p + offset] for p in range(0, 64 - offset)]
        np.testing.assert_allclose(dots, dots[0], rtol=1e-5)
    np.testing.assert_allclose(table[:, 0], np.sin(np.arange(64)), atol=1e-6)  # channel 0: sin(p)
    np.testing.assert_allclose(table[:, 1], np.cos(np.arange(64)), atol=1e-6)


def test_absolute_position_modules():
    ids = jnp.zeros((2, 5), jnp.int32)
    pos = positions_like(ids, offset=3)
    np.testing.assert_array_equal(pos[1], np.arange(3, 8))
    sin = SinusoidalPositions(max_len=16, features=8).apply({}, pos)
    np.testing.assert_allclose(sin[0], sinusoidal_table(16, 8)[3:8])
    learned = LearnedPositions(max_len=16, features=8)
    params = learned.init(jax.random.PRNGKey(0), pos)["params"]
    assert params["embedding"].names == (ax.POSITIONS, ax.EMBED)
    assert learned.apply({"params": params}, pos).shape == (2, 5, 8)


# ---------------------------------------------------------------------------------------------
# RoPE.


def test_rope_scores_depend_only_on_offset():
    rng = np.random.default_rng(0)
    h = 16
    q = jnp.asarray(rng.normal(size=(1, 1, 1, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, h)), jnp.float32)

    def score(i, j):
        qi = apply_rope(q, jnp.array([[i]]))
        kj = apply_rope(k, jnp.array([[j]]))
        return float(jnp.sum(qi * kj))

    for offset in (0, 1, 3, -4, 50):
        scores = [score(i + offset, i) for i in (0, 7, 100, 1000)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert abs(score(3, 0) - score(0, 0)) > 1e-3  # but the offset matters


def test_rope_matches_complex_rotation_and_keeps_norms():
    rng = np.random.default_rng(1)
    b, t, n, h = 2, 5, 3, 8
    x = rng.normal(size=(b, t, n, h)).astype(np.float32)
    pos = rng.integers(0, 500, size=(b, t))
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos)))
    # Independent formulation: channel pairs (c, c + H/2) as complex numbers times e^{i p theta_c}.
    theta = 10_000.0 ** (-np.arange(0, h, 2) / h)
    z = (x[..., : h // 2] + 1j * x[..., h // 2 :]) * np.exp(1j * pos[:, :, None, None] * theta)
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], axis=-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.zeros((b, t), jnp.int32)), x, rtol=0, atol=0)


def test_rope_scaling_hooks():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32)
    pos = jnp.arange(4)[None] * 4
    # Linear position interpolation: position p with scale s is position p / s.
    np.testing.assert_allclose(apply_rope(x, pos, scale=4.0), apply_rope(x, pos // 4), rtol=1e-6, atol=1e-6)
    # Frequency hook: halving every frequency is the same as halving every position.
    freqs = rope_inv_frequencies(8) / 2
    np.testing.assert_allclose(apply_rope(x, pos, inv_frequencies=freqs), apply_rope(x, pos // 2), atol=1e-6)
    with pytest.raises(ValueError, match="even head_dim"):
        rope_inv_frequencies(7)


# ---------------------------------------------------------------------------------------------
# ALiBi.


@pytest.mark.parametrize(
    "num_heads, exponents",
    [
        (8, [1, 2, 3, 4, 5, 6, 7, 8]),  # 2^(-8i/8)
        (4, [2, 4, 6, 8]),  # 2^(-8i/4)
        (16, [i / 2 for i in range(1, 17)]),
        (6, [2, 4, 6, 8, 1, 3]),  # 4 heads' slopes, then every other slope of 8 heads
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),  # 8 heads', then every other of 16
    ],
)
def test_alibi_slopes_follow_the_paper(num_heads, exponents):
    np.testing.assert_allclose(alibi_slopes(num_heads), 2.0 ** -np.asarray(exponents), rtol=1e-6)


def test_alibi_bias_is_linear_in_distance_per_head():
    bias = np.asarray(alibi_bias(jnp.arange(5), jnp.arange(7), num_heads=4))
    assert bias.shape == (1, 4, 5, 7)
    slopes = alibi_slopes(4)
    i, j = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    np.testing.assert_allclose(bias, -slopes[None, :, None, None] * np.abs(i - j)[None, None], rtol=1e-6)
    batched = alibi_bias(jnp.array([[3, 4], [0, 1]]), jnp.array([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]), 4)
    assert batched.shape == (2, 4, 2, 5)
    np.testing.assert_allclose(batched[0, :, 1, 4], 0.0)  # query 4 vs key 4


# ---------------------------------------------------------------------------------------------
# T5 relative position bias.

# Buckets by hand from the T5 definition, num_buckets=32, max_distance=128, for
# relative = key_position - query_position. Bidirectional: 16 buckets per direction (keys after
# the query get +16); 8 exact (distance 0..7), then 8 log-spaced up to 128:
# bucket = 8 + floor(log(d / 8) / log(128 / 8) * 8), capped at 15.
BIDIRECTIONAL = {
    0: 0, -1: 1, -7: 7, -8: 8, -10: 8, -12: 9, -20: 10, -50: 13, -100: 15, -127: 15, -128: 15, -1000: 15,
    1: 17, 7: 23, 8: 24, 12: 25, 20: 26, 50: 29, 200: 31,
}  # fmt: skip
# Causal (unidirectional): keys after the query all map to 0; 16 exact, then
# bucket = 16 + floor(log(d / 16) / log(128 / 16) * 16), capped at 31.
CAUSAL = {
    5: 0, 1: 0, 0: 0, -1: 1, -15: 15, -16: 16, -20: 17, -40: 23, -100: 30, -127: 31, -128: 31, -500: 31,
}  # fmt: skip


@pytest.mark.parametrize("bidirectional, table", [(True, BIDIRECTIONAL), (False, CAUSAL)])
def test_t5_buckets_match_hand_computed(bidirectional, table):
    rel = jnp.asarray(list(table))
    got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert dict(zip(table, np.asarray(got).tolist())) == table
    # The hand values follow the formula in the comments above.
    nb = 16 if bidirectional else 32
    exact = nb // 2
    for r, bucket in table.items():
        d = abs(r) if bidirectional else max(-r, 0)
        want = d if d < exact else min(nb - 1, exact + int(math.log(d / exact) / math.log(128 / exact) * (nb - exact)))
        assert bucket == want + (nb if bidirectional and r > 0 else 0)


def test_t5_buckets_cover_range_monotonically():
    rel = jnp.arange(-300, 301)
    bi = np.asarray(relative_position_bucket(rel, bidirectional=True))
    assert bi.min() == 0 and bi.max() == 31
    assert np.all(np.diff(bi[:300]) <= 0) and np.all(np.diff(bi[301:]) >= 0)  # grows with distance
    causal = np.asarray(relative_position_bucket(rel, bidirectional=False))
    assert np.all(causal[300:] == 0) and causal.max() == 31


def test_relative_position_bias_module():
    module = RelativePositionBias(num_heads=4, bidirectional=False)
    q_pos, k_pos = jnp.arange(6), jnp.arange(9)
    params = module.init(jax.random.PRNGKey(0), q_pos, k_pos)["params"]
    table = params["rel_embedding"]
    assert table.names == (ax.POSITIONS, ax.HEADS) and table.value.shape == (32, 4)
    bias = jax.jit(module.apply)({"params": params}, q_pos, k_pos)
    assert bias.shape == (1, 4, 6, 9)
    buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], bidirectional=False)
    np.testing.assert_array_equal(bias[0], np.asarray(table.value)[np.asarray(buckets)].transpose(2, 0, 1))
    batched = jax.jit(module.apply)({"params": params}, jnp.array([[4, 5], [0, 1]]), jnp.tile(jnp.arange(6), (2, 1)))
    assert batched.shape == (2, 4, 2, 6)
    np.testing.assert_array_equal(batched[0, :, 0, :5], bias[0, :, 4, :5])  # same offsets, same bias
