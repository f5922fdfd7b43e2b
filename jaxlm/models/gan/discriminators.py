"""Text-GAN discriminators: SeqGAN's CNN, a Transformer encoder and an LSTM classifier.

Each takes token ids ``[B, T]`` or relaxed one-hots ``[B, T, V]`` (embedded as ``x @ E``, so
Gumbel-softmax samples and the interpolates of the WGAN-GP penalty pass through) and returns
one real-vs-fake logit per sequence, ``[B]`` float32. Spectral normalization is applied to the
parameters by the caller (``jaxlm.models.gan.Discriminator``), not inside the modules, so the
same module serves both.

* :class:`CnnDiscriminator` (Kim 2014, as in SeqGAN and Texygen): embedding (E = 64), one
  convolution per filter width (widths 1..10, 15, 20 with 100/200/200/200/200/100 x 5/160/160
  filters; widths longer than the sequence are skipped), ReLU, max-over-time pooling, a
  highway layer, dropout, and a linear output. SeqGAN's two-class softmax is one logit here.
* :class:`TransformerDiscriminator`: embedding, learned positions, bidirectional
  Transformer blocks (``jaxlm.models.transformer.BlockStack``), mean pooling, linear output.
* :class:`LstmDiscriminator`: embedding, LSTM, the last hidden state, linear output.

Shapes: B batch, T length, V vocab, E embedding dim, F pooled features, H hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models.gan.generators import LstmCore, embed_inputs, token_shape
from jaxlm.models.transformer import BlockStack, norm
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.embeddings import LearnedPositions, positions_like

# SeqGAN's discriminator: filter widths and counts (discriminator.py of the reference code).
SEQGAN_FILTER_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20)
SEQGAN_NUM_FILTERS = (100, 200, 200, 200, 200, 100, 100, 100, 100, 100, 160, 160)


def _param(module: nn.Module, name: str, init: nn.initializers.Initializer, shape: tuple, axes: tuple) -> jnp.ndarray:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _uniform_pm1(key: jax.Array, shape: tuple, dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
    """U(-1, 1), SeqGAN's discriminator embedding initializer."""
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


def _output(module: nn.Module, features: jnp.ndarray) -> jnp.ndarray:
    """A linear map ``[B, F] -> [B]``."""
    w = _param(module, "out_kernel", nn.initializers.normal(0.1), (features.shape[-1], 1), (ax.MLP, ax.NORM))
    b = _param(module, "out_bias", nn.initializers.zeros, (1,), (ax.NORM,))
    return (features @ w + b)[:, 0]


class CnnDiscriminator(nn.Module):
    """SeqGAN's CNN text classifier with highway layer and dropout."""

    vocab_size: int
    embed_dim: int = 64
    filter_sizes: Sequence[int] = SEQGAN_FILTER_SIZES
    num_filters: Sequence[int] = SEQGAN_NUM_FILTERS
    dropout_rate: float = 0.25

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """``[B, T]`` ids or ``[B, T, V]`` one-hots -> ``[B]`` logits."""
        table = _param(self, "embedding", _uniform_pm1, (self.vocab_size, self.embed_dim), (ax.VOCAB, ax.EMBED))
        x = embed_inputs(inputs, table)
        _, t = token_shape(inputs)
        pooled = []
        for width, count in zip(self.filter_sizes, self.num_filters):
            if width > t:
                continue
            kernel = _param(
                self,
                f"conv{width}_kernel",
                nn.initializers.truncated_normal(0.1),
                (width, self.embed_dim, count),
                (ax.NORM, ax.EMBED, ax.MLP),
            )
            bias = _param(self, f"conv{width}_bias", nn.initializers.constant(0.1), (count,), (ax.MLP,))
            y = jax.lax.conv_general_dilated(x, kernel, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
            pooled.append(jnp.max(jax.nn.relu(y + bias), axis=1))  # max over time: [B, count]
        h = jnp.concatenate(pooled, axis=-1)
        f = h.shape[-1]
        init = nn.initializers.normal(0.1)
        gate_w = _param(self, "highway_gate_kernel", init, (f, f), (ax.MLP, ax.EMBED))
        gate_b = _param(self, "highway_gate_bias", nn.initializers.zeros, (f,), (ax.EMBED,))
        lin_w = _param(self, "highway_kernel", init, (f, f), (ax.MLP, ax.EMBED))
        lin_b = _param(self, "highway_bias", nn.initializers.zeros, (f,), (ax.EMBED,))
        gate = jax.nn.sigmoid(h @ gate_w + gate_b)
        h = gate * jax.nn.relu(h @ lin_w + lin_b) + (1.0 - gate) * h
        h = Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return _output(self, h)


class TransformerDiscriminator(nn.Module):
    """A bidirectional Transformer encoder with mean pooling and a linear output."""

    cfg: ModelConfig  # embed_dim, num_layers, num_heads, mlp_dim, max_len, vocab_size, dropout_rate ...

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """``[B, T]`` ids or ``[B, T, V]`` one-hots -> ``[B]`` logits."""
        cfg = self.cfg
        b, t = token_shape(inputs)
        table = _param(
            self, "embedding", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.embed_dim), (ax.VOCAB, ax.EMBED)
        )
        positions = positions_like(jnp.zeros((b, t), jnp.int32))
        x = embed_inputs(inputs, table) + LearnedPositions(cfg.max_len, cfg.embed_dim, name="pos_embed")(positions)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = BlockStack(cfg, cfg.num_layers, causal=False, name="blocks")(
            x, positions=positions, mask=None, deterministic=deterministic
        )
        if cfg.pre_norm:
            x = norm(cfg, "final_norm")(x)
        return _output(self, jnp.mean(x.astype(jnp.float32), axis=1))


class LstmDiscriminator(nn.Module):
    """Embedding, one LSTM layer, the last hidden state, a linear output."""

    vocab_size: int
    embed_dim: int = 64
    hidden_dim: int = 64
    dropout_rate: float = 0.25

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """``[B, T]`` ids or ``[B, T, V]`` one-hots -> ``[B]`` logits."""
        table = _param(
            self, "embedding", nn.initializers.normal(0.1), (self.vocab_size, self.embed_dim), (ax.VOCAB, ax.EMBED)
        )
        h = LstmCore(self.hidden_dim, name="lstm")(embed_inputs(inputs, table))
        h = Dropout(self.dropout_rate)(h[:, -1], deterministic=deterministic)
        return _output(self, h)
