"""Blockwise attention: chunked online softmax whose memory grows linearly with length.

Pure JAX (``lax.scan``), so it runs on CPU, TPU and GPU alike. Queries are processed in blocks
of ``block_q``; for each, key/value blocks of ``block_kv`` are streamed through a running
(max, normaliser, accumulator) triple, the online softmax of Milakov & Gimelshein (2018) as used
by FlashAttention (Dao et al., 2022) and memory-efficient attention (Rabe & Staats, 2021). The
backward pass is a ``jax.custom_vjp`` that saves only the output and the per-row log-sum-exp
and recomputes the probabilities block by block (FlashAttention-2's backward), so neither pass
ever holds a ``[T, S]`` matrix: peak memory is O(B N (T + S) H + B N block_q block_kv).

Masks and biases may be broadcast (``[B or 1, N or 1, T or 1, S or 1]``); they are sliced per
block. So that no ``[T, S]`` array exists at all, a mask may instead be a
``jaxlm.nn.masks.TokenMask`` (packing segments and key padding as ``[B, T]`` / ``[B, S]``
vectors) and a bias a ``jaxlm.nn.positions.PositionBias`` (ALiBi or T5's relative bias from
positions); both are evaluated per tile, forward and backward (the T5 table's gradient is
accumulated tile by tile). Causal and sliding-window restrictions are computed from indices
(offset by ``q_offset`` / ``k_offset`` when this call sees one chunk of a longer sequence, as in
ring attention). Blocks in which the mask admits nothing (above the causal diagonal, outside the
window, across packed segments) are skipped with ``lax.cond``. A query row that may attend to
nothing returns zeros.
Dropout on the attention probabilities is supported: each (query block, key block) tile draws
its keep-mask from ``fold_in(fold_in(rng, i), j)`` (see ``blockwise_dropout_mask``), so the
backward pass regenerates exactly the mask the forward used.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, G = N // K
query heads per key/value head, H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlm.nn.dropout import keep_mask, keep_scale
from jaxlm.nn.masks import TokenMask
from jaxlm.nn.positions import PositionBias

# Masked logits get the most negative finite float32, not -inf, so that max() and exp(s - max)
# never evaluate inf - inf; masked probabilities are then zeroed explicitly.
NEG = float(np.finfo(np.float32).min)
F32 = jnp.float32


def group_heads(x: jnp.ndarray, num_kv_heads: int) -> jnp.ndarray:
    """Reshape a mask or bias broadcastable to ``[B, N, T, S]`` to ``[B|1, K|1, G|1, T|1, S|1]``."""
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"masks and biases are [B, N, T, S] (broadcastable); got shape {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    b, n, t, s = x.shape
    if n == 1:
        return x.reshape(b, 1, 1, t, s)
    if n % num_kv_heads:
        raise ValueError(f"mask/bias head dim {n} is not a multiple of num_kv_heads={num_kv_heads}")
    return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


class _Cfg(NamedTuple):
    """Static configuration of one blockwise call."""

    block_q: int
    block_kv: int
    kv_len: int  # S before padding to a multiple of block_kv
    causal: bool
    dropout_rate: float
    windowed: bool = False  # a sliding window may apply (its size is traced, in the offsets)
    num_kv_heads: int = 1


class _Offsets(NamedTuple):
    """Traced int32 scalars: global index of the first query and key, and the window (0 = none)."""

    q: jax.Array
    k: jax.Array
    window: jax.Array


def _slice(x: jnp.ndarray, i: jax.Array, j: jax.Array, cfg: _Cfg) -> jnp.ndarray:
    """Slice the ``(i, j)`` tile of a 5-D mask/bias, leaving broadcast (size-1) axes alone."""
    if x.shape[3] != 1:
        x = lax.dynamic_slice_in_dim(x, i * cfg.block_q, cfg.block_q, axis=3)
    if x.shape[4] != 1:
        x = lax.dynamic_slice_in_dim(x, j * cfg.block_kv, cfg.block_kv, axis=4)
    return x


def _vec(x: jnp.ndarray | None, start: jax.Array, size: int) -> jnp.ndarray | None:
    """Slice ``[B|1, L]`` per-token vectors to ``[B|1, size]`` at ``start``."""
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _to5d(x: jnp.ndarray, num_kv_heads: int) -> jnp.ndarray:
    """``[B|1, N|1, t, s]`` -> ``[B|1, K|1, G|1, t, s]``."""
    return group_heads(x, num_kv_heads)


def _valid(mask, i: jax.Array, j: jax.Array, cfg: _Cfg, kv_padded: int, off: _Offsets) -> jnp.ndarray | None:
    """Boolean tile of allowed (query, key) pairs: mask & key-not-padding & causal & window; None = all."""
    bq, bk = cfg.block_q, cfg.block_kv
    if mask is None:
        valid = None
    elif isinstance(mask, TokenMask):
        tile = mask.tile(
            _vec(mask.q_segments, i * bq, bq), _vec(mask.k_segments, j * bk, bk), _vec(mask.k_valid, j * bk, bk)
        )
        valid = None if tile is None else tile[:, :, None]
    else:
        valid = _slice(mask, i, j, cfg)
    k_local = j * bk + jnp.arange(bk)
    extra = []
    if kv_padded > cfg.kv_len:
        extra.append(k_local[None, :] < cfg.kv_len)
    if cfg.causal or cfg.windowed:
        q_idx = (off.q + i * bq + jnp.arange(bq))[:, None]
        k_idx = (off.k + k_local)[None, :]
        if cfg.causal:
            extra.append(k_idx <= q_idx)
        if cfg.windowed:
            inside = k_idx > q_idx - off.window
            if not cfg.causal:
                inside = inside & (k_idx < q_idx + off.window)
            extra.append(inside | (off.window <= 0))
    for e in extra:
        valid = e if valid is None else valid & e
    return valid


def _bias_tile(bias, table, i: jax.Array, j: jax.Array, cfg: _Cfg) -> jnp.ndarray:
    """The ``[B|1, K|1, G|1, bq|1, bk|1]`` float32 bias of tile ``(i, j)`` (``table`` for a PositionBias)."""
    if isinstance(bias, PositionBias):
        q_pos = _vec(bias.q_positions, i * cfg.block_q, cfg.block_q)
        k_pos = _vec(bias.k_positions, j * cfg.block_kv, cfg.block_kv)
        return _to5d(bias.evaluate(table, q_pos, k_pos), cfg.num_kv_heads)
    return _slice(bias, i, j, cfg).astype(F32)


def _logits(q_i, k_j, bias, i, j, cfg, valid):
    """Masked ``[B, K, G, bq, bk]`` float32 logits of one tile (``q_i`` is pre-scaled)."""
    s = jnp.einsum("bkgqh,bkch->bkgqc", q_i, k_j, preferred_element_type=F32)
    if bias is not None:
        table = bias.table if isinstance(bias, PositionBias) else None
        s = s + _bias_tile(bias, table, i, j, cfg)
    if valid is not None:
        s = jnp.where(valid, s, NEG)
    return s


def _keep(rng: jax.Array, i: jax.Array, j: jax.Array, shape: tuple[int, ...], rate: float) -> jnp.ndarray:
    """Draw the dropout keep-mask of tile ``(i, j)``."""
    return keep_mask(jax.random.fold_in(jax.random.fold_in(rng, i), j), rate, shape)


def _maybe_skip(valid, compute, skipped, carry):
    """Run ``compute(carry)`` unless the tile admits no pair, else ``skipped(carry)``."""
    if valid is None:
        return compute(carry)
    return lax.cond(jnp.any(valid), compute, skipped, carry)


def _blocks_q(x: jnp.ndarray, bq: int) -> jnp.ndarray:
    """``[B, K, G, Tp, ...]`` -> ``[nq, B, K, G, bq, ...]``."""
    b, k, g, tp = x.shape[:4]
    x = x.reshape(b, k, g, tp // bq, bq, *x.shape[4:])
    return jnp.moveaxis(x, 3, 0)


def _unblock_q(x: jnp.ndarray) -> jnp.ndarray:
    """Inverse of ``_blocks_q``."""
    x = jnp.moveaxis(x, 0, 3)
    return x.reshape(*x.shape[:3], x.shape[3] * x.shape[4], *x.shape[5:])


def _blocks_kv(x: jnp.ndarray, bk: int) -> jnp.ndarray:
    """``[B, K, Sp, H]`` -> ``[nk, B, K, bk, H]``."""
    b, k, sp, h = x.shape
    return jnp.moveaxis(x.reshape(b, k, sp // bk, bk, h), 2, 0)


def _forward(q, k, v, mask, bias, rng, off, cfg: _Cfg):
    """Blocked forward pass: ``[B, K, G, Tp, H]`` float32 output and ``[B, K, G, Tp]`` log-sum-exp.

    The log-sum-exp of a row that may attend to nothing is ``NEG`` (so that chunks combine).
    """
    b, kh, g, tp, h = q.shape
    sp, bq, bk = k.shape[2], cfg.block_q, cfg.block_kv
    tile = (b, kh, g, bq, bk)
    kv_xs = (jnp.arange(sp // bk), _blocks_kv(k, bk), _blocks_kv(v, bk))

    def q_step(_, xs):
        i, q_i = xs

        def kv_step(carry, ys):
            j, k_j, v_j = ys
            valid = _valid(mask, i, j, cfg, sp, off)

            def compute(carry):
                m, norm, acc = carry
                s = _logits(q_i, k_j, bias, i, j, cfg, valid)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                if valid is not None:
                    p = jnp.where(valid, p, 0.0)
                alpha = jnp.exp(m - m_new)
                norm = alpha * norm + p.sum(-1)
                if cfg.dropout_rate > 0.0:
                    p = jnp.where(_keep(rng, i, j, tile, cfg.dropout_rate), p * keep_scale(cfg.dropout_rate), 0.0)
                pv = jnp.einsum("bkgqc,bkch->bkgqh", p.astype(v_j.dtype), v_j, preferred_element_type=F32)
                return m_new, norm, alpha[..., None] * acc + pv

            return _maybe_skip(valid, compute, lambda c: c, carry), None

        init = (jnp.full((b, kh, g, bq), NEG, F32), jnp.zeros((b, kh, g, bq), F32), jnp.zeros((b, kh, g, bq, h), F32))
        (m, norm, acc), _ = lax.scan(kv_step, init, kv_xs)
        nonempty = norm > 0.0
        safe_norm = jnp.where(nonempty, norm, 1.0)
        out = jnp.where(nonempty[..., None], acc / safe_norm[..., None], 0.0)
        lse = jnp.where(nonempty, m + jnp.log(safe_norm), NEG)
        return None, (out, lse)

    _, (out, lse) = lax.scan(q_step, None, (jnp.arange(tp // bq), _blocks_q(q, bq)))
    return _unblock_q(out), _unblock_q(lse)


def _reduce_to(x: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """Sum ``x`` over the axes that are broadcast (size 1) in ``shape``."""
    axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return x.sum(axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(q, k, v, mask, bias, rng, off, cfg: _Cfg):
    """``softmax(q k^T + bias, masked) v`` and the log-sum-exp, over padded, head-grouped inputs (q pre-scaled)."""
    return _forward(q, k, v, mask, bias, rng, off, cfg)


def _attend_fwd(q, k, v, mask, bias, rng, off, cfg: _Cfg):
    out, lse = _forward(q, k, v, mask, bias, rng, off, cfg)
    return (out, lse), (q, k, v, mask, bias, rng, off, out, lse)


def zero_cotangents(tree):
    """Zero cotangents for a pytree of integer / boolean (or any non-differentiated) arrays."""

    def zero(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _attend_bwd(cfg: _Cfg, res, cotangents):
    """FlashAttention-2 backward: recompute each tile's probabilities from the saved log-sum-exp.

    The log-sum-exp output is differentiable too (ring attention combines chunks through it):
    its cotangent ``d_lse`` enters as ``dS = P * (dP - delta + d_lse)``.
    """
    q, k, v, mask, bias, rng, off, out, lse = res
    d_out, d_lse = cotangents
    b, kh, g, tp, h = q.shape
    sp, bq, bk = k.shape[2], cfg.block_q, cfg.block_kv
    tile = (b, kh, g, bq, bk)
    rate = cfg.dropout_rate
    # rowsum(dO * O) = rowsum(P * dP), also with dropout; minus d_lse since d lse / d s = P.
    delta = jnp.sum(d_out.astype(F32) * out, axis=-1) - d_lse.astype(F32)
    tiled_bias = isinstance(bias, PositionBias)
    # Matmul operands stay in the input dtype (bf16 on accelerators), accumulation is float32.
    d_out = d_out.astype(q.dtype)
    q_xs = (jnp.arange(tp // bq), _blocks_q(q, bq), _blocks_q(d_out, bq), _blocks_q(lse, bq), _blocks_q(delta, bq))
    kv_xs = (jnp.arange(sp // bk), _blocks_kv(k, bk), _blocks_kv(v, bk))
    if bias is not None and not tiled_bias:
        bias_tile = (*bias.shape[:3], 1 if bias.shape[3] == 1 else bq, 1 if bias.shape[4] == 1 else bk)
    learn_table = tiled_bias and bias.differentiable

    def table_grad(i, j, ds):
        """Gradient of a PositionBias table from one tile's logit gradient (vjp of its evaluation)."""
        tile_bias, pull = jax.vjp(lambda t: _bias_tile(bias, t, i, j, cfg), bias.table)
        return pull(_reduce_to(ds, tile_bias.shape))[0].astype(F32)

    def tile_grads(i, j, q_i, k_j, v_j, do_i, lse_i, delta_i, valid):
        """Probabilities after dropout and logit gradients of one tile."""
        s = _logits(q_i, k_j, bias, i, j, cfg, valid)
        p = jnp.exp(s - lse_i[..., None])
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        dp = jnp.einsum("bkgqh,bkch->bkgqc", do_i.astype(v_j.dtype), v_j, preferred_element_type=F32)
        p_drop = p
        if rate > 0.0:
            keep = _keep(rng, i, j, tile, rate)
            p_drop = jnp.where(keep, p * keep_scale(rate), 0.0)
            dp = jnp.where(keep, dp * keep_scale(rate), 0.0)
        return p_drop, p * (dp - delta_i[..., None])

    # Pass 1, over query blocks: dq (and the bias gradient, tile by tile).
    def dq_step(d_table, xs):
        i, q_i, do_i, lse_i, delta_i = xs

        def kv_step(carry, ys):
            j, k_j, v_j = ys
            valid = _valid(mask, i, j, cfg, sp, off)

            def compute(carry):
                dq_i, d_table = carry
                _, ds = tile_grads(i, j, q_i, k_j, v_j, do_i, lse_i, delta_i, valid)
                dq_i = dq_i + jnp.einsum("bkgqc,bkch->bkgqh", ds.astype(k_j.dtype), k_j, preferred_element_type=F32)
                if learn_table:
                    d_table = d_table + table_grad(i, j, ds)
                dense = None if bias is None or tiled_bias else _reduce_to(ds, bias_tile)
                return (dq_i, d_table), dense

            def skipped(carry):
                return carry, None if bias is None or tiled_bias else jnp.zeros(bias_tile, F32)

            return _maybe_skip(valid, compute, skipped, carry)

        (dq_i, d_table), dbias = lax.scan(kv_step, (jnp.zeros((b, kh, g, bq, h), F32), d_table), kv_xs)
        return d_table, (dq_i, dbias)

    d_table0 = jnp.zeros(bias.table.shape, F32) if learn_table else jnp.zeros((), F32)
    d_table, (dq, dbias) = lax.scan(dq_step, d_table0, q_xs)
    dq = _unblock_q(dq)
    if tiled_bias:
        table_ct = d_table.astype(bias.table.dtype) if learn_table else jnp.zeros_like(bias.table)
        dbias = zero_cotangents(bias).replace(table=table_ct)
    elif bias is not None:  # dbias: [nq, nk, Bb, Kb, Gb, bq|1, bk|1] -> bias.shape
        if bias.shape[3] == 1:
            dbias = dbias.sum(0, keepdims=True)
        if bias.shape[4] == 1:
            dbias = dbias.sum(1, keepdims=True)
        dbias = jnp.transpose(dbias, (2, 3, 4, 0, 5, 1, 6)).reshape(bias.shape).astype(bias.dtype)

    # Pass 2, over key blocks: dk and dv.
    def dkv_step(_, ys):
        j, k_j, v_j = ys

        def q_step(carry, xs):
            i, q_i, do_i, lse_i, delta_i = xs
            valid = _valid(mask, i, j, cfg, sp, off)

            def compute(carry):
                dk_j, dv_j = carry
                p_drop, ds = tile_grads(i, j, q_i, k_j, v_j, do_i, lse_i, delta_i, valid)
                dv_j = dv_j + jnp.einsum(
                    "bkgqc,bkgqh->bkch", p_drop.astype(v_j.dtype), do_i.astype(v_j.dtype), preferred_element_type=F32
                )
                dk_j = dk_j + jnp.einsum("bkgqc,bkgqh->bkch", ds.astype(q_i.dtype), q_i, preferred_element_type=F32)
                return dk_j, dv_j

            return _maybe_skip(valid, compute, lambda c: c, carry), None

        zeros = jnp.zeros((b, kh, bk, h), F32)
        (dk_j, dv_j), _ = lax.scan(q_step, (zeros, zeros), q_xs)
        return None, (dk_j, dv_j)

    _, (dk, dv) = lax.scan(dkv_step, None, kv_xs)
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    d_mask = None if mask is None or not isinstance(mask, TokenMask) else zero_cotangents(mask)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_mask, dbias, None, zero_cotangents(off)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _pad_axis(x: jnp.ndarray, axis: int, size: int, value: bool | float) -> jnp.ndarray:
    """Pad ``axis`` of ``x`` at the end to ``size`` (broadcast axes of size 1 are left alone)."""
    if x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _block_sizes(t: int, s: int, block_q: int, block_kv: int) -> tuple[int, int, int, int]:
    """Effective block sizes and padded lengths."""
    bq, bk = min(block_q, t), min(block_kv, s)
    return bq, bk, math.ceil(t / bq) * bq, math.ceil(s / bk) * bk


def _pad_mask(mask, kh: int, tp: int, sp: int):
    """Pad a dense mask (to 5-D) or a TokenMask's vectors to the padded lengths."""
    if mask is None:
        return None
    if isinstance(mask, TokenMask):
        return TokenMask(
            None if mask.q_segments is None else _pad_axis(jnp.asarray(mask.q_segments), 1, tp, 0),
            None if mask.k_segments is None else _pad_axis(jnp.asarray(mask.k_segments), 1, sp, -1),
            None if mask.k_valid is None else _pad_axis(jnp.asarray(mask.k_valid).astype(bool), 1, sp, False),
        )
    return _pad_axis(_pad_axis(group_heads(mask, kh).astype(bool), 3, tp, False), 4, sp, False)


def _pad_bias(bias, kh: int, tp: int, sp: int):
    """Pad a dense bias (to 5-D float32) or a PositionBias's positions to the padded lengths."""
    if bias is None:
        return None
    if isinstance(bias, PositionBias):
        return bias.replace(
            q_positions=_pad_axis(bias.q_positions, 1, tp, 0), k_positions=_pad_axis(bias.k_positions, 1, sp, 0)
        )
    return _pad_axis(_pad_axis(group_heads(bias, kh).astype(F32), 3, tp, 0.0), 4, sp, 0.0)


def blockwise(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    *,
    mask: jnp.ndarray | TokenMask | None = None,
    bias: jnp.ndarray | PositionBias | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    causal: bool = False,
    window: int | jax.Array = 0,
    q_offset: int | jax.Array = 0,
    k_offset: int | jax.Array = 0,
    block_q: int = 512,
    block_kv: int = 512,
    return_lse: bool = False,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Attention computed in ``block_q x block_kv`` tiles with an online softmax.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]`` with K dividing N.
      value: ``[B, S, K, H]``.
      mask: boolean, broadcastable to ``[B, N, T, S]`` (each axis full or 1), True = attend; or a
        ``TokenMask`` (segments / key padding as per-token vectors, evaluated per tile).
      bias: additive logits bias with the same broadcasting rules, or a ``PositionBias``
        (evaluated per tile); differentiable (a PositionBias with respect to its table).
      dropout_rate: probability of dropping an attention probability (0 disables dropout).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      causal: additionally restrict query t to keys s <= t (top-left aligned, no mask needed).
      window: sliding window (0 = none; may be traced): query t sees keys ``t - window < s``
        (and ``s < t + window`` unless causal).
      q_offset: index of the first query in the whole sequence (causal / window; may be traced).
      k_offset: index of the first key likewise.
      block_q: query block length (clipped to T; T is padded to a multiple of it).
      block_kv: key block length (clipped to S; S is padded to a multiple of it).
      return_lse: also return the ``[B, T, N]`` float32 log-sum-exp of each row's logits
        (``NEG``, the most negative float32, for rows that may attend to nothing); differentiable.

    Returns:
      ``[B, T, N, H]`` in the query dtype; zeros for query rows that may attend to nothing
      (and the log-sum-exp with ``return_lse``).
    """
    b, t, n, h = query.shape
    s, kh = key.shape[1], key.shape[2]
    g = n // kh
    bq, bk, tp, sp = _block_sizes(t, s, block_q, block_kv)
    q = (query * jnp.asarray(h**-0.5, query.dtype)).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)
    q = _pad_axis(q, 3, tp, 0.0)
    k = _pad_axis(key.transpose(0, 2, 1, 3), 2, sp, 0.0)
    v = _pad_axis(value.transpose(0, 2, 1, 3), 2, sp, 0.0)
    mask5, bias5 = _pad_mask(mask, kh, tp, sp), _pad_bias(bias, kh, tp, sp)
    use_dropout = dropout_rate > 0.0
    if use_dropout and dropout_rng is None:
        raise ValueError("blockwise attention with dropout_rate > 0 needs a dropout_rng")
    windowed = not (isinstance(window, int) and window <= 0)
    cfg = _Cfg(bq, bk, s, causal, float(dropout_rate) if use_dropout else 0.0, windowed, kh)
    off = _Offsets(*(jnp.asarray(x, jnp.int32) for x in (q_offset, k_offset, window)))
    out, lse = _attend(q, k, v, mask5, bias5, dropout_rng if use_dropout else None, off, cfg)
    out = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(query.dtype)
    if return_lse:
        return out, lse[:, :, :, :t].transpose(0, 3, 1, 2).reshape(b, t, n)
    return out


def blockwise_dropout_mask(
    rng: jax.Array,
    shape: tuple[int, int, int, int],
    num_kv_heads: int,
    rate: float,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> jnp.ndarray:
    """Rebuild the ``[B, N, T, S]`` keep-mask that ``blockwise`` draws for ``shape = (B, N, T, S)`` (for tests)."""
    b, n, t, s = shape
    bq, bk, tp, sp = _block_sizes(t, s, block_q, block_kv)
    rows = [
        jnp.concatenate(
            [
                _keep(rng, jnp.int32(i), jnp.int32(j), (b, num_kv_heads, n // num_kv_heads, bq, bk), rate)
                for j in range(sp // bk)
            ],
            axis=-1,
        )
        for i in range(tp // bq)
    ]
    return jnp.concatenate(rows, axis=-2)[..., :t, :s].reshape(b, n, t, s)
