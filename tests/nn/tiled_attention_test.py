"""Vector-form masks and biases, sliding windows and the rolling KV cache, against NumPy.

Masks given as ``TokenMask`` (packing segments, key padding) and biases as ``PositionBias``
(ALiBi, T5 relative) must give every implementation the same forward output and gradients as
the float64 NumPy reference of ``attention_test`` run on the dense mask and bias built here
independently; blockwise (which evaluates them per tile) must also never compile a ``[T, S]``
buffer. Sliding windows (``window``) in every implementation and in cached decoding (a rolling
buffer of ``window`` slots) must equal full attention under the equivalent mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_test import TOL, np_attention, np_attention_grads

from jaxlm.nn import masks
from jaxlm.nn.attention import IMPLEMENTATIONS, MultiHeadAttention, blockwise_attention
from jaxlm.nn.positions import PositionBias, alibi, alibi_slopes, relative_position_bucket

B, T, N, K, H = 2, 11, 4, 2, 8
SEG = np.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11])
POS = np.stack([np.r_[np.arange(5), np.arange(4), 0, 0], np.arange(11)])
IMPLS = {
    "xla": IMPLEMENTATIONS["xla"],
    "dot_product": IMPLEMENTATIONS["dot_product"],
    "blockwise": functools.partial(blockwise_attention, block_q=4, block_kv=3),
    "ring": functools.partial(IMPLEMENTATIONS["ring"], block_q=4, block_kv=3),  # no mesh: one device
}


def np_mask(causal: bool, window: int) -> np.ndarray:
    """``[B, 1, T, T]`` from the definitions: same segment (not 0), causal, window by index."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    m = (SEG[:, :, None] == SEG[:, None, :]) & (SEG[:, :, None] > 0)
    if causal:
        m = m & (j <= i)
    if window:
        m = m & (j > i - window) & (causal | (j < i + window))
    return m[:, None]


def np_bias(kind: str, table: np.ndarray, causal: bool) -> np.ndarray:
    """``[B, N, T, T]``: ALiBi ``-slope |i - j|`` or T5's ``table[bucket(j - i)]`` by position."""
    rel = POS[:, None, :] - POS[:, :, None]
    if kind == "alibi":
        return -alibi_slopes(N)[None, :, None, None] * np.abs(rel)[:, None]
    buckets = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=not causal))
    return np.transpose(table[buckets], (0, 3, 1, 2))


def _bias_spec(kind: str, table, causal: bool) -> PositionBias:
    if kind == "alibi":
        return alibi(jnp.asarray(POS), jnp.asarray(POS), N)
    return PositionBias(table, jnp.asarray(POS), jnp.asarray(POS), kind="relative", bidirectional=not causal)


@pytest.mark.parametrize("kind", ["alibi", "relative"])
@pytest.mark.parametrize("causal,window", [(True, 0), (True, 3), (False, 4)])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_vector_masks_and_biases_match_numpy(impl, kind, causal, window):
    rng = np.random.default_rng(0)
    shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]
    q, k, v, d_out = (rng.normal(size=shape).astype(np.float32) for shape in shapes)
    table = rng.normal(size=(32, N)).astype(np.float32)
    token_mask = masks.TokenMask(jnp.asarray(SEG), jnp.asarray(SEG))
    fn = functools.partial(IMPLS[impl], mask=token_mask, causal=causal, window=window)

    @jax.jit
    def grads(q, k, v, table):
        def loss(q, k, v, table):
            out = fn(q, k, v, bias=_bias_spec(kind, table, causal))
            return jnp.sum(out * d_out), out

        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, table)

    (dq, dk, dv, d_table), out = grads(q, k, v, table)
    mask, bias = np_mask(causal, window), np_bias(kind, table, causal)
    np.testing.assert_allclose(out, np_attention(q, k, v, mask, bias)[0], **TOL)
    ref = np_attention_grads(q, k, v, d_out, mask, bias)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        np.testing.assert_allclose(got, want, err_msg=name, **TOL)
    if kind == "relative":  # d table[bucket, n] = sum of d bias over the (b, t, s) in that bucket
        rel = POS[:, None, :] - POS[:, :, None]
        buckets = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=not causal))
        want = np.zeros_like(table, dtype=np.float64)
        np.add.at(want, buckets, np.transpose(ref[3], (0, 2, 3, 1)))
        np.testing.assert_allclose(d_table, want, err_msg="d_table", **TOL)


def test_blockwise_with_vector_masks_has_linear_memory():
    """Doubling the length at most doubles the compiled backward's temporaries (quadratic: x4)."""

    def temp_bytes(t: int) -> int:
        x = jnp.zeros((1, t, 2, 16), jnp.float32)
        seg, pos = jnp.ones((1, t), jnp.int32), jnp.arange(t)[None]

        def loss(q, k, v, table):
            bias = PositionBias(table, pos, pos, kind="relative", bidirectional=False)
            out = blockwise_attention(q, k, v, mask=masks.TokenMask(seg, seg), bias=bias, causal=True, window=300)
            return jnp.sum(out)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, jnp.zeros((32, 2))).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(4096)
    assert large < 2.2 * small, (small, large)
    assert large - small < 2048 * 2048  # what one more bool [T, S] slice would add


def _mha(impl: str = "xla", **kw) -> MultiHeadAttention:
    return MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, implementation=impl, **kw)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_rolling_cache_decoding_equals_windowed_forward(impl):
    """Prefill then one token at a time through a 3-slot rolling cache == the windowed full forward."""
    b, t, prefill, window = 2, 9, 4, 3
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, 32))
    seg = jnp.ones((b, t), jnp.int32)
    module = _mha(impl, rope_max_wavelength=10_000.0)
    variables = module.init(jax.random.PRNGKey(1), x, deterministic=True, decode=True, window=window)
    params, cache = variables["params"], variables["cache"]
    assert cache["cached_key"].shape == (b, window, 2, 8)  # O(window), not O(t)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    bias = alibi(pos, pos, 4)
    full = module.apply(
        {"params": params}, x, mask=masks.TokenMask(seg, seg), bias=bias, causal=True, window=window, deterministic=True
    )

    @jax.jit
    def step(variables, x, start):
        chunk_bias = alibi(jax.lax.dynamic_slice_in_dim(pos, start, x.shape[1], axis=1), pos, 4)
        return module.apply(
            variables, x, bias=chunk_bias, deterministic=True, decode=True, window=window, mutable=["cache"]
        )

    y, state = step({"params": params, "cache": cache}, x[:, :prefill], 0)
    outs = [y]
    for i in range(prefill, t):
        y, state = step({"params": params, **state}, x[:, i : i + 1], i)
        outs.append(y)
    assert int(state["cache"]["cache_index"]) == t
    np.testing.assert_array_equal(state["cache"]["slot_tokens"][0], [7, 8, 9])  # 1 + token index
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_windowed_full_cache_with_traced_window_equals_forward():
    """A traced window (scanned mixed layers) keeps the full cache and masks it."""
    b, t, window = 1, 6, 2
    x = jax.random.normal(jax.random.PRNGKey(2), (b, t, 32))
    module = _mha()
    variables = module.init(jax.random.PRNGKey(1), x, deterministic=True, decode=True, window=jnp.int32(window))
    assert variables["cache"]["cached_key"].shape[1] == t
    full = module.apply({"params": variables["params"]}, x, causal=True, window=window, deterministic=True)

    @jax.jit
    def step(variables, x):
        return module.apply(variables, x, deterministic=True, decode=True, window=jnp.int32(window), mutable=["cache"])

    state, outs = {"cache": variables["cache"]}, []
    for i in range(t):
        y, state = step({"params": variables["params"], **state}, x[:, i : i + 1])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_rolling_cache_refuses_a_mask():
    x = jnp.ones((1, 4, 32))
    module = _mha()
    variables = module.init(jax.random.PRNGKey(0), x, deterministic=True, decode=True, window=2)
    with pytest.raises(ValueError, match="rolling"):
        module.apply(
            variables,
            x[:, :1],
            mask=jnp.ones((1, 1, 1, 1), bool),
            deterministic=True,
            decode=True,
            window=2,
            mutable=["cache"],
        )


def test_window_mask_semantics():
    i, j = np.arange(5)[:, None], np.arange(5)[None]
    # Causal: only the lower bound (the causal mask itself is applied separately).
    np.testing.assert_array_equal(np.asarray(masks.window_mask(5, 5, 2, causal=True))[0, 0], j > i - 2)
    both = np.asarray(masks.window_mask(5, 5, 2, causal=False))[0, 0]
    np.testing.assert_array_equal(both, np.abs(i - j) < 2)
    np.testing.assert_array_equal(np.asarray(masks.window_mask(3, 3, 0, causal=True)), True)
