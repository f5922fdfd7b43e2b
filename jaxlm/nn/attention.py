"""Scaled dot-product attention implementations and the multi-head attention module.

Three implementations share one signature and are chosen by name (``config.model.attention``)
through ``IMPLEMENTATIONS``:

* ``xla``: the reference, plain einsums; materialises the ``[B, N, T, S]`` logits.
* ``dot_product``: ``jax.nn.dot_product_attention``; cuDNN flash attention on GPUs for
  bf16/fp16 inputs (when cuDNN accepts the shapes), XLA elsewhere.
* ``blockwise``: pure-JAX chunked online softmax (``jaxlm.nn.blockwise``), memory linear in
  length, forward and backward; for CPU/TPU and long context.

* ``ring``: ring attention over the mesh axis that the logical ``act_length`` axis is sharded
  on (``jaxlm.nn.ring``): each device keeps its query chunk and passes key/value chunks around
  the ring, combining blockwise results by their log-sum-exp.

Common semantics: masks are boolean and broadcastable to ``[B, N, T, S]`` (True = attend; see
``jaxlm.nn.masks``) or a ``masks.TokenMask`` (segments / key padding as per-token vectors),
biases are additive logits and broadcastable likewise or a ``positions.PositionBias`` (ALiBi /
T5 from positions); ``blockwise`` and ``ring`` evaluate the vector forms tile by tile and never
hold a ``[T, S]`` array, ``xla`` and ``dot_product`` materialise them. ``causal=True`` adds the
top-left-aligned causal mask (key s <= query t) without materialising it, ``window=w > 0``
the sliding window (``t - w < s``, and ``s < t + w`` unless causal), and a query row that may
attend to no key outputs zeros (and has all-zero weights) rather than the uniform average a
plain masked softmax gives. ``dot_product`` cannot apply dropout nor return weights, and
``blockwise`` / ``ring`` cannot return weights: those requests fall back to ``xla``.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N = K * G
for grouped-query attention, K = 1 for multi-query), H head dim, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.nn import masks, matmul
from jaxlm.nn.blockwise import blockwise, group_heads
from jaxlm.nn.dropout import dropout
from jaxlm.nn.linears import DenseGeneral, default_kernel_init, fused_dense
from jaxlm.nn.masks import TokenMask
from jaxlm.nn.positions import PositionBias, RopeScaling, apply_rope
from jaxlm.nn.ring import ring_attention
from jaxlm.nn.softmax import masked_softmax
from jaxlm.nn.virtual_tokens import PrefixKV, prepend_keys, prepend_zero_bias

AttentionOutput = jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]
Mask = jnp.ndarray | TokenMask | None
Bias = jnp.ndarray | PositionBias | None


def dense_inputs(
    mask: Mask, bias: Bias, t: int, s: int, window: int | jax.Array, causal: bool
) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
    """Materialise vector-form masks and biases, and fold a sliding window into the mask."""
    if isinstance(mask, TokenMask):
        mask = mask.dense()
    if isinstance(bias, PositionBias):
        bias = bias.dense()
    if not (isinstance(window, int) and window <= 0):
        mask = masks.combine(mask, masks.window_mask(t, s, window, causal=causal))
    return mask, bias


def _causal(t: int, s: int) -> jnp.ndarray:
    """``[1, 1, T, S]`` top-left-aligned causal mask (the convention of ``jax.nn``)."""
    return (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None]


def xla_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    *,
    mask: jnp.ndarray | None = None,
    bias: jnp.ndarray | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    causal: bool = False,
    window: int | jax.Array = 0,
) -> AttentionOutput:
    """Compute reference attention with einsums; softmax in float32.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]`` with K dividing N.
      value: ``[B, S, K, H]``.
      mask: boolean, broadcastable to ``[B, N, T, S]``; False blocks attention.
      bias: additive logits bias broadcastable to ``[B, N, T, S]`` (relative positions, ALiBi).
      dropout_rate: probability of dropping an attention probability.
      dropout_rng: PRNG key for dropout; the keep-mask is ``jaxlm.nn.dropout.keep_mask(rng, rate, [B, K, G, T, S])``
        (``[B, N, T, S]`` when G = 1: the same draws).
      deterministic: disables dropout.
      return_weights: also return the attention probabilities ``[B, N, T, S]`` (after dropout).
      causal: also apply the causal mask (key s <= query t).
      window: sliding window size (0 = full attention).

    Returns:
      ``[B, T, N, H]`` (and the weights if asked).
    """
    b, t, n, h = query.shape
    s, k_heads = key.shape[1], key.shape[2]
    mask, bias = dense_inputs(mask, bias, t, s, window, causal)
    g = n // k_heads
    q = query * jnp.asarray(h**-0.5, query.dtype)
    if g == 1 and query.dtype == jnp.float32:
        # Plain multi-head attention in float32: 4-D logits [B, N, T, S]; a size-1 group axis
        # costs XLA:CPU a layout copy of each [B, N, T, S] array (baby GPT: 8% of the step).
        # Not for bf16: XLA:CPU then leaves the backward's batched matmuls in layouts for
        # which it has no bf16 x bf16 -> f32 kernel (an error at run time).
        heads, logits_spec, out_spec = _to4d, "btnh,bsnh->bnts", "bnts,bsnh->btnh"
    else:
        q = q.reshape(b, t, k_heads, g, h)
        heads, logits_spec, out_spec = (lambda x: group_heads(x, k_heads)), "btkgh,bskh->bkgts", "bkgts,bskh->btkgh"
    logits = matmul.einsum(logits_spec, q, key, query.dtype)
    if bias is not None:
        logits = logits + heads(bias).astype(jnp.float32)
    if causal:
        mask = masks.combine(mask, _causal(t, s))
    # Probabilities in the compute dtype: the PV matmul takes them in that dtype anyway, and with
    # bf16 the softmax then writes (and the backward keeps) half the bytes of [B, N, T, S].
    weights = masked_softmax(logits, None if mask is None else heads(mask), value.dtype)
    if not deterministic and dropout_rate > 0.0:
        weights = dropout(weights, dropout_rate, dropout_rng)
    out = matmul.einsum(out_spec, weights, value, value.dtype)
    out = out.reshape(b, t, n, h).astype(query.dtype)
    if return_weights:
        return out, weights.astype(jnp.float32).reshape(b, n, t, s)
    return out


def _to4d(x: jnp.ndarray | None) -> jnp.ndarray | None:
    """Left-pad a broadcastable mask/bias to rank 4 (``jax.nn.dot_product_attention`` wants 4-D)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _cudnn_applies(query: jnp.ndarray) -> bool:
    """Whether to try cuDNN flash attention: a GPU backend and half-precision inputs."""
    return jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)


def dot_product_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    *,
    mask: jnp.ndarray | None = None,
    bias: jnp.ndarray | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    causal: bool = False,
    window: int | jax.Array = 0,
    implementation: str | None = None,
) -> AttentionOutput:
    """Attention through ``jax.nn.dot_product_attention`` (same arguments as ``xla_attention``).

    ``implementation=None`` picks ``'cudnn'`` (flash attention) on GPUs for bf16/fp16 inputs
    and falls back to ``jax.nn``'s XLA path when cuDNN rejects the call at trace time (head dim,
    dtype, cuDNN missing); pass ``'xla'`` or ``'cudnn'`` to force one. Dropout and
    ``return_weights`` are not supported by ``jax.nn``: those calls run ``xla_attention``. A
    static ``window`` goes to ``jax.nn``'s ``local_window_size``; a traced one becomes a mask.
    """
    if return_weights or (not deterministic and dropout_rate > 0.0):
        return xla_attention(
            query,
            key,
            value,
            mask=mask,
            bias=bias,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            return_weights=return_weights,
            causal=causal,
            window=window,
        )
    local = None
    if isinstance(window, int) and window > 0:
        local, window = (window - 1, 0 if causal else window - 1), 0
    mask, bias = dense_inputs(mask, bias, query.shape[1], key.shape[1], window, causal)
    mask4, bias4 = _to4d(mask), _to4d(bias)
    if mask4 is not None:
        mask4 = mask4.astype(bool)

    def call(impl: str | None) -> jnp.ndarray:
        # cuDNN wants the bias in the input dtype; XLA adds it to float32 logits, so keep it exact.
        b = bias4.astype(query.dtype) if impl == "cudnn" and bias4 is not None else bias4
        return jax.nn.dot_product_attention(
            query, key, value, bias=b, mask=mask4, is_causal=causal, local_window_size=local, implementation=impl
        )

    if implementation is None and _cudnn_applies(query):
        try:
            out = call("cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            out = call(None)
    else:
        out = call(implementation)
    if mask4 is not None:  # zero the rows that may attend to nothing (jax.nn averages them)
        allowed = mask4 & _causal(query.shape[1], key.shape[1]) if causal else mask4
        if local is not None:
            allowed = allowed & masks.window_mask(query.shape[1], key.shape[1], local[0] + 1, causal=causal)
        row_ok = jnp.any(allowed, axis=-1)  # [B|1, N|1, T]
        out = jnp.where(jnp.transpose(row_ok, (0, 2, 1))[..., None], out, jnp.zeros((), out.dtype))
    return out


def blockwise_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    *,
    mask: jnp.ndarray | None = None,
    bias: jnp.ndarray | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    causal: bool = False,
    window: int | jax.Array = 0,
    block_q: int = 512,
    block_kv: int = 512,
) -> AttentionOutput:
    """Memory-efficient attention (see ``jaxlm.nn.blockwise``; same arguments as ``xla_attention``).

    Dropout is applied tile by tile (its keep-mask differs from ``xla_attention``'s for the same
    key, see ``blockwise_dropout_mask``). ``return_weights=True`` needs the full ``[B, N, T, S]``
    matrix anyway and runs ``xla_attention``.
    """
    if return_weights:
        return xla_attention(
            query,
            key,
            value,
            mask=mask,
            bias=bias,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            return_weights=True,
            causal=causal,
            window=window,
        )
    rate = 0.0 if deterministic else dropout_rate
    return blockwise(
        query,
        key,
        value,
        mask=mask,
        bias=bias,
        dropout_rate=rate,
        dropout_rng=dropout_rng,
        causal=causal,
        window=window,
        block_q=block_q,
        block_kv=block_kv,
    )


AttentionFn = Callable[..., Any]
IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "dot_product": dot_product_attention,
    "blockwise": blockwise_attention,
    "ring": ring_attention,
}
# Implementations that never hold a [T, S] array: models hand them vector-form masks and biases.
TILED = ("blockwise", "ring")


def attention(implementation: str) -> AttentionFn:
    """Look up an attention implementation by config name (``config.model.attention``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[implementation]


class MultiHeadAttention(nn.Module):
    """Multi-head attention, grouped-query when ``num_kv_heads < num_heads`` (multi-query at 1).

    Self-attention when ``inputs_kv`` is None, cross-attention otherwise.

    With ``decode=True`` self-attention keys and values are appended to a cache in the
    ``cache`` collection (``[B, S_max, K, H]`` plus a write index), so a prompt can be
    pre-filled in one call and then extended a token at a time; queries attend causally to
    everything cached so far (and'ed with ``mask`` if one is given, ``[B, 1|N, T, S_max]``).
    The init call with ``decode=True`` sizes the cache by its input length. Cross-attention
    keeps no cache: its keys and values are recomputed from ``inputs_kv`` on every call.

    Sliding window (``window`` > 0, a Python int): the cache is a rolling buffer of
    ``min(window, S_max)`` slots (``cached_key``, ``cached_value`` and ``slot_tokens``, 1 + the
    token index held by each slot, 0 when empty, so that an all-zero cache is an empty one), so
    its memory is O(window) however long
    the generation; each call attends to the buffer plus its own new keys. A traced window
    (scanned layers with mixed windows) keeps the full cache and masks it. With a rolling cache a
    ``PositionBias`` is evaluated at the slots' token indices (the default positions).

    RoPE: set ``rope_max_wavelength`` (e.g. 10 000) to rotate queries and keys by their
    positions (``positions`` / ``kv_positions``; by default ``0..T-1``, offset by the cache
    index in decode mode; cross-attention keys default to ``0..S-1``). ``rope_scale`` is linear
    position interpolation and ``rope_scaling`` a context-extension method (see
    ``jaxlm.nn.positions.apply_rope``).

    ``fuse_projections`` computes the query, key and value projections (key and value for
    cross-attention) as one matmul over their concatenated kernels (:func:`fused_dense`); the
    parameters are the same either way.

    ``prefix_tokens`` > 0 (prefix tuning, self-attention only) adds learned ``prefix/{key, value}``
    ``[P, K, H]`` that every query attends before the other keys (``jaxlm.nn.virtual_tokens``);
    masks, biases, the causal flag and the KV cache keep acting on the other keys.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    implementation: str = "xla"
    use_bias: bool = True
    out_init_std: float = 0.02
    rope_max_wavelength: float | None = None
    rope_scale: float = 1.0
    rope_scaling: RopeScaling | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    fuse_projections: bool = False
    prefix_tokens: int = 0

    @nn.compact
    def __call__(
        self,
        inputs_q: jnp.ndarray,
        inputs_kv: jnp.ndarray | None = None,
        *,
        mask: Mask = None,
        bias: Bias = None,
        deterministic: bool,
        decode: bool = False,
        return_weights: bool = False,
        positions: jnp.ndarray | None = None,
        kv_positions: jnp.ndarray | None = None,
        causal: bool = False,
        window: int | jax.Array = 0,
    ) -> jnp.ndarray:
        """``[B, T, D]`` (and ``[B, S, D]`` for cross-attention) -> ``[B, T, D]``.

        Args:
          inputs_q: ``[B, T, D]`` queries (and keys/values for self-attention).
          inputs_kv: ``[B, S, D]`` keys/values for cross-attention.
          mask: boolean, broadcastable to ``[B, N, T, S]``, or a ``TokenMask``.
          bias: additive logits bias broadcastable to ``[B, N, T, S]`` (T5 / ALiBi), or a ``PositionBias``.
          deterministic: disables attention dropout.
          decode: use and extend the self-attention key/value cache.
          return_weights: sow the ``[B, N, T, S]`` weights into ``intermediates/attention_weights``.
          positions: ``[B, T]`` query (and self-attention key) positions for RoPE.
          kv_positions: ``[B, S]`` key positions for RoPE in cross-attention.
          causal: restrict query t to keys s <= t (by index; the cache applies it itself in decode mode).
          window: sliding-window size, 0 = full (see the class docstring for the cache).
        """
        d = inputs_q.shape[-1]
        cross = inputs_kv is not None
        kv = inputs_kv if cross else inputs_q
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        q_axes = (ax.EMBED, ax.HEADS, ax.HEAD_DIM)
        kv_axes = (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM)
        query = DenseGeneral((self.num_heads, self.head_dim), q_axes, name="query", **dense)
        key = DenseGeneral((self.num_kv_heads, self.head_dim), kv_axes, name="key", **dense)
        value = DenseGeneral((self.num_kv_heads, self.head_dim), kv_axes, name="value", **dense)
        if not self.fuse_projections:
            q, k, v = query(inputs_q), key(kv), value(kv)
        elif cross:
            q, (k, v) = query(inputs_q), fused_dense([key, value], kv)
        else:
            q, k, v = fused_dense([query, key, value], inputs_q)
        q = nn.with_logical_constraint(q, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_HEADS, ax.ACT_HEAD_DIM))
        k = nn.with_logical_constraint(k, (ax.ACT_BATCH, ax.ACT_KV_LENGTH, ax.ACT_KV_HEADS, ax.ACT_HEAD_DIM))
        v = nn.with_logical_constraint(v, (ax.ACT_BATCH, ax.ACT_KV_LENGTH, ax.ACT_KV_HEADS, ax.ACT_HEAD_DIM))
        use_cache = decode and not cross
        cache_index = None
        if use_cache:
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))

        if self.rope_max_wavelength is not None:
            if positions is None:
                offset = cache_index.value if use_cache else 0
                positions = (jnp.arange(q.shape[1], dtype=jnp.int32) + offset)[None]
            if kv_positions is None:
                kv_positions = jnp.arange(k.shape[1], dtype=jnp.int32)[None] if cross else positions
            rope = dict(max_wavelength=self.rope_max_wavelength, scale=self.rope_scale, scaling=self.rope_scaling)
            q = apply_rope(q, positions, **rope)
            k = apply_rope(k, kv_positions, **rope)

        implementation = self.implementation
        if use_cache:
            if isinstance(window, int) and window > 0:
                k, v, mask, bias = self._update_rolling_cache(k, v, mask, bias, cache_index, window)
            else:
                k, v, mask = self._update_cache(k, v, mask, cache_index, window)
                if isinstance(bias, PositionBias):
                    bias = bias.dense()
            # The cache mask holds the causal and window restrictions.
            causal, window = False, 0
        if decode and implementation == "ring":
            # A few new tokens per step are not split over devices (cross-attention keeps no cache).
            implementation = "blockwise"
        if self.prefix_tokens and not cross:
            k, v, mask, bias = self._prepend_prefix(q.shape[1], k, v, mask, bias, causal, window)
            causal, window = False, 0

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        result = attention(implementation)(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            return_weights=return_weights,
            causal=causal,
            window=window,
        )
        out, weights = result if return_weights else (result, None)
        out = nn.with_logical_constraint(out, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_HEADS, ax.ACT_HEAD_DIM))
        y = DenseGeneral(
            (d,),
            (ax.HEADS, ax.HEAD_DIM, ax.EMBED),
            in_axes=2,
            name="out",
            kernel_init=default_kernel_init(self.out_init_std),
            **dense,
        )(out)
        if return_weights:
            self.sow("intermediates", "attention_weights", weights)
        return y

    def _prepend_prefix(
        self, t: int, k: jnp.ndarray, v: jnp.ndarray, mask: Mask, bias: Bias, causal: bool, window: int | jax.Array
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None, jnp.ndarray | None]:
        """Prefix tuning: put the learned ``prefix/{key, value}`` before the keys (see ``jaxlm.nn.virtual_tokens``).

        ``t`` is the query length. The causal and window restrictions (by index) become part of
        the dense mask first, so that they keep applying to the real keys; every query may attend
        every prefix key, whose logits bias is 0.
        """
        p, b, s = self.prefix_tokens, k.shape[0], k.shape[1]
        mask, bias = dense_inputs(mask, bias, t, s, window, causal)
        if causal:
            mask = masks.combine(mask, _causal(t, s))
        prefix_k, prefix_v = PrefixKV(p, self.num_kv_heads, self.head_dim, self.param_dtype, name="prefix")()
        k = jnp.concatenate([jnp.broadcast_to(prefix_k.astype(k.dtype)[None], (b,) + prefix_k.shape), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix_v.astype(v.dtype)[None], (b,) + prefix_v.shape), v], axis=1)
        return k, v, prepend_keys(mask, p), prepend_zero_bias(bias, p)

    def _update_cache(
        self, k: jnp.ndarray, v: jnp.ndarray, mask: Mask, index: Any, window: int | jax.Array = 0
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
        """Write ``k, v`` at ``index`` (the cache's write-index variable); return the cache and its mask."""
        if isinstance(mask, TokenMask):
            mask = mask.dense()
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not initialized:
            # The init call only sizes the cache: its input length is the cache length.
            return k, v, mask
        b, t = k.shape[0], k.shape[1]
        s = cached_key.value.shape[1]
        i = index.value
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), (0, i, 0, 0)
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), (0, i, 0, 0)
        )
        index.value = i + t
        q_pos = i + jnp.arange(t, dtype=jnp.int32)
        k_pos = jnp.arange(s, dtype=jnp.int32)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if not (isinstance(window, int) and window <= 0):
            allowed = allowed & ((k_pos[None, :] > q_pos[:, None] - window) | (window <= 0))
        cache_mask = jnp.broadcast_to(allowed[None, None], (b, 1, t, s))
        return cached_key.value, cached_value.value, masks.combine(cache_mask, mask)

    def _update_rolling_cache(
        self, k: jnp.ndarray, v: jnp.ndarray, mask: Mask, bias: Bias, index: Any, window: int
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None, jnp.ndarray | None]:
        """Attend to a ``min(window, S_max)``-slot rolling buffer plus the new keys; then keep the newest.

        Token ``p`` lives in slot ``p % slots``. Returns keys/values ``[B, slots + T, K, H]``, their
        mask (causal and window by token index, empty slots off) and the bias at those keys.
        """
        b, t = k.shape[0], k.shape[1]
        slots = min(window, t)
        initialized = self.has_variable("cache", "cached_key")
        shape = (b, slots, *k.shape[2:])
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        slot_tokens = self.variable("cache", "slot_tokens", jnp.zeros, (b, slots), jnp.int32)
        if mask is not None:
            raise ValueError("a rolling (sliding-window) KV cache takes no mask: it builds its own from token indices")
        if not initialized:  # the init call only sizes the cache
            return k, v, None, bias.dense() if isinstance(bias, PositionBias) else bias
        slots = cached_key.value.shape[1]
        i = index.value
        new_pos = i + jnp.arange(t, dtype=jnp.int32)
        keys = jnp.concatenate([cached_key.value, k.astype(cached_key.value.dtype)], axis=1)
        values = jnp.concatenate([cached_value.value, v.astype(cached_value.value.dtype)], axis=1)
        # Token index of every key, [B, slots + T]; -1 for empty slots.
        k_pos = jnp.concatenate([slot_tokens.value - 1, jnp.broadcast_to(new_pos, (b, t))], axis=1)
        qp, kp = new_pos[None, :, None], k_pos[:, None, :]
        allowed = (kp >= 0) & (kp <= qp) & (kp > qp - window)
        keep = min(t, slots)  # the newest tokens overwrite the oldest slots (distinct slots: no write races)
        where = (i + t - keep + jnp.arange(keep, dtype=jnp.int32)) % slots
        cached_key.value = cached_key.value.at[:, where].set(k[:, t - keep :].astype(cached_key.value.dtype))
        cached_value.value = cached_value.value.at[:, where].set(v[:, t - keep :].astype(cached_value.value.dtype))
        slot_tokens.value = slot_tokens.value.at[:, where].set(jnp.broadcast_to(new_pos[t - keep :] + 1, (b, keep)))
        index.value = i + t
        if isinstance(bias, PositionBias):
            bias = bias.with_keys(k_pos).dense()
        return keys, values, allowed[:, None], bias
