"""Attention implementations against an independent float64 NumPy reference.

The reference (``np_attention`` / ``np_attention_grads``) is written from the definition with
per-(batch, head, query) loops: a softmax over the allowed keys, dropout as an explicit keep
mask, and the backward pass derived by hand (softmax Jacobian). It shares no code with jaxlm; its
backward pass is itself checked against central finite differences of its forward pass. Every
implementation's forward output and its ``jax.grad`` w.r.t. query, key, value and bias must match
it to 1e-5 in float32. A query that may attend to nothing outputs zeros (the documented choice).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.nn import masks
from jaxlm.nn.attention import (
    IMPLEMENTATIONS,
    MultiHeadAttention,
    attention,
    blockwise_attention,
    dot_product_attention,
    xla_attention,
)
from jaxlm.nn.blockwise import blockwise_dropout_mask
from jaxlm.nn.dropout import keep_mask, keep_scale

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Independent NumPy reference.


def _full(x, shape, dtype):
    return np.ones(shape, dtype) if x is None else np.broadcast_to(np.asarray(x, dtype), shape)


def np_attention(q, k, v, mask=None, bias=None, keep=None, rate=0.0):
    """Return (out [B,T,N,H], probs [B,N,T,S] before dropout) in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t_, n_, h_ = q.shape
    s_, k_heads = k.shape[1], k.shape[2]
    group = n_ // k_heads
    mask = _full(mask, (b_, n_, t_, s_), bool)
    bias = np.zeros((b_, n_, t_, s_)) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), mask.shape)
    scale = _full(keep, mask.shape, bool) / (1.0 - rate)
    out = np.zeros_like(q)
    probs = np.zeros(mask.shape)
    for b in range(b_):
        for n in range(n_):
            kv = n // group
            for t in range(t_):
                allowed = mask[b, n, t]
                if not allowed.any():
                    continue
                logits = np.array([q[b, t, n] @ k[b, s, kv] for s in range(s_)]) / np.sqrt(h_) + bias[b, n, t]
                e = np.where(allowed, np.exp(logits - logits[allowed].max()), 0.0)
                probs[b, n, t] = e / e.sum()
                out[b, t, n] = (probs[b, n, t] * scale[b, n, t]) @ v[b, :, kv]
    return out, probs


def np_attention_grads(q, k, v, d_out, mask=None, bias=None, keep=None, rate=0.0):
    """Hand-derived backward pass: (dq, dk, dv, dbias [B,N,T,S] unreduced)."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    _, probs = np_attention(q, k, v, mask, bias, keep, rate)
    b_, t_, n_, h_ = q.shape
    group = n_ // k.shape[2]
    scale = _full(keep, probs.shape, bool) / (1.0 - rate)
    dq, dk, dv, dbias = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v), np.zeros_like(probs)
    for b in range(b_):
        for n in range(n_):
            kv = n // group
            for t in range(t_):
                p, z = probs[b, n, t], scale[b, n, t]
                dv[b, :, kv] += np.outer(p * z, d_out[b, t, n])
                dp = (v[b, :, kv] @ d_out[b, t, n]) * z
                ds = p * (dp - np.sum(p * dp))  # softmax Jacobian-vector product
                dq[b, t, n] += ds @ k[b, :, kv] / np.sqrt(h_)
                dk[b, :, kv] += np.outer(ds, q[b, t, n]) / np.sqrt(h_)
                dbias[b, n, t] = ds
    return dq, dk, dv, dbias


def _reduce_to(x, shape):
    """Sum a full [B,N,T,S] gradient down to a broadcast bias shape."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(axes, keepdims=True)


def test_numpy_reference_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    b, t, s, n, kh, h = 1, 3, 4, 2, 1, 3
    q, k, v = rng.normal(size=(b, t, n, h)), rng.normal(size=(b, s, kh, h)), rng.normal(size=(b, s, kh, h))
    bias = rng.normal(size=(1, n, t, s))
    mask = rng.random((b, 1, t, s)) > 0.3
    mask[0, 0, 1] = False  # an empty row
    keep = rng.random((b, n, t, s)) > 0.2
    d_out = rng.normal(size=(b, t, n, h))
    grads = np_attention_grads(q, k, v, d_out, mask, bias, keep, 0.2)
    analytic = (*grads[:3], _reduce_to(grads[3], bias.shape))

    def loss(q, k, v, bias):
        return np.sum(np_attention(q, k, v, mask, bias, keep, 0.2)[0] * d_out)

    args = [q, k, v, bias]
    for i, g in enumerate(analytic):
        numeric = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[i][idx] += 1e-6
            minus[i][idx] -= 1e-6
            numeric[idx] = (loss(*plus) - loss(*minus)) / 2e-6
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Cases: every mask kind, broadcast mask/bias shapes, MHA / GQA / MQA, self and cross lengths.

B = 2


def _case(name):
    """Return (T, S, N, K, mask, bias_shape, causal_flag)."""
    rng = np.random.default_rng(1)
    if name == "none":  # no mask; a per-key bias broadcast over batch, heads and queries
        return 5, 7, 4, 4, None, (1, 1, 1, 7), False
    if name == "padding":  # cross-attention, padded queries and keys
        q_valid = np.arange(6)[None] < np.array([[6], [4]])
        k_valid = np.arange(9)[None] < np.array([[9], [5]])
        return 6, 9, 4, 2, masks.padding_mask(jnp.asarray(q_valid), jnp.asarray(k_valid)), (B, 1, 1, 9), False
    pos = jnp.broadcast_to(jnp.arange(8), (B, 8))
    if name == "causal":
        return 8, 8, 4, 1, masks.causal_mask(pos, pos), (1, 4, 8, 8), False
    if name == "segment":  # packed documents, with padding (segment 0 attends nowhere)
        seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 2, 3, 0]])
        return 8, 8, 4, 2, masks.combine(masks.causal_mask(pos, pos), masks.segment_mask(seg, seg)), (B, 4, 8, 8), False
    if name == "per_head":  # random 3-D [N, T, S] mask with empty rows; a per-query bias
        m = rng.random((4, 7, 6)) > 0.5
        m[1, 3] = False
        return 7, 6, 4, 2, jnp.asarray(m), (B, 4, 7, 1), False
    if name == "causal_flag":  # causal=True (no causal mask materialised) plus key padding
        k_valid = np.arange(8)[None] < np.array([[8], [6]])
        return 8, 8, 4, 2, masks.padding_mask(jnp.ones((B, 8), bool), jnp.asarray(k_valid)), None, True
    raise ValueError(name)


CASES = ["none", "padding", "causal", "segment", "per_head", "causal_flag"]
IMPLS = {
    "xla": xla_attention,
    "dot_product": dot_product_attention,
    "blockwise": blockwise_attention,
    "blockwise_small_blocks": functools.partial(blockwise_attention, block_q=3, block_kv=4),
}


def _inputs(t, s, n, kh, bias_shape, h=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, n, h)).astype(np.float32)
    k = rng.normal(size=(B, s, kh, h)).astype(np.float32)
    v = rng.normal(size=(B, s, kh, h)).astype(np.float32)
    bias = None if bias_shape is None else rng.normal(size=bias_shape).astype(np.float32)
    d_out = rng.normal(size=(B, t, n, h)).astype(np.float32)
    return q, k, v, bias, d_out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_and_gradients_match_numpy(impl, case):
    t, s, n, kh, mask, bias_shape, causal = _case(case)
    q, k, v, bias, d_out = _inputs(t, s, n, kh, bias_shape)
    np_mask = None if mask is None else np.asarray(mask)
    if causal:
        tril = np.tril(np.ones((t, s), bool))[None, None]
        np_mask = tril if np_mask is None else (np_mask & tril)
    fn = functools.partial(IMPLS[impl], mask=mask, causal=causal)

    @jax.jit
    def loss_and_grads(q, k, v, bias):
        def loss(q, k, v, bias):
            out = fn(q, k, v, bias=bias)
            return jnp.sum(out * d_out), out

        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        return jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)

    grads, out = loss_and_grads(q, k, v, bias)
    ref_out, _ = np_attention(q, k, v, np_mask, bias)
    np.testing.assert_allclose(out, ref_out, **TOL)
    ref = np_attention_grads(q, k, v, d_out, np_mask, bias)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        np.testing.assert_allclose(got, want, err_msg=name, **TOL)
    if bias is not None:
        np.testing.assert_allclose(grads[3], _reduce_to(ref[3], bias.shape), err_msg="dbias", **TOL)


def test_empty_rows_are_zero_and_finite():
    t, s, n, kh, mask, _, _ = _case("segment")
    q, k, v, _, _ = _inputs(t, s, n, kh, None)
    for impl in IMPLS.values():

        @jax.jit
        def out_and_grad(q, f=impl):
            return f(q, k, v, mask=mask), jax.grad(lambda q: jnp.sum(f(q, k, v, mask=mask) ** 2))(q)

        out, g = out_and_grad(q)
        assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(g)).all()
        np.testing.assert_array_equal(np.asarray(out)[0, 5:], 0.0)  # segment id 0: padding


def test_dropout_xla_matches_numpy_with_same_keep_mask():
    t, s, n, kh, mask, bias_shape, _ = _case("causal")
    q, k, v, bias, d_out = _inputs(t, s, n, kh, bias_shape)
    rng, rate = jax.random.PRNGKey(3), 0.3
    keep = np.asarray(keep_mask(rng, rate, (B, kh, n // kh, t, s))).reshape(B, n, t, s)
    drawn = 1 - 1 / keep_scale(rate)  # the rate the 16-bit draws realize (within 2**-17 of rate)

    def loss(q, k, v):
        out = xla_attention(q, k, v, mask=mask, bias=bias, dropout_rate=rate, dropout_rng=rng, deterministic=False)
        return jnp.sum(out * d_out), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(out, np_attention(q, k, v, np.asarray(mask), bias, keep, drawn)[0], **TOL)
    for got, want in zip(grads, np_attention_grads(q, k, v, d_out, np.asarray(mask), bias, keep, drawn)):
        np.testing.assert_allclose(got, want, **TOL)
    # dot_product has no dropout: it falls back to exactly this computation.
    fallback = jax.jit(
        lambda q, k, v: dot_product_attention(
            q, k, v, mask=mask, bias=bias, dropout_rate=rate, dropout_rng=rng, deterministic=False
        )
    )(q, k, v)
    np.testing.assert_allclose(fallback, out, **TOL)


def test_dropout_blockwise_matches_numpy_with_its_keep_mask():
    t, s, n, kh, mask, bias_shape, _ = _case("segment")
    q, k, v, bias, d_out = _inputs(t, s, n, kh, bias_shape)
    rng, rate = jax.random.PRNGKey(4), 0.25
    blocks = dict(block_q=3, block_kv=5)
    keep = np.asarray(jax.jit(lambda r: blockwise_dropout_mask(r, (B, n, t, s), kh, rate, **blocks))(rng))
    assert abs(keep.mean() - (1 - rate)) < 0.1
    drawn = 1 - 1 / keep_scale(rate)

    @jax.jit
    def loss_and_grads(q, k, v, bias):
        def loss(q, k, v, bias):
            out = blockwise_attention(
                q, k, v, mask=mask, bias=bias, dropout_rate=rate, dropout_rng=rng, deterministic=False, **blocks
            )
            return jnp.sum(out * d_out), out

        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)

    grads, out = loss_and_grads(q, k, v, bias)
    np_mask = np.asarray(mask)
    np.testing.assert_allclose(out, np_attention(q, k, v, np_mask, bias, keep, drawn)[0], **TOL)
    ref = np_attention_grads(q, k, v, d_out, np_mask, bias, keep, drawn)
    for got, want in zip(grads, (*ref[:3], _reduce_to(ref[3], bias.shape))):
        np.testing.assert_allclose(got, want, **TOL)
    # deterministic=True turns dropout off.
    off = jax.jit(
        lambda q, k, v: blockwise_attention(q, k, v, mask=mask, dropout_rate=rate, dropout_rng=rng, deterministic=True)
    )(q, k, v)
    np.testing.assert_allclose(off, np_attention(q, k, v, np_mask)[0], **TOL)


@pytest.mark.parametrize("impl", ["xla", "dot_product", "blockwise"])
def test_return_weights(impl):
    t, s, n, kh, mask, bias_shape, _ = _case("segment")
    q, k, v, bias, _ = _inputs(t, s, n, kh, bias_shape)
    out, weights = attention(impl)(q, k, v, mask=mask, bias=bias, return_weights=True)
    ref_out, ref_probs = np_attention(q, k, v, np.asarray(mask), bias)
    assert weights.shape == (B, n, t, s)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(weights, ref_probs, **TOL)


def test_registry_and_unknown_name():
    assert set(IMPLEMENTATIONS) == {"xla", "dot_product", "blockwise", "ring"}
    with pytest.raises(ValueError, match="valid: xla, dot_product, blockwise, ring"):
        attention("flash")


def test_blockwise_memory_is_linear_in_length():
    b, t, n, h = 1, 1024, 2, 16
    x = jnp.zeros((b, t, n, h), jnp.float32)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, causal=True)), argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    quadratic = b * n * t * t * 4  # one float32 [B, N, T, S] matrix
    assert temp_bytes(xla_attention) >= quadratic
    assert temp_bytes(functools.partial(blockwise_attention, block_q=64, block_kv=64)) < quadratic / 8


def test_blockwise_bfloat16_close_to_float32():
    t, s, n, kh, mask, bias_shape, _ = _case("causal")
    q, k, v, bias, _ = _inputs(t, s, n, kh, bias_shape)
    ref = xla_attention(q, k, v, mask=mask, bias=bias)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out = blockwise_attention(*bf, mask=mask, bias=bias, block_q=3, block_kv=3)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped (G = 2) and plain (G = 1) heads
def test_xla_bfloat16_gradients_run_and_are_close_to_float32(kv_heads):
    # bf16 takes the 5-D path on every backend: XLA:CPU has no bf16 kernel for the 4-D backward.
    t, s, n, _, mask, bias_shape, _ = _case("causal")
    q, k, v, bias, _ = _inputs(t, s, n, kv_heads, bias_shape)

    def loss(q, k, v):
        out = xla_attention(q, k, v, mask=mask, bias=bias)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*bf)
    for a, b in zip(got, ref):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=6e-2 * float(jnp.abs(b).max()))


# ---------------------------------------------------------------------------------------------
# The multi-head module.

D = 16


def _mha(impl="xla", n=4, kh=2, **kw):
    return MultiHeadAttention(num_heads=n, num_kv_heads=kh, head_dim=8, implementation=impl, **kw)


def _x(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def _unbox(params):
    return nn.meta.unbox(params)


def _init(module, *args, **kwargs):
    return module.init(jax.random.PRNGKey(0), *args, **kwargs)


def _apply(module, variables, *args, **kwargs):
    return module.apply(variables, *args, **kwargs)


def _manual(params, xq, xkv, mask):
    """Projections by hand, attention by the NumPy reference."""
    p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in _unbox(params).items()}
    q = np.einsum("btd,dnh->btnh", xq, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bsd,dnh->bsnh", xkv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bsd,dnh->bsnh", xkv, p["value"]["kernel"]) + p["value"]["bias"]
    out, _ = np_attention(q, k, v, mask)
    return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("kh", [4, 2, 1])
def test_mha_self_attention_matches_manual(kh):
    x = _x(2, 6)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = masks.causal_mask(pos, pos)
    module = _mha(kh=kh)
    params = _init(module, x, deterministic=True)["params"]
    assert params["key"]["kernel"].value.shape == (D, kh, 8)
    assert params["query"]["kernel"].names == ("embed", "heads", "head_dim")
    y = _apply(module, {"params": params}, x, mask=mask, deterministic=True)
    np.testing.assert_allclose(y, _manual(params, np.asarray(x), np.asarray(x), np.asarray(mask)), **TOL)


def test_mha_cross_attention_matches_manual_and_ignores_decode():
    xq, xkv = _x(2, 5, seed=1), _x(2, 9, seed=2)
    k_valid = jnp.arange(9)[None] < jnp.array([[9], [6]])
    mask = masks.padding_mask(jnp.ones((2, 5), bool), k_valid)
    module = _mha()
    params = _init(module, xq, xkv, deterministic=True)["params"]
    y = _apply(module, {"params": params}, xq, xkv, mask=mask, deterministic=True)
    np.testing.assert_allclose(y, _manual(params, np.asarray(xq), np.asarray(xkv), np.asarray(mask)), **TOL)
    # decode=True keeps no cache for cross-attention.
    y2, state = _apply(module, {"params": params}, xq, xkv, mask=mask, deterministic=True, decode=True, mutable=True)
    assert "cache" not in state
    np.testing.assert_allclose(y2, y, **TOL)


def test_mha_implementations_agree_forward_and_param_grads():
    x = _x(2, 8)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = masks.combine(masks.causal_mask(pos, pos), masks.segment_mask(seg, seg))
    params = _init(_mha(), x, deterministic=True)["params"]

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl):
        def loss(params):
            y = _mha(impl).apply({"params": params}, x, mask=mask, deterministic=True, positions=pos)
            return jnp.sum(jnp.sin(y)), y

        return jax.grad(loss, has_aux=True)(params)

    ref_grads, ref_y = run("xla")
    for impl in ("dot_product", "blockwise"):
        grads, y = run(impl)
        np.testing.assert_allclose(y, ref_y, **TOL)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), _unbox(grads), _unbox(ref_grads))


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("rope", [None, 10_000.0])
def test_mha_cached_decoding_equals_full_forward(impl, rope):
    b, t, prefill = 2, 7, 3
    x = _x(b, t)
    module = _mha(impl, rope_max_wavelength=rope)
    variables = _init(module, x, deterministic=True, decode=True)
    params, cache = variables["params"], variables["cache"]
    assert cache["cached_key"].shape == (b, t, 2, 8)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    full = _apply(module, {"params": params}, x, mask=masks.causal_mask(pos, pos), deterministic=True)

    @jax.jit
    def step(variables, x):
        return module.apply(variables, x, deterministic=True, decode=True, mutable=["cache"])

    y, state = step({"params": params, "cache": cache}, x[:, :prefill])
    outs = [y]
    for i in range(prefill, t):
        y, state = step({"params": params, **state}, x[:, i : i + 1])
        outs.append(y)
    assert int(state["cache"]["cache_index"]) == t
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_mha_rope_depends_only_on_relative_positions():
    x = _x(2, 6)
    module = _mha(rope_max_wavelength=10_000.0)
    params = _init(module, x, deterministic=True)["params"]
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = masks.causal_mask(pos, pos)

    def run(positions):
        return module.apply({"params": params}, x, mask=mask, deterministic=True, positions=positions)

    np.testing.assert_allclose(run(pos), run(pos + 37), rtol=1e-4, atol=1e-6)
    assert not np.allclose(run(pos), run(pos * 2), rtol=1e-3, atol=1e-6)  # distances do matter
    # positions=None means 0..T-1.
    np.testing.assert_allclose(_apply(module, {"params": params}, x, mask=mask, deterministic=True), run(pos), **TOL)


def test_mha_sows_weights_and_applies_dropout():
    x = _x(2, 5)
    module = _mha(dropout_rate=0.5)
    params = _init(module, x, deterministic=True)["params"]
    y, state = _apply(module, {"params": params}, x, deterministic=True, return_weights=True, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    rngs = {"dropout": jax.random.PRNGKey(1)}
    d1 = _apply(module, {"params": params}, x, deterministic=False, rngs=rngs)
    d2 = _apply(module, {"params": params}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, y)
