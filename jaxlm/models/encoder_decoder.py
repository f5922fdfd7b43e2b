"""Encoder-decoder Transformer (Vaswani et al. 2017; T5, Raffel et al. 2020).

The encoder reads ``inputs`` with bidirectional self-attention (padding: token id 0, or segment
0 of ``inputs_segment_ids``); the decoder reads ``targets_in`` (the targets shifted right by
:func:`shift_right`) with causal self-attention and cross-attention to the encoder output,
masked to its non-pad tokens. One token embedding is shared by encoder and decoder and, with
``tie_embeddings``, also projects the decoder output to the vocabulary.

Rules beyond the shared Transformer parts (``jaxlm.models.transformer``):

* Decoder depth is ``config.model.num_decoder_layers`` (0: ``num_layers``).
* Tied output with ``position='relative'`` (T5 v1.0): the decoder output is multiplied by
  ``D ** -0.5`` before the tied projection, as T5 does. Other tied models project unscaled.
* Each stack has its own position encoding: ``encoder/pos_embed``, ``decoder/pos_embed``
  (learned) or ``encoder/blocks/relative_bias``, ``decoder/blocks/relative_bias`` (T5:
  bidirectional in the encoder, causal in the decoder, each shared by all layers of its stack).
  RoPE rotates self-attention only; cross-attention has no position encoding.
* KV-cache decoding: call :meth:`EncoderDecoder.encode` once, then :meth:`EncoderDecoder.decode`
  with ``decode=True`` and the ``cache`` collection mutable, one or more target tokens at a
  time. Only decoder self-attention is cached; cross-attention recomputes its keys and values
  from the (fixed) encoder output each step.

Parameter tree and the Hugging Face ``T5ForConditionalGeneration`` tensor each maps from
(``.T`` = transposed and reshaped to the jaxlm shape; ``REL`` = ``layer.0.SelfAttention.relative_attention_bias``;
T5 has no biases (``use_bias=False``), and since T5 does not scale attention logits by
``H ** -0.5`` while jaxlm does, query kernels are T5's ``q.weight.T * sqrt(H)``)::

    token_embed/embedding [V, D]                          shared.weight
    encoder/blocks/relative_bias/rel_embedding [32, N]    encoder.block.0.REL.weight
    encoder/blocks/layer_i/attn_norm/scale                encoder.block.i.layer.0.layer_norm.weight
    encoder/blocks/layer_i/attn/{query,key,value}/kernel  encoder.block.i.layer.0.SelfAttention.{q,k,v}.weight.T
    encoder/blocks/layer_i/attn/out/kernel [N, H, D]      encoder.block.i.layer.0.SelfAttention.o.weight.T
    encoder/blocks/layer_i/mlp_norm/scale                 encoder.block.i.layer.1.layer_norm.weight
    encoder/blocks/layer_i/mlp/{wi | wi_0, wi_1, wo}/kernel  encoder.block.i.layer.1.DenseReluDense.{...}.weight.T
    encoder/final_norm/scale                              encoder.final_layer_norm.weight
    decoder/blocks/relative_bias/rel_embedding            decoder.block.0.REL.weight
    decoder/blocks/layer_i/attn_norm, attn/...            decoder.block.i.layer.0.{layer_norm, SelfAttention.*}
    decoder/blocks/layer_i/cross_attn_norm, cross_attn/... decoder.block.i.layer.1.{layer_norm, EncDecAttention.*}
    decoder/blocks/layer_i/mlp_norm, mlp/...              decoder.block.i.layer.2.{layer_norm, DenseReluDense.*}
    decoder/final_norm/scale                              decoder.final_layer_norm.weight
    lm_head/kernel [D, V]                                 lm_head.weight.T  (T5 v1.1, untied)

Lightweight fine-tuning (``config.peft``): bottleneck adapters in both stacks' blocks
(``.../adapter_{attn,mlp}/...``, see ``jaxlm.models.transformer``) and prompt tuning
(``prompt/embedding [P, D]``: virtual tokens before the encoder input, see :meth:`EncoderDecoder.encode`).

T5 v1.0 matches ``position='relative'``, ``norm='rmsnorm'``, ``norm_eps=1e-6``, ``use_bias=False``,
``activation='relu'``, ``tie_embeddings=True``, ``pre_norm=True``; v1.1 uses
``activation='geglu'`` and ``tie_embeddings=False`` (see ``configs/t5.py``). With ``scan_layers``
each stack's blocks are ``.../blocks/layers/block/...``.

Shapes: B batch, S input length, T target length, D model dim, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models import vocab
from jaxlm.models.transformer import ACT, BlockStack, CachePositions, add_positions, dtypes, is_tiled, norm
from jaxlm.nn import masks, virtual_tokens
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.embeddings import Embed, positions_like
from jaxlm.nn.linears import DenseGeneral
from jaxlm.nn.virtual_tokens import PromptEmbedding

PAD_ID = 0  # padding id of every jaxlm tokenizer; also T5's decoder start id


def shift_right(targets: jnp.ndarray, start_id: int = PAD_ID, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Decoder inputs: ``[start, y_0, ..., y_{T-2}]`` from targets ``[B, T]``.

    T5 starts with the pad id 0. With packed ``segment_ids``, the first token of every segment
    is also ``start_id`` (a segment never sees the previous segment's last token).
    """
    shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=start_id)[:, :-1]
    if segment_ids is not None:
        first = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
        shifted = jnp.where(first, jnp.asarray(start_id, targets.dtype), shifted)
    return shifted


def _valid(tokens: jnp.ndarray, segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    return segment_ids > 0 if segment_ids is not None else tokens != PAD_ID


def num_decoder_layers(cfg: ModelConfig) -> int:
    """Decoder depth: ``num_decoder_layers``, or ``num_layers`` when it is 0."""
    return cfg.num_decoder_layers or cfg.num_layers


class Encoder(nn.Module):
    """Positions, bidirectional blocks and (pre-norm) a final norm over embedded inputs."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        positions: jnp.ndarray,
        mask: jnp.ndarray,
        *,
        deterministic: bool,
        return_weights: bool = False,
    ) -> jnp.ndarray:
        """Token embeddings ``[B, S, D]`` -> encoder output ``[B, S, D]``."""
        cfg = self.cfg
        x = add_positions(cfg, x, positions)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACT)
        x = BlockStack(cfg, cfg.num_layers, causal=False, return_weights=return_weights, name="blocks")(
            x, positions=positions, mask=mask, deterministic=deterministic
        )
        if cfg.pre_norm:
            x = norm(cfg, "final_norm")(x)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, ACT)


class Decoder(nn.Module):
    """Positions, causal blocks with cross-attention and (pre-norm) a final norm."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        positions: jnp.ndarray | None,
        mask: jnp.ndarray | None,
        encoded: jnp.ndarray,
        cross_mask: jnp.ndarray,
        *,
        deterministic: bool,
        decode: bool,
        return_weights: bool = False,
    ) -> jnp.ndarray:
        """Target embeddings ``[B, T, D]`` -> decoder output ``[B, T, D]``."""
        cfg = self.cfg
        q_pos, k_pos = CachePositions(name="cache_positions")(x, positions, decode=decode)
        x = add_positions(cfg, x, q_pos)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACT)
        stack = BlockStack(
            cfg,
            num_decoder_layers(cfg),
            causal=True,
            cross_attention=True,
            return_weights=return_weights,
            name="blocks",
        )
        x = stack(
            x,
            positions=q_pos,
            key_positions=k_pos,
            mask=mask,
            encoded=encoded,
            cross_mask=cross_mask,
            deterministic=deterministic,
            decode=decode,
        )
        if cfg.pre_norm:
            x = norm(cfg, "final_norm")(x)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, ACT)


class EncoderDecoder(nn.Module):
    """Shared embedding, encoder, decoder and a tied (or untied) output projection."""

    cfg: ModelConfig

    def setup(self) -> None:
        """Create the shared embedding, both stacks and (untied) the LM head."""
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        self.token_embed = Embed(cfg.padded_vocab_size, cfg.embed_dim, dtype=dt, param_dtype=pdt)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = DenseGeneral(
                (cfg.padded_vocab_size,), (ax.EMBED, ax.VOCAB), use_bias=False, dtype=dt, param_dtype=pdt
            )
        if cfg.prompt_tokens:  # prompt tuning (config.peft.method=prompt): prompt/embedding [P, D]
            self.prompt = PromptEmbedding(cfg.prompt_tokens, cfg.embed_dim, dtype=dt, param_dtype=pdt)

    def encode(
        self,
        inputs: jnp.ndarray,
        *,
        inputs_positions: jnp.ndarray | None = None,
        inputs_segment_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
        return_attention_weights: bool = False,
    ) -> jnp.ndarray:
        """``inputs [B, S] int -> encoded [B, S, D]``; id 0 (or segment 0) is padding.

        ``return_attention_weights`` sows every layer's weights into ``intermediates`` (see ``DecoderOnly``).
        With prompt tuning the P virtual tokens lead the encoder input (positions 0..P-1, the
        inputs after them) and stay in its output, ``[B, P + S, D]``, for the decoder to attend
        (Lester et al. 2021); :meth:`decode` extends the cross-attention mask by them.
        """
        if inputs_positions is None:
            inputs_positions = positions_like(inputs)
        if is_tiled(self.cfg):  # memory-linear attention: the same masks as per-token vectors
            seg = inputs_segment_ids
            mask = masks.TokenMask(seg, seg) if seg is not None else masks.TokenMask(k_valid=_valid(inputs, None))
        elif inputs_segment_ids is not None:
            mask = masks.segment_mask(inputs_segment_ids, inputs_segment_ids)
        else:  # mask padding keys only, as T5 does
            mask = _valid(inputs, None)[:, None, None, :]
        x, p = self.token_embed(inputs), self.cfg.prompt_tokens
        if p:
            x = jnp.concatenate([self.prompt(x.shape[0]), x], axis=1)
            inputs_positions = virtual_tokens.prompt_positions(inputs_positions, p)
            real = _valid(inputs, inputs_segment_ids)
            mask = virtual_tokens.prompt_mask(mask, real, p, inputs.shape[1], causal=False)
        return self.encoder(
            x,
            inputs_positions,
            mask,
            deterministic=deterministic,
            return_weights=return_attention_weights,
        )

    def decode(
        self,
        encoded: jnp.ndarray,
        inputs: jnp.ndarray,
        targets_in: jnp.ndarray,
        *,
        targets_positions: jnp.ndarray | None = None,
        inputs_segment_ids: jnp.ndarray | None = None,
        targets_segment_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_attention_weights: bool = False,
    ) -> jnp.ndarray:
        """Decoder logits ``[B, T, V]`` (float32) for ``targets_in [B, T]`` given ``encoded [B, S, D]``.

        Args:
          encoded: the output of :meth:`encode`.
          inputs: ``[B, S]`` encoder token ids, for the cross-attention padding mask.
          targets_in: ``[B, T]`` decoder inputs (shifted targets, or the next tokens when decoding).
          targets_positions: ``[B, T]`` decoder positions (default ``0..T-1``, or continuing
            the cache when decoding).
          inputs_segment_ids: ``[B, S]`` packed input segments (0 = padding).
          targets_segment_ids: ``[B, T]`` packed target segments; with ``inputs_segment_ids``,
            cross-attention stays within a segment. Ignored when decoding.
          deterministic: disables dropout.
          decode: use and extend the decoder's self-attention cache (``cache`` collection).
          return_attention_weights: every self- and cross-attention layer sows its weights into
            ``intermediates`` (apply with ``mutable=['intermediates']``); off, nothing changes.
        """
        cfg = self.cfg
        p = cfg.prompt_tokens
        k_valid = _valid(inputs, inputs_segment_ids)
        if p:  # the encoder output starts with the prompt's virtual tokens: every target attends them
            k_valid = jnp.pad(k_valid, ((0, 0), (p, 0)), constant_values=True)
        if decode:
            mask = None  # the attention cache supplies the causal mask
            cross_mask = k_valid[:, None, None, :]
        elif is_tiled(cfg):  # memory-linear: segments and key padding as vectors, causal as a flag
            seg = targets_segment_ids
            mask = None if seg is None else masks.TokenMask(seg, seg)
            if seg is not None and inputs_segment_ids is not None:
                cross_mask = masks.TokenMask(seg, inputs_segment_ids)
            else:
                cross_mask = masks.TokenMask(k_valid=k_valid)
        else:
            slots = positions_like(targets_in)
            seg = targets_segment_ids
            mask = masks.combine(
                masks.causal_mask(slots, slots), masks.segment_mask(seg, seg) if seg is not None else None
            )
            if seg is not None and inputs_segment_ids is not None:
                cross_mask = masks.segment_mask(seg, inputs_segment_ids)
                if p:
                    cross_mask = virtual_tokens.prepend_keys(cross_mask, p)
            else:
                cross_mask = k_valid[:, None, None, :]
        x = self.decoder(
            self.token_embed(targets_in),
            targets_positions,
            mask,
            encoded,
            cross_mask,
            deterministic=deterministic,
            decode=decode,
            return_weights=return_attention_weights,
        )
        if cfg.tie_embeddings:
            if cfg.position == "relative":  # T5 v1.0 rescales before its tied projection
                x = x * jnp.asarray(cfg.embed_dim**-0.5, x.dtype)
            logits = self.token_embed.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        logits = vocab.real_logits(self.cfg, logits)  # padded ids never reach a softmax (jaxlm/models/vocab.py)
        return nn.with_logical_constraint(logits, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_VOCAB))

    def __call__(
        self,
        inputs: jnp.ndarray,
        targets_in: jnp.ndarray,
        *,
        inputs_positions: jnp.ndarray | None = None,
        targets_positions: jnp.ndarray | None = None,
        inputs_segment_ids: jnp.ndarray | None = None,
        targets_segment_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_attention_weights: bool = False,
    ) -> jnp.ndarray:
        """``inputs [B, S]``, ``targets_in [B, T]`` -> logits ``[B, T, V]`` float32 (encode then decode)."""
        encoded = self.encode(
            inputs,
            inputs_positions=inputs_positions,
            inputs_segment_ids=inputs_segment_ids,
            deterministic=deterministic,
            return_attention_weights=return_attention_weights,
        )
        return self.decode(
            encoded,
            inputs,
            targets_in,
            targets_positions=targets_positions,
            inputs_segment_ids=inputs_segment_ids,
            targets_segment_ids=targets_segment_ids,
            deterministic=deterministic,
            decode=decode,
            return_attention_weights=return_attention_weights,
        )
