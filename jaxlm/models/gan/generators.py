"""Text-GAN generators: the SeqGAN LSTM language model and the decoder-only Transformer.

Both take token ids ``[B, T]`` or relaxed one-hot vectors ``[B, T, V]`` (Gumbel-softmax
training feeds these; they are embedded as ``x @ embedding``, which equals the lookup for a
hard one-hot) and return next-token logits ``[B, T, V]`` (float32). Both have the decoding
cache of the LM models (``decode=True``: the ``cache`` collection holds the LSTM state or the
Transformer's keys and values; the init call with ``decode=True`` only creates it), so
``jaxlm.decoding`` samples and rolls them out inside jit.

* :class:`LstmGenerator` is SeqGAN's generator (embedding E = 32, hidden H = 32, output layer
  ``[H, V]`` + bias, every weight initialized N(0, 0.1) as in the reference code).
* :class:`TransformerGenerator` is ``jaxlm.models.decoder_only.DecoderOnly`` (same blocks,
  same parameter tree, so an LM checkpoint's parameters fit) with soft inputs.

Shapes: B batch, T length, V vocab, E embedding dim, H hidden size, D model dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models.transformer import ACT, BlockStack, CachePositions, add_positions, dtypes, norm
from jaxlm.nn import masks
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.embeddings import Embed, positions_like
from jaxlm.nn.linears import DenseGeneral

SEQGAN_INIT = nn.initializers.normal(stddev=0.1)


def embed_inputs(inputs: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """Token ids ``[B, T]`` -> ``table[ids]``; relaxed one-hots ``[B, T, V]`` -> ``inputs @ table``."""
    if jnp.issubdtype(inputs.dtype, jnp.integer):
        return jnp.take(table, inputs, axis=0)
    return jnp.einsum("btv,ve->bte", inputs.astype(jnp.float32), table.astype(jnp.float32))


def token_shape(inputs: jnp.ndarray) -> tuple[int, int]:
    """``(B, T)`` of ids ``[B, T]`` or one-hots ``[B, T, V]``."""
    return inputs.shape[0], inputs.shape[1]


class LstmCore(nn.Module):
    """One LSTM layer over time, ``[B, T, E] -> [B, T, H]``, with the state in ``cache`` when decoding.

    Gates i, f, g (candidate), o from ``x W + h U + b``; ``c' = f c + i g``, ``h' = o tanh(c')``.
    """

    hidden_dim: int
    kernel_init: nn.initializers.Initializer = SEQGAN_INIT

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, decode: bool = False) -> jnp.ndarray:
        b, _, e = x.shape
        h_dim = self.hidden_dim
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, (ax.EMBED, ax.MLP)), (e, 4 * h_dim)
        )
        recurrent = self.param(
            "recurrent_kernel", nn.with_logical_partitioning(self.kernel_init, (ax.EMBED, ax.MLP)), (h_dim, 4 * h_dim)
        )
        bias = self.param("bias", nn.with_logical_partitioning(self.kernel_init, (ax.MLP,)), (4 * h_dim,))
        xg = jnp.einsum("bte,eg->btg", x.astype(jnp.float32), kernel) + bias

        def zeros() -> jnp.ndarray:
            return jnp.zeros((b, h_dim), jnp.float32)

        initialized = decode and self.has_variable("cache", "h")
        if decode:
            h_var, c_var = self.variable("cache", "h", zeros), self.variable("cache", "c", zeros)
            state = (h_var.value, c_var.value)
        else:
            state = (zeros(), zeros())

        def step(state: tuple, xg_t: jnp.ndarray) -> tuple[tuple, jnp.ndarray]:
            h, c = state
            i, f, g, o = jnp.split(xg_t + h @ recurrent, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        state, hs = jax.lax.scan(step, state, jnp.swapaxes(xg, 0, 1))
        if initialized:
            h_var.value, c_var.value = state
        return jnp.swapaxes(hs, 0, 1)


class LstmGenerator(nn.Module):
    """SeqGAN's LSTM language model: embedding, one LSTM layer, output layer."""

    vocab_size: int
    embed_dim: int = 32
    hidden_dim: int = 32

    @nn.compact
    def __call__(
        self,
        inputs: jnp.ndarray,
        *,
        positions: jnp.ndarray | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jnp.ndarray:
        """``[B, T]`` ids or ``[B, T, V]`` one-hots -> ``[B, T, V]`` logits; ``positions`` is ignored."""
        del positions, deterministic  # a recurrence needs no positions; no dropout in SeqGAN's generator
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(SEQGAN_INIT, (ax.VOCAB, ax.EMBED)),
            (self.vocab_size, self.embed_dim),
        )
        h = LstmCore(self.hidden_dim, name="lstm")(embed_inputs(inputs, table), decode=decode)
        out = self.param(
            "out_kernel",
            nn.with_logical_partitioning(SEQGAN_INIT, (ax.EMBED, ax.VOCAB)),
            (self.hidden_dim, self.vocab_size),
        )
        out_bias = self.param("out_bias", nn.with_logical_partitioning(SEQGAN_INIT, (ax.VOCAB,)), (self.vocab_size,))
        logits = jnp.einsum("bth,hv->btv", h, out) + out_bias
        return nn.with_logical_constraint(logits, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_VOCAB))


class TransformerGenerator(nn.Module):
    """The decoder-only Transformer (``DecoderOnly``'s layout and parameters) with soft inputs."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        inputs: jnp.ndarray,
        *,
        positions: jnp.ndarray | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jnp.ndarray:
        """``[B, T]`` ids or ``[B, T, V]`` one-hots -> ``[B, T, V]`` float32 logits (causal)."""
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        b, t = token_shape(inputs)
        like = jnp.zeros((b, t), jnp.int32)
        q_pos, k_pos = CachePositions(name="cache_positions")(like, positions, decode=decode)
        embed = Embed(cfg.vocab_size, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="token_embed")
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            x = embed(inputs)
        else:
            x = embed_inputs(inputs, embed.embedding).astype(dt)
        x = add_positions(cfg, x, q_pos)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACT)
        mask = None  # decoding: the attention cache supplies the causal mask
        if not decode:
            slots = positions_like(like)
            mask = masks.causal_mask(slots, slots)
        x = BlockStack(cfg, cfg.num_layers, causal=True, name="blocks")(
            x, positions=q_pos, key_positions=k_pos, mask=mask, deterministic=deterministic, decode=decode
        )
        if cfg.pre_norm:
            x = norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = DenseGeneral(
                (cfg.vocab_size,), (ax.EMBED, ax.VOCAB), use_bias=False, dtype=dt, param_dtype=pdt, name="lm_head"
            )(x).astype(jnp.float32)
        return nn.with_logical_constraint(logits, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_VOCAB))
