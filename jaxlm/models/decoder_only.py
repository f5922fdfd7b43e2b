"""Decoder-only (GPT-style) language model.

Token embedding, positions (``config.model.position``: learned / sinusoidal added to the
embeddings, rope / relative / alibi inside attention, or none), causal Transformer blocks
(pre- or post-norm), a final norm for pre-norm stacks, and a tied or untied LM head.

Parameter tree (unrolled; ``scan_layers`` stacks the blocks as ``blocks/layers/block/...``)::

    token_embed/embedding            [V, D]
    pos_embed/embedding              [max_len, D]     position='learned'
    blocks/relative_bias/rel_embedding [buckets, N]   position='relative'
    blocks/layer_i/attn_norm/{scale, bias}
    blocks/layer_i/attn/{query, key, value}/{kernel [D, N|K, H], bias}
    blocks/layer_i/attn/out/{kernel [N, H, D], bias [D]}
    blocks/layer_i/mlp_norm/{scale, bias}
    blocks/layer_i/mlp/{wi | wi_0, wi_1}/{kernel [D, F], bias}, mlp/wo/{kernel [F, D], bias}
    final_norm/{scale, bias}                          pre_norm
    lm_head/kernel                   [D, V]           tie_embeddings=False, no task head
    head/...                         a task head (jaxlm.models.heads) instead of the LM head
    prompt/embedding                 [P, D]           config.peft.method=prompt (jaxlm.nn.virtual_tokens)
    blocks/layer_i/attn/prefix/{key, value} [P, K, H] config.peft.method=prefix
    blocks/layer_i/adapter_{attn,mlp}/{down, up}/{kernel, bias}  config.peft.method=adapter

Prompt tuning prepends P learned embeddings at positions 0..P-1 (the real tokens move to
P..P+T-1, also with given ``positions``), every real token attends them, and the outputs keep
only the real positions (``[B, T, ...]``, so losses and heads are unchanged); it has no decode
mode. Prefix tuning shifts the real positions by P as well (the prefix is the first P cache
slots of a Hugging Face model) and works in decode mode.

The default config is GPT-2's layout (``jaxlm.interop.hf`` maps its weights onto this tree).
The ``V`` of the vocabulary arrays is ``cfg.padded_vocab_size``; the returned logits cover the
real ``cfg.vocab_size`` ids (:mod:`jaxlm.models.vocab`).

Shapes: B batch, T length, D model dim, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import ModelConfig
from jaxlm.models import heads, vocab
from jaxlm.models.heads import HeadConfig
from jaxlm.models.transformer import ACT, BlockStack, CachePositions, add_positions, dtypes, is_tiled, norm
from jaxlm.nn import masks, virtual_tokens
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.embeddings import Embed, positions_like
from jaxlm.nn.linears import DenseGeneral
from jaxlm.nn.virtual_tokens import PromptEmbedding


class DecoderOnly(nn.Module):
    """Token embedding, positions, causal blocks, final norm, LM head (or a task head).

    Attributes:
      cfg: the model config.
      head: a task head (:mod:`jaxlm.models.heads`) in place of the LM head; the call then
        returns its output dict (``logits``, or ``start_logits`` / ``end_logits``).
    """

    cfg: ModelConfig
    head: HeadConfig | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        *,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_attention_weights: bool = False,
    ) -> jnp.ndarray | dict[str, jnp.ndarray]:
        """``[B, T] int -> [B, T, V]`` float32 logits (with a task head: its output dict).

        Args:
          tokens: ``[B, T]`` token ids.
          positions: absolute position of each token (default ``0..T-1``, or continuing the
            cache in decode mode); generation passes the cache offset here.
          segment_ids: packed-document ids (0 = padding); attention stays within a segment.
            Ignored in decode mode.
          deterministic: disables dropout.
          decode: use and extend the key/value cache (see ``MultiHeadAttention``); the init
            call with ``decode=True`` sizes the cache by the input length.
          return_attention_weights: every attention layer sows its ``[B, N, T, S]`` weights as
            ``intermediates/blocks/.../attn/attention_weights`` (apply with
            ``mutable=['intermediates']``); off, the computation is unchanged.
        """
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        prompt = cfg.prompt_tokens
        if prompt and decode:  # generation reaches here through the CLI: a one-line error, not a traceback
            raise ConfigError(
                "config.peft.method=prompt: a prompt-tuned model has no KV-cache decode mode (its virtual tokens "
                "would have to lead every cache); use prefix tuning to generate, or jaxlm eval / predict"
            )
        q_pos, k_pos = CachePositions(name="cache_positions")(tokens, positions, decode=decode)
        if cfg.prefix_tokens:  # the prefix holds positions 0..P-1, as a past_key_values cache does
            q_pos, k_pos = q_pos + cfg.prefix_tokens, k_pos + cfg.prefix_tokens
        embed = Embed(cfg.padded_vocab_size, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="token_embed")
        x = embed(tokens)
        if prompt:  # prompt tuning: virtual tokens lead, at positions 0..P-1
            virtual = PromptEmbedding(prompt, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="prompt")(x.shape[0])
            x = jnp.concatenate([virtual, x], axis=1)
            q_pos = k_pos = virtual_tokens.prompt_positions(q_pos, prompt)
        x = add_positions(cfg, x, q_pos)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACT)

        mask = None  # in decode mode the attention cache supplies the causal mask
        if not decode and is_tiled(cfg):  # memory-linear: segments as vectors, causal as a flag
            mask = None if segment_ids is None else masks.TokenMask(segment_ids, segment_ids)
        elif not decode:
            slots = positions_like(tokens)
            seg_mask = masks.segment_mask(segment_ids, segment_ids) if segment_ids is not None else None
            mask = masks.combine(masks.causal_mask(slots, slots), seg_mask)
            if prompt:
                mask = virtual_tokens.prompt_mask(mask, None, prompt, tokens.shape[1], causal=True)
        x = BlockStack(cfg, cfg.num_layers, causal=True, return_weights=return_attention_weights, name="blocks")(
            x, positions=q_pos, key_positions=k_pos, mask=mask, deterministic=deterministic, decode=decode
        )
        x = x[:, prompt:]  # outputs at the real tokens only: [B, T, ...] as without prompt tuning
        if cfg.pre_norm:
            x = norm(cfg, "final_norm")(x)
        if self.head is not None:
            return self._task_head(x, tokens, segment_ids, deterministic=deterministic, decode=decode)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = DenseGeneral(
                (cfg.padded_vocab_size,),
                (ax.EMBED, ax.VOCAB),
                use_bias=False,
                dtype=dt,
                param_dtype=pdt,
                name="lm_head",
            )(x).astype(jnp.float32)
        logits = vocab.real_logits(cfg, logits)  # padded ids never reach a softmax (jaxlm/models/vocab.py)
        return nn.with_logical_constraint(logits, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_VOCAB))

    def _task_head(
        self, x: jnp.ndarray, tokens: jnp.ndarray, segment_ids: jnp.ndarray | None, *, deterministic: bool, decode: bool
    ) -> dict[str, jnp.ndarray]:
        """The task head's outputs from the final hidden states ``x [B, T, D]`` (see :mod:`jaxlm.models.heads`)."""
        head = self.head
        if decode:  # generation reaches here through the CLI: a one-line error, not a traceback
            raise ConfigError(
                f"config.task.head={head.kind!r}: a model with a task head predicts no tokens, so it has no "
                "decode mode; use jaxlm predict"
            )
        x = nn.with_logical_constraint(x, ACT)
        if head.sequence_level:
            # 'auto' on a decoder: the last real token, the only one that attended to the whole sequence.
            x = heads.pool(x, tokens, segment_ids, "last" if head.pooling == "auto" else head.pooling)
        return heads.TaskHead(self.cfg, head, decoder=True, name="head")(x, deterministic=deterministic)
