"""Encoder-only (BERT-style) model with masked-LM and next-sentence-prediction heads.

Token + position (+ token-type) embeddings, an embedding norm for post-norm (BERT) stacks,
bidirectional Transformer blocks with a padding mask, a final norm for pre-norm stacks, then:

* masked-LM head (BERT's ``cls.predictions``): dense ``D -> D``, activation
  (``config.model.activation``; the gate's function for gated names), norm, and the tied token
  embedding (or an untied ``[D, V]`` kernel) plus an output bias ``[V]``;
* next-sentence-prediction head: pooler (dense ``D -> D`` + tanh on the first token, BERT's
  ``[CLS]``) and a 2-way classifier.

Padding: token id 0 (``PAD_ID``) is padding unless ``segment_ids`` is given, in which case
segment 0 is padding and attention stays within a segment (packed sequences). Without
segment ids only padding keys are masked (as Hugging Face BERT does), so every position,
padding included, matches it; outputs at padding positions are meaningless either way and
must be weighted out of any loss.

Parameter tree and the Hugging Face ``BertForPreTraining`` tensor each maps from
(``.T`` = transposed; ``[D, N, H]`` = reshape of the transposed ``[D, D]`` weight)::

    token_embed/embedding [V, D]        bert.embeddings.word_embeddings.weight
    pos_embed/embedding [P, D]          bert.embeddings.position_embeddings.weight
    type_embed/embedding [2, D]         bert.embeddings.token_type_embeddings.weight
    embed_norm/{scale, bias}            bert.embeddings.LayerNorm.{weight, bias}
    blocks/layer_i/attn/query/kernel [D, N, H]   bert.encoder.layer.i.attention.self.query.weight.T
    blocks/layer_i/attn/query/bias [N, H]        ...attention.self.query.bias   (key, value alike)
    blocks/layer_i/attn/out/kernel [N, H, D]     ...attention.output.dense.weight.T
    blocks/layer_i/attn/out/bias [D]             ...attention.output.dense.bias
    blocks/layer_i/attn_norm/{scale, bias}       ...attention.output.LayerNorm
    blocks/layer_i/mlp/wi/{kernel, bias}         ...intermediate.dense (weight.T)
    blocks/layer_i/mlp/wo/{kernel, bias}         ...output.dense (weight.T)
    blocks/layer_i/mlp_norm/{scale, bias}        ...output.LayerNorm
    pooler/{kernel, bias}               bert.pooler.dense (weight.T)
    mlm/transform/{kernel, bias}        cls.predictions.transform.dense (weight.T)
    mlm/transform_norm/{scale, bias}    cls.predictions.transform.LayerNorm
    mlm/bias [V]                        cls.predictions.bias
    mlm/decoder/kernel [D, V]           cls.predictions.decoder.weight.T  (only if untied)
    nsp/{kernel [D, 2], bias [2]}       cls.seq_relationship (weight.T)

With a task head (:mod:`jaxlm.models.heads`) there is no ``mlm`` or ``nsp``, but ``head/...``
(and ``pooler`` only for a sequence-level head with ``pooling='auto'``).

Lightweight fine-tuning (``config.peft``) adds ``prompt/embedding [P, D]`` (prompt tuning: P
learned embeddings of token type 0 before the tokens, at positions 0..P-1, attending and
attended by every non-padding token; outputs keep only the real positions, so the pooler still
reads ``[CLS]``, where Hugging Face ``peft`` would pool the first virtual token),
``blocks/layer_i/attn/prefix/{key, value} [P, K, H]`` (prefix tuning; real positions start at P)
or ``blocks/layer_i/adapter_{attn,mlp}/...`` (bottleneck adapters).

BERT matches ``position='learned'``, ``pre_norm=False``, ``norm='layernorm'``,
``norm_eps=1e-12``, ``activation='gelu_exact'``, ``use_bias=True``, ``tie_embeddings=True``,
``type_vocab_size=2`` (see ``configs/bert.py``). With ``scan_layers`` the blocks are stacked as
``blocks/layers/block/...``.

Shapes: B batch, T length, D model dim, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models import heads, vocab
from jaxlm.models.heads import HeadConfig
from jaxlm.models.transformer import ACT, BlockStack, add_positions, dtypes, is_tiled, norm
from jaxlm.nn import masks, matmul, virtual_tokens
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.embeddings import Embed, positions_like
from jaxlm.nn.linears import DenseGeneral, activation
from jaxlm.nn.virtual_tokens import PromptEmbedding

PAD_ID = 0  # the padding id of every jaxlm tokenizer


def attention_mask(
    tokens: jnp.ndarray, segment_ids: jnp.ndarray | None, *, vector: bool = False
) -> jnp.ndarray | masks.TokenMask:
    """Bidirectional mask: ``[B, 1, T, T]`` within segments if given, else ``[B, 1, 1, T]`` non-pad keys.

    With ``vector`` (memory-linear attention) the same mask as a ``masks.TokenMask``.
    """
    if vector:
        if segment_ids is not None:
            return masks.TokenMask(segment_ids, segment_ids)
        return masks.TokenMask(k_valid=tokens != PAD_ID)
    if segment_ids is not None:
        return masks.segment_mask(segment_ids, segment_ids)
    return (tokens != PAD_ID)[:, None, None, :]


class TypeEmbed(nn.Module):
    """Token-type (segment A/B) embedding table ``[type_vocab_size, D]``, replicated on its small first axis."""

    num_types: int
    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        """The ``[type_vocab_size, D]`` table."""
        return self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, ax.EMBED)),
            (self.num_types, self.features),
            self.param_dtype,
        )


class MlmHead(nn.Module):
    """BERT's masked-LM head: dense, activation, norm, then tied (or own) decoder plus a bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, embedding: jnp.ndarray | None) -> jnp.ndarray:
        """``[B, T, D]`` and the ``[V, D]`` token embedding (None: untied) -> ``[B, T, V]`` float32."""
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        h = DenseGeneral(
            (cfg.embed_dim,), (ax.EMBED, ax.MLP), use_bias=cfg.use_bias, dtype=dt, param_dtype=pdt, name="transform"
        )(x)
        h = activation(cfg.activation)(h)
        h = norm(cfg, "transform_norm")(h)
        if embedding is None:
            logits = DenseGeneral(
                (cfg.padded_vocab_size,),
                (ax.EMBED, ax.VOCAB),
                use_bias=False,
                dtype=dt,
                param_dtype=pdt,
                name="decoder",
            )(h).astype(jnp.float32)
        else:
            logits = matmul.einsum("btd,vd->btv", h, embedding, dt)
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, (ax.VOCAB,)), (cfg.padded_vocab_size,), pdt
        )
        return vocab.real_logits(cfg, logits + bias.astype(jnp.float32))  # padded ids never reach a softmax


class EncoderOnly(nn.Module):
    """BERT: embeddings, bidirectional blocks, masked-LM and next-sentence heads (or a task head).

    Attributes:
      cfg: the model config.
      head: a task head (:mod:`jaxlm.models.heads`) in place of the MLM and NSP heads; the call
        then returns its output dict (``logits``, or ``start_logits`` / ``end_logits``).
    """

    cfg: ModelConfig
    head: HeadConfig | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        *,
        token_types: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
        return_attention_weights: bool = False,
    ) -> dict[str, jnp.ndarray]:
        """Encode ``tokens [B, T]``.

        Args:
          tokens: token ids; id 0 is padding unless ``segment_ids`` is given.
          token_types: ``[B, T]`` sentence A/B ids (0 / 1), default all 0; used when
            ``config.model.type_vocab_size > 0``.
          positions: ``[B, T]`` positions (default ``0..T-1``; packed sequences restart them).
          segment_ids: ``[B, T]`` packed-sequence ids, 0 = padding.
          deterministic: disables dropout.
          return_attention_weights: every attention layer sows its ``[B, N, T, T]`` weights into
            ``intermediates`` (apply with ``mutable=['intermediates']``); off, nothing changes.

        Returns:
          ``mlm_logits [B, T, V]`` (float32), ``nsp_logits [B, 2]`` (float32), ``pooled [B, D]``
          (the pooler output), ``hidden [B, T, D]`` (the encoder output); with a task head, the
          head's outputs instead (:mod:`jaxlm.models.heads`).
        """
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        prompt = cfg.prompt_tokens
        if positions is None:
            positions = positions_like(tokens)
        positions = positions + cfg.prefix_tokens  # a prefix holds positions 0..P-1 (as past_key_values do)
        embed = Embed(cfg.padded_vocab_size, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="token_embed")
        x = embed(tokens)
        types = jnp.zeros_like(tokens) if token_types is None else token_types
        if prompt:  # prompt tuning: virtual tokens of type 0 lead, at positions 0..P-1
            virtual = PromptEmbedding(prompt, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="prompt")(x.shape[0])
            x = jnp.concatenate([virtual, x], axis=1)
            positions = virtual_tokens.prompt_positions(positions, prompt)
            types = jnp.pad(types, ((0, 0), (prompt, 0)))
        x = add_positions(cfg, x, positions)
        if cfg.type_vocab_size:
            table = TypeEmbed(cfg.type_vocab_size, cfg.embed_dim, param_dtype=pdt, name="type_embed")()
            x = x + jnp.take(table, types, axis=0).astype(dt)
        if not cfg.pre_norm:
            x = norm(cfg, "embed_norm")(x)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACT)

        mask = attention_mask(tokens, segment_ids, vector=is_tiled(cfg))
        if prompt:
            real = heads.padding_mask(tokens, segment_ids)
            mask = virtual_tokens.prompt_mask(mask, real, prompt, tokens.shape[1], causal=False)
        x = BlockStack(cfg, cfg.num_layers, causal=False, return_weights=return_attention_weights, name="blocks")(
            x, positions=positions, mask=mask, deterministic=deterministic
        )
        if cfg.pre_norm:
            x = norm(cfg, "final_norm")(x)
        # Outputs at the real tokens only (prompt tuning): the heads and BERT's pooler see [CLS] at 0.
        hidden = nn.with_logical_constraint(x[:, prompt:], ACT)
        if self.head is not None:
            return self._task_head(hidden, tokens, segment_ids, deterministic=deterministic)

        mlm_logits = MlmHead(cfg, name="mlm")(hidden, None if not cfg.tie_embeddings else embed.embedding)
        mlm_logits = nn.with_logical_constraint(mlm_logits, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_VOCAB))
        pooled = self._pooler(hidden)
        nsp_logits = DenseGeneral((2,), (ax.EMBED, None), dtype=dt, param_dtype=pdt, name="nsp")(pooled)
        return {
            "mlm_logits": mlm_logits,
            "nsp_logits": nsp_logits.astype(jnp.float32),
            "pooled": pooled,
            "hidden": hidden,
        }

    def _pooler(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """BERT's pooler: dense ``D -> D`` and tanh on the first token (``[CLS]``), ``[B, D]``."""
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        pooled = DenseGeneral(
            (cfg.embed_dim,), (ax.EMBED, ax.MLP), use_bias=cfg.use_bias, dtype=dt, param_dtype=pdt, name="pooler"
        )(hidden[:, 0])
        return nn.with_logical_constraint(jnp.tanh(pooled), (ax.ACT_BATCH, ax.ACT_EMBED))

    def _task_head(
        self, hidden: jnp.ndarray, tokens: jnp.ndarray, segment_ids: jnp.ndarray | None, *, deterministic: bool
    ) -> dict[str, jnp.ndarray]:
        """The task head's outputs from the encoder output ``hidden [B, T, D]`` (see :mod:`jaxlm.models.heads`)."""
        head = self.head
        x = hidden
        if head.sequence_level and head.pooling == "auto":
            x = self._pooler(hidden)
        elif head.sequence_level:
            x = heads.pool(hidden, tokens, segment_ids, head.pooling)
        return heads.TaskHead(self.cfg, head, name="head")(x, deterministic=deterministic)
