"""Relative position encodings: RoPE, ALiBi and the T5 relative position bias.

Absolute encodings (learned, sinusoidal) are added to the token embeddings and live in
``jaxlm.nn.embeddings``; the encodings here act inside attention: RoPE rotates queries and keys,
ALiBi and T5 add a bias to the attention logits (the ``bias`` argument of the attention
functions, ``[B or 1, N, T, S]``).

Shapes: B batch, T query length, S key length, N heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import struct

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


# Context extension by rescaling RoPE (``config.model.rope_scaling``). Each method maps the
# base frequencies to new ones and may scale attention logits (YaRN's "attention factor", applied
# as HF does: cos and sin are multiplied by it, so q.k grows by its square).
ROPE_SCALINGS: tuple[str, ...] = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are rescaled for contexts longer than the training length.

    Attributes:
      method: one of ``ROPE_SCALINGS``:
        ``none``; ``linear`` position interpolation (Chen et al., 2023: frequencies / factor);
        ``ntk`` static NTK-aware base change (bloc97, 2023: base * factor^(H/(H-2)));
        ``dynamic`` NTK with the factor grown with the current length (HF's "dynamic");
        ``yarn`` (Peng et al., 2023: interpolate low frequencies, keep high ones, ramp between,
        and scale attention by ``attention_factor``); ``llama3`` (Llama 3.1's piecewise rule).
      factor: the context-extension factor (> 0; 1 changes nothing for linear / ntk / yarn / llama3).
      original_max_len: the training context length (yarn, llama3, dynamic).
      beta_fast, beta_slow: YaRN's rotation counts bounding the ramp (32 and 1 in the paper).
      attention_factor: YaRN's logit scale; 0 = the paper's ``0.1 ln(factor) + 1``.
      low_freq_factor, high_freq_factor: Llama 3's wavelength bounds (1 and 4 in Llama 3.1).
    """

    method: str = "none"
    factor: float = 1.0
    original_max_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    @property
    def is_static(self) -> bool:
        """Whether frequencies do not depend on the current length (all but ``dynamic``)."""
        return self.method != "dynamic"


def _exponents(head_dim: int) -> np.ndarray:
    return np.arange(0, head_dim, 2, dtype=np.float64) / head_dim


def _yarn(head_dim: int, base: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    """YaRN frequencies (as HF ``_compute_yarn_parameters`` with ``truncate=True``) and attention factor."""
    dim = head_dim
    pos_freqs = base ** _exponents(dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength makes `rotations` turns over the original context.
        return dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate
    freqs = interpolation * (1 - keep) + extrapolation * keep
    attention = s.attention_factor or (0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return freqs, attention


def _llama3(head_dim: int, base: float, s: RopeScaling) -> np.ndarray:
    """Llama 3.1 frequencies: long wavelengths / factor, short kept, smooth in between."""
    freqs = base ** -_exponents(head_dim)
    low_wavelen = s.original_max_len / s.low_freq_factor
    high_wavelen = s.original_max_len / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_frequencies(
    head_dim: int,
    max_wavelength: float = 10_000.0,
    scaling: RopeScaling | None = None,
    *,
    seq_len: jnp.ndarray | int | None = None,
) -> tuple[jnp.ndarray, float]:
    """``([H // 2] inverse frequencies, attention factor)`` of RoPE with ``scaling``.

    Args:
      head_dim: H (even).
      max_wavelength: the RoPE base.
      scaling: the context-extension method (None = none).
      seq_len: current sequence length, for ``dynamic`` only (may be traced); None = the original length.

    The static methods are computed in float64 and rounded once to float32.
    """
    s = scaling or RopeScaling()
    if s.method not in ROPE_SCALINGS:
        raise ValueError(f"unknown rope scaling {s.method!r}; valid: {', '.join(ROPE_SCALINGS)}")
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    attention = 1.0
    if s.method == "none":
        freqs = max_wavelength ** -_exponents(head_dim)
    elif s.method == "linear":
        freqs = max_wavelength ** -_exponents(head_dim) / s.factor
    elif s.method == "ntk":
        freqs = (max_wavelength * s.factor ** (head_dim / (head_dim - 2))) ** -_exponents(head_dim)
    elif s.method == "yarn":
        freqs, attention = _yarn(head_dim, max_wavelength, s)
    elif s.method == "llama3":
        freqs = _llama3(head_dim, max_wavelength, s)
    else:  # dynamic: the NTK base grows once the length passes the original one
        length = jnp.maximum(
            jnp.asarray(s.original_max_len if seq_len is None else seq_len, jnp.float32), s.original_max_len
        )
        grown = (s.factor * length / s.original_max_len - (s.factor - 1)) ** (head_dim / (head_dim - 2))
        base = max_wavelength * grown
        return base ** -jnp.asarray(_exponents(head_dim), jnp.float32), attention
    return jnp.asarray(freqs, dtype=jnp.float32), attention


def apply_rope(
    x: jnp.ndarray,
    positions: jnp.ndarray,
    *,
    max_wavelength: float = 10_000.0,
    scale: float = 1.0,
    inv_frequencies: jnp.ndarray | None = None,
    scaling: RopeScaling | None = None,
) -> jnp.ndarray:
    """Rotate channel pairs ``(i, i + H/2)`` of ``x`` by ``position * frequency_i``.

    Args:
      x: ``[B, T, N, H]`` queries or keys.
      positions: ``[B, T]`` or ``[T]`` integer (or float) positions.
      max_wavelength: the RoPE base (10 000 in RoFormer / Llama).
      scale: linear position interpolation (Chen et al., 2023): positions are divided by
        ``scale``, so ``scale=4`` stretches a model trained on length L to 4L.
      inv_frequencies: ``[H // 2]`` frequencies overriding ``max_wavelength`` and ``scaling``.
      scaling: a context-extension method (:class:`RopeScaling`: linear, NTK, dynamic NTK,
        YaRN, Llama 3); ``dynamic`` takes the current length as ``max(positions) + 1``.

    Returns:
      ``x`` rotated, same shape and dtype; computed in float32. Because every pair is rotated
      by an angle linear in the position, ``<rope(q, i), rope(k, j)>`` depends on ``i - j`` only.
    """
    h = x.shape[-1]
    pos = _batched(positions).astype(jnp.float32)
    attention = 1.0
    if inv_frequencies is not None:
        freqs = jnp.asarray(inv_frequencies)
    else:
        seq_len = None
        if scaling is not None and not scaling.is_static:
            seq_len = jnp.max(pos) + 1
        freqs, attention = rope_frequencies(h, max_wavelength, scaling, seq_len=seq_len)
    pos = pos / scale
    angles = pos[:, :, None, None] * freqs.astype(jnp.float32)  # [B, T, 1, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    x32 = x.astype(jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


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
    return _alibi(jnp.asarray(alibi_slopes(num_heads)), q_positions, k_positions)


def _alibi(slopes: jnp.ndarray, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
    q = _batched(q_positions).astype(jnp.float32)
    k = _batched(k_positions).astype(jnp.float32)
    distance = jnp.abs(q[:, None, :, None] - k[:, None, None, :])
    return -slopes[None, :, None, None] * distance


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
    tiled: bool = False

    @nn.compact
    def __call__(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray | PositionBias:
        """``[B, T]`` (or ``[T]``) and ``[B, S]`` (or ``[S]``) positions -> ``[B or 1, N, T, S]``.

        With ``tiled`` the bias is returned unevaluated, as a :class:`PositionBias` that
        memory-linear attention evaluates tile by tile (same table parameter, same values).
        """
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(self.embedding_init, (ax.POSITIONS, ax.HEADS)),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        spec = PositionBias(
            table,
            _batched(q_positions),
            _batched(k_positions),
            kind="relative",
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return spec if self.tiled else spec.dense().astype(self.dtype)


def _relative(
    table: jnp.ndarray, q: jnp.ndarray, k: jnp.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
):
    relative = k[:, None, :] - q[:, :, None]  # [B, T, S]: key minus query, as in T5
    buckets = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    values = jnp.take(table, buckets, axis=0)  # [B, T, S, N]
    return jnp.transpose(values, (0, 3, 1, 2)).astype(jnp.float32)


@struct.dataclass
class PositionBias:
    """An attention-logit bias defined by query and key positions, evaluated on demand.

    Memory-linear attention (``jaxlm.nn.blockwise``, ``jaxlm.nn.ring``) evaluates it per
    ``[block_q, block_kv]`` tile and never holds the ``[B, N, T, S]`` array; other
    implementations call :meth:`dense`. ``kind='alibi'``: ``table`` is the ``[N]`` slopes (a
    constant); ``kind='relative'``: ``table`` is T5's learned ``[num_buckets, N]`` table and the
    bias is differentiable with respect to it.

    Attributes:
      table: ``[N]`` ALiBi slopes or ``[num_buckets, N]`` T5 table.
      q_positions: ``[B|1, T]`` query positions.
      k_positions: ``[B|1, S]`` key positions.
    """

    table: jnp.ndarray
    q_positions: jnp.ndarray
    k_positions: jnp.ndarray
    kind: str = struct.field(pytree_node=False, default="alibi")
    bidirectional: bool = struct.field(pytree_node=False, default=True)
    num_buckets: int = struct.field(pytree_node=False, default=32)
    max_distance: int = struct.field(pytree_node=False, default=128)

    @property
    def differentiable(self) -> bool:
        """Whether the table is a parameter (T5) rather than a constant (ALiBi slopes)."""
        return self.kind == "relative"

    @property
    def num_heads(self) -> int:
        """N."""
        return self.table.shape[-1]

    def evaluate(self, table: jnp.ndarray, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
        """``[B|1, N, t, s]`` float32 bias for the given positions (a tile), as a function of ``table``."""
        if self.kind == "alibi":
            return _alibi(table, q_positions, k_positions)
        return _relative(table, q_positions, k_positions, self.bidirectional, self.num_buckets, self.max_distance)

    def dense(self) -> jnp.ndarray:
        """The whole ``[B|1, N, T, S]`` float32 bias."""
        return self.evaluate(self.table, self.q_positions, self.k_positions)

    def with_keys(self, k_positions: jnp.ndarray) -> PositionBias:
        """The same bias for other keys (a rolling KV cache's slots)."""
        return self.replace(k_positions=_batched(k_positions))


def alibi(q_positions: jnp.ndarray, k_positions: jnp.ndarray, num_heads: int) -> PositionBias:
    """ALiBi as a :class:`PositionBias` (``dense()`` equals :func:`alibi_bias`)."""
    slopes = jnp.asarray(alibi_slopes(num_heads))
    return PositionBias(slopes, _batched(q_positions), _batched(k_positions), kind="alibi")
