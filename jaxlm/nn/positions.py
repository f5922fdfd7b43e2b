"""Relative position encodings: RoPE, ALiBi and the T5 relative position bias.

Absolute encodings (learned, sinusoidal) are added to the token embeddings and live in
``jaxlm.nn.embeddings``; the encodings here act inside attention: RoPE rotates queries and keys,
ALiBi and T5 add a bias to the attention logits (the ``bias`` argument of the attention
functions, ``[B or 1, N, T, S]``).

Shapes: B batch, T query length, S key length, N heads, H head dim.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxlm import logical_axes as ax

# ``config.model.position`` -> where the encoding acts. "embedding": added to the token
# embeddings (embeddings.LearnedPositions / SinusoidalPositions); "bias": an attention-logit bias
# (RelativePositionBias / alibi_bias); "rotary": applied to q and k (apply_rope, or
# MultiHeadAttention.rope_max_wavelength); "none": no position information at all.
POSITION_ENCODINGS: dict[str, str] = {
    "learned": "embedding",
    "sinusoidal": "embedding",
    "relative": "bias",
    "alibi": "bias",
    "rope": "rotary",
    "none": "none",
}


def _batched(positions: jnp.ndarray) -> jnp.ndarray:
    """``[T]`` or ``[B, T]`` -> ``[B or 1, T]``."""
    positions = jnp.asarray(positions)
    return positions[None] if positions.ndim == 1 else positions


# ---------------------------------------------------------------------------------------------
# RoPE (Su et al., 2021, "RoFormer").


def rope_inv_frequencies(head_dim: int, max_wavelength: float = 10_000.0) -> jnp.ndarray:
    """Return the ``[H // 2]`` rotation frequencies ``max_wavelength ** (-2i / H)``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return jnp.asarray(max_wavelength**-exponents, dtype=jnp.float32)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (the half-split pairing of GPT-NeoX / Llama)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(
    x: jnp.ndarray,
    positions: jnp.ndarray,
    *,
    max_wavelength: float = 10_000.0,
    scale: float = 1.0,
    inv_frequencies: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Rotate channel pairs ``(i, i + H/2)`` of ``x`` by ``position * frequency_i``.

    Args:
      x: ``[B, T, N, H]`` queries or keys.
      positions: ``[B, T]`` or ``[T]`` integer (or float) positions.
      max_wavelength: the RoPE base (10 000 in RoFormer / Llama).
      scale: linear position interpolation (Chen et al., 2023): positions are divided by
        ``scale``, so ``scale=4`` stretches a model trained on length L to 4L.
      inv_frequencies: ``[H // 2]`` frequencies overriding ``max_wavelength``; the hook for other
        context-extension schemes (NTK-aware, YaRN, Llama-3 frequency scaling) that rescale
        frequencies rather than positions.

    Returns:
      ``x`` rotated, same shape and dtype; computed in float32. Because every pair is rotated
      by an angle linear in the position, ``<rope(q, i), rope(k, j)>`` depends on ``i - j`` only.
    """
    h = x.shape[-1]
    freqs = rope_inv_frequencies(h, max_wavelength) if inv_frequencies is None else jnp.asarray(inv_frequencies)
    pos = _batched(positions).astype(jnp.float32) / scale
    angles = pos[:, :, None, None] * freqs.astype(jnp.float32)  # [B, T, 1, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(angles) + rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# ALiBi (Press et al., 2022, "Train Short, Test Long").


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head slopes ``[N]``: the geometric sequence ``2^(-8/n), 2^(-16/n), ...`` of ALiBi.

    For ``n`` not a power of two, the paper takes the slopes of the closest smaller power of
    two ``m`` and adds every other slope of ``2m`` (those not already used) until ``n``.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    m = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(m)
    if m < num_heads:
        slopes += power_of_two(2 * m)[0::2][: num_heads - m]
    return np.asarray(slopes, dtype=np.float32)


def alibi_bias(q_positions: jnp.ndarray, k_positions: jnp.ndarray, num_heads: int) -> jnp.ndarray:
    """ALiBi logits bias ``-slope_n * |i - j|`` as ``[B or 1, N, T, S]`` float32.

    Args:
      q_positions: ``[B, T]`` or ``[T]`` query positions.
      k_positions: ``[B, S]`` or ``[S]`` key positions.
      num_heads: N.

    With a causal mask this is the paper's ``slope * (j - i)``; the absolute distance also
    makes it usable by bidirectional encoders (the symmetric variant).
    """
    q = _batched(q_positions).astype(jnp.float32)
    k = _batched(k_positions).astype(jnp.float32)
    distance = jnp.abs(q[:, None, :, None] - k[:, None, None, :])
    slopes = jnp.asarray(alibi_slopes(num_heads))[None, :, None, None]
    return -slopes * distance


# ---------------------------------------------------------------------------------------------
# T5 relative position bias (Raffel et al., 2020).


def relative_position_bucket(
    relative_position: jnp.ndarray,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jnp.ndarray:
    """Map ``key_position - query_position`` to a bucket id in ``[0, num_buckets)``.

    As in T5 (mesh-tensorflow ``_relative_position_bucket``): with ``bidirectional`` half the
    buckets are for keys after the query; otherwise keys after the query all share bucket 0.
    Of the remaining buckets, half hold exact distances ``0 .. max_exact-1`` and the other half
    distances growing logarithmically up to ``max_distance``; farther keys share the last one.
    """
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(rel)
    else:
        distance = jnp.maximum(-rel, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(., 1) only keeps log() finite for the small distances that `where` discards anyway.
    ratio = jnp.maximum(distance, 1).astype(jnp.float32) / max_exact
    large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(
        jnp.int32
    )
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned per-head scalar bias for each relative-position bucket.

    The table is ``[num_buckets, N]`` (logical axes ``(POSITIONS, HEADS)``). T5 computes one
    per stack (bidirectional in the encoder, causal in the decoder) and shares it across layers.
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Any = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
        """``[B, T]`` (or ``[T]``) and ``[B, S]`` (or ``[S]``) positions -> ``[B or 1, N, T, S]``."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(self.embedding_init, (ax.POSITIONS, ax.HEADS)),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        q, k = _batched(q_positions), _batched(k_positions)
        relative = k[:, None, :] - q[:, :, None]  # [B, T, S]: key minus query, as in T5
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        values = jnp.take(table, buckets, axis=0)  # [B, T, S, N]
        return jnp.transpose(values, (0, 3, 1, 2)).astype(self.dtype)
