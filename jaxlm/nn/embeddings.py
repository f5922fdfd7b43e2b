"""Token embeddings and absolute position encodings.

Shapes: B batch, T length, D model dim, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import logical_axes as ax
from jaxlm.nn import matmul
from jaxlm.nn.linears import default_kernel_init


class Embed(nn.Module):
    """Token embedding ``[V, D]``; ``attend`` reuses it as a tied output projection."""

    vocab_size: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(default_kernel_init(), (ax.VOCAB, ax.EMBED)),
            (self.vocab_size, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        """``[B, T] int -> [B, T, D]``."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, T, D] -> [B, T, V]`` logits in float32."""
        return matmul.einsum("btd,vd->btv", x, self.embedding, self.dtype)


def sinusoidal_table(length: int, features: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """Return the fixed ``[length, D]`` encoding of Vaswani et al. (2017): sin on even, cos on odd channels."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, features, 2, dtype=np.float64) * (-np.log(max_timescale) / features))
    table = np.zeros((length, features), dtype=np.float64)
    table[:, 0::2] = np.sin(positions * div)
    table[:, 1::2] = np.cos(positions * div)[:, : features // 2]
    return table.astype(np.float32)


class SinusoidalPositions(nn.Module):
    """Adds nothing learnable: returns the sinusoidal encodings of ``positions``."""

    max_len: int
    features: int
    dtype: Any = jnp.float32

    def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
        """``[B, T] int -> [B, T, D]``."""
        table = jnp.asarray(sinusoidal_table(self.max_len, self.features))
        return jnp.take(table, positions, axis=0).astype(self.dtype)


class LearnedPositions(nn.Module):
    """A learned absolute position embedding table ``[max_len, D]``."""

    max_len: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
        """``[B, T] int -> [B, T, D]``."""
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.01), (ax.POSITIONS, ax.EMBED)),
            (self.max_len, self.features),
            self.param_dtype,
        )
        return jnp.take(table, positions, axis=0).astype(self.dtype)


def positions_like(ids: jnp.ndarray, offset: jax.Array | int = 0) -> jnp.ndarray:
    """``[B, T]`` positions ``offset .. offset+T-1``."""
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32) + offset, ids.shape)
