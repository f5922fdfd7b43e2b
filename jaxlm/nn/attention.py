"""Scaled dot-product attention and the multi-head attention module.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N = K * G
for grouped-query attention), H head dim, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.nn.linears import DenseGeneral, default_kernel_init


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
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Reference attention as einsums; softmax in float32.

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, S, K, H]`` with K dividing N.
      mask: boolean, broadcastable to ``[B, N, T, S]``; False blocks attention.
      bias: additive logits bias broadcastable to ``[B, N, T, S]`` (relative positions, ALiBi).
      return_weights: also return the attention probabilities ``[B, N, T, S]``.

    Returns:
      ``[B, T, N, H]`` (and the weights if asked).
    """
    b, t, n, h = query.shape
    k_heads = key.shape[2]
    g = n // k_heads
    q = query.reshape(b, t, k_heads, g, h) * jnp.asarray(h**-0.5, query.dtype)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=jnp.float32)
    s = key.shape[1]
    if bias is not None:
        logits = logits + jnp.broadcast_to(bias, (b, n, t, s)).reshape(b, k_heads, g, t, s).astype(jnp.float32)
    if mask is not None:
        mask5 = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, k_heads, g, t, s)
        logits = jnp.where(mask5, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkgts,bskh->btkgh", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    out = out.reshape(b, t, n, h).astype(query.dtype)
    if return_weights:
        return out, weights.reshape(b, n, t, s)
    return out


AttentionFn = Callable[..., Any]
IMPLEMENTATIONS: dict[str, AttentionFn] = {"xla": xla_attention}


def attention(implementation: str) -> AttentionFn:
    """Look up an attention implementation by config name (``config.model.attention``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[implementation]


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query when ``num_kv_heads < num_heads``) attention.

    With ``decode=True`` keys and values are appended to a cache in the ``cache`` collection
    (``[B, S_max, K, H]`` plus a write index), so a prompt can be pre-filled in one call and
    then extended a token at a time; queries attend causally to everything cached so far.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    implementation: str = "xla"
    use_bias: bool = True
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: jnp.ndarray,
        inputs_kv: jnp.ndarray | None = None,
        *,
        mask: jnp.ndarray | None = None,
        bias: jnp.ndarray | None = None,
        deterministic: bool,
        decode: bool = False,
        return_weights: bool = False,
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """``[B, T, D]`` (and ``[B, S, D]`` for cross-attention) -> ``[B, T, D]``."""
        d = inputs_q.shape[-1]
        kv = inputs_q if inputs_kv is None else inputs_kv
        dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        q = DenseGeneral((self.num_heads, self.head_dim), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), name="query", **dense)(inputs_q)
        k = DenseGeneral((self.num_kv_heads, self.head_dim), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), name="key", **dense)(kv)
        v = DenseGeneral((self.num_kv_heads, self.head_dim), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), name="value", **dense)(kv)
        q = nn.with_logical_constraint(q, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_HEADS, ax.ACT_HEAD_DIM))
        k = nn.with_logical_constraint(k, (ax.ACT_BATCH, ax.ACT_KV_LENGTH, ax.ACT_KV_HEADS, ax.ACT_HEAD_DIM))
        v = nn.with_logical_constraint(v, (ax.ACT_BATCH, ax.ACT_KV_LENGTH, ax.ACT_KV_HEADS, ax.ACT_HEAD_DIM))

        if decode:
            k, v, mask = self._update_cache(k, v, mask)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        result = attention(self.implementation)(
            q, k, v, mask=mask, bias=bias, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
            deterministic=deterministic, return_weights=return_weights,
        )
        out, weights = (result if return_weights else (result, None))
        out = nn.with_logical_constraint(out, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_HEADS, ax.ACT_HEAD_DIM))
        y = DenseGeneral(
            (d,), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), in_axes=2, name="out",
            kernel_init=default_kernel_init(self.out_init_std), **dense,
        )(out)
        if return_weights:
            self.sow("intermediates", "attention_weights", weights)
        return y

    def _update_cache(
        self, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Write ``k, v`` at the cache index; return the whole cache and a causal mask over it."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not initialized:
            # The init call only sizes the cache: its input length is the cache length.
            return k, v, mask
        b, t = k.shape[0], k.shape[1]
        s = cached_key.value.shape[1]
        i = index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), (0, i, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype), (0, i, 0, 0))
        index.value = i + t
        q_pos = i + jnp.arange(t, dtype=jnp.int32)
        k_pos = jnp.arange(s, dtype=jnp.int32)
        cache_mask = jnp.broadcast_to(k_pos[None, None, None, :] <= q_pos[None, None, :, None], (b, 1, t, s))
        return cached_key.value, cached_value.value, cache_mask
