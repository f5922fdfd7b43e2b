"""Decoder-only (GPT-style) language model.

Shapes: B batch, T length, D model dim, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models import config as model_config
from jaxlm.models.transformer import BlockStack, DecoderBlock
from jaxlm.nn import masks
from jaxlm.nn.embeddings import Embed, LearnedPositions, SinusoidalPositions, positions_like
from jaxlm.nn.linears import DenseGeneral
from jaxlm.nn.normalization import NORMS


class DecoderOnly(nn.Module):
    """Token embedding, absolute positions, causal pre-norm blocks, final norm, LM head."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        *,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jnp.ndarray:
        """``[B, T] int -> [B, T, V]`` float32 logits.

        Args:
          positions: absolute position of each token (default ``0..T-1``); generation passes
            the cache offset here.
          segment_ids: packed-document ids (0 = padding); attention stays within a segment.
          decode: use and extend the key/value cache (see ``MultiHeadAttention``).
        """
        cfg = self.cfg
        dt, pdt = model_config.dtype(cfg.dtype), model_config.dtype(cfg.param_dtype)
        if positions is None:
            positions = positions_like(tokens)
        embed = Embed(cfg.vocab_size, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="token_embed")
        x = embed(tokens)
        if cfg.position == "learned":
            x = x + LearnedPositions(cfg.max_len, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="pos_embed")(positions)
        elif cfg.position == "sinusoidal":
            x = x + SinusoidalPositions(cfg.max_len, cfg.embed_dim, dtype=dt)(positions)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_EMBED))

        mask = None
        if not decode:
            seg_mask = masks.segment_mask(segment_ids, segment_ids) if segment_ids is not None else None
            mask = masks.combine(masks.causal_mask(positions_like(tokens), positions_like(tokens)), seg_mask)
        x = BlockStack(cfg, DecoderBlock, name="blocks")(x, mask=mask, deterministic=deterministic, decode=decode)
        x = NORMS[cfg.norm](dtype=dt, param_dtype=pdt, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = DenseGeneral(
                (cfg.vocab_size,), (ax.EMBED, ax.VOCAB), use_bias=False, dtype=dt, param_dtype=pdt, name="lm_head"
            )(x).astype(jnp.float32)
        return nn.with_logical_constraint(logits, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_VOCAB))
