"""Virtual tokens: prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021).

* :class:`PromptEmbedding` (``prompt/embedding [P, D]``): P learned input embeddings that the
  models prepend to the token embeddings (``config.peft.method=prompt``), as Hugging Face
  ``peft``'s PromptTuning does. They then pass through the position (and token-type)
  embeddings as the ordinary leading positions ``0..P-1``; the real tokens take ``P..P+T-1``.
* :class:`PrefixKV` (``.../attn/prefix/{key, value} [P, K, H]``): per self-attention layer, P
  learned keys and values that every query may attend to (``config.peft.method=prefix``), as
  ``peft``'s PrefixTuning without its projection (the ``past_key_values`` of each layer). The
  prefix occupies positions ``0..P-1`` as a ``past_key_values`` cache does in Hugging Face
  models, so the real tokens take positions ``P..``. Prefix keys carry no position of their
  own: RoPE does not rotate them and relative / ALiBi biases are 0 on them.

Masks: virtual tokens are attendable by every real token (also under causal masking and across
packed segments). Virtual queries (prompt tuning) attend the virtual tokens (in a causal model
only those before them) and, in a bidirectional model, every valid real token, as a
Hugging Face model does with ``peft``'s all-ones prefix attention mask.

Shapes: B batch, P virtual tokens, T real length, S key length, K kv heads, H head dim, D model dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax

INIT_STD = 0.02  # as the token embeddings: virtual tokens start at the scale of real ones


class PromptEmbedding(nn.Module):
    """``P`` learned input embeddings ``embedding [P, D]`` (prompt tuning)."""

    num_tokens: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, batch: int) -> jnp.ndarray:
        """The ``[B, P, D]`` virtual-token embeddings for a batch of ``batch`` rows."""
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=INIT_STD), (None, ax.EMBED)),
            (self.num_tokens, self.features),
            self.param_dtype,
        )
        return jnp.broadcast_to(table.astype(self.dtype)[None], (batch, self.num_tokens, self.features))


class PrefixKV(nn.Module):
    """One layer's learned attention prefix: ``key``, ``value`` ``[P, K, H]`` (prefix tuning)."""

    num_tokens: int
    num_kv_heads: int
    head_dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(key, value)``, each ``[P, K, H]``."""
        shape = (self.num_tokens, self.num_kv_heads, self.head_dim)
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=INIT_STD), (None, ax.KV_HEADS, ax.HEAD_DIM))
        return self.param("key", init, shape, self.param_dtype), self.param("value", init, shape, self.param_dtype)


def prepend_keys(mask: jnp.ndarray | None, num: int) -> jnp.ndarray | None:
    """A mask broadcastable to ``[B, N, T, S]`` -> ``[..., T, P + S]``: every query may attend the P prefix keys."""
    if mask is None:
        return None
    return jnp.concatenate([jnp.ones(mask.shape[:-1] + (num,), bool), mask.astype(bool)], axis=-1)


def prepend_zero_bias(bias: jnp.ndarray | None, num: int) -> jnp.ndarray | None:
    """A logits bias broadcastable to ``[B, N, T, S]`` -> ``[..., T, P + S]`` with 0 on the prefix keys."""
    if bias is None:
        return None
    return jnp.concatenate([jnp.zeros(bias.shape[:-1] + (num,), bias.dtype), bias], axis=-1)


def prompt_mask(
    real: jnp.ndarray | None, k_valid: jnp.ndarray | None, num: int, t: int, *, causal: bool
) -> jnp.ndarray:
    """The ``[B|1, 1, P + T, P + T]`` self-attention mask of P virtual tokens followed by T real ones.

    Args:
      real: the real tokens' own mask, broadcastable to ``[B, 1, T, T]`` (causal / segments /
        key padding), or None (all allowed).
      k_valid: ``[B, T]`` bool, the real keys virtual queries may attend in a bidirectional
        model (None: all); unused when ``causal``.
      num: P.
      t: T.
      causal: virtual queries attend only the virtual tokens up to themselves.
    """
    real = jnp.ones((1, 1, t, t), bool) if real is None else real.astype(bool)
    b = max(real.shape[0], 1 if k_valid is None else k_valid.shape[0])
    real = jnp.broadcast_to(real, (b, 1, t, t))
    if causal:
        virtual_virtual = jnp.tril(jnp.ones((num, num), bool))
        virtual_real = jnp.zeros((b, 1, num, t), bool)
    else:
        virtual_virtual = jnp.ones((num, num), bool)
        valid = jnp.ones((b, t), bool) if k_valid is None else jnp.broadcast_to(k_valid.astype(bool), (b, t))
        virtual_real = jnp.broadcast_to(valid[:, None, None, :], (b, 1, num, t))
    top = jnp.concatenate([jnp.broadcast_to(virtual_virtual, (b, 1, num, num)), virtual_real], axis=-1)
    bottom = jnp.concatenate([jnp.ones((b, 1, t, num), bool), real], axis=-1)
    return jnp.concatenate([top, bottom], axis=2)


def prompt_positions(positions: jnp.ndarray, num: int) -> jnp.ndarray:
    """``[B, T]`` real positions -> ``[B, P + T]``: ``0..P-1`` for the virtual tokens, the real ones shifted by P."""
    b = positions.shape[0]
    lead = jnp.broadcast_to(jnp.arange(num, dtype=positions.dtype), (b, num))
    return jnp.concatenate([lead, positions + num], axis=1)
