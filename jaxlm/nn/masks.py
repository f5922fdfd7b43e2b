"""Boolean attention masks. True means "may attend".

Shapes: query positions ``[B, T]``, key positions ``[B, S]``; masks are ``[B, 1, T, S]`` so
they broadcast over heads.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct


def causal_mask(q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
    """Query at position p may attend keys at positions <= p."""
    return k_positions[:, None, None, :] <= q_positions[:, None, :, None]


def segment_mask(q_segments: jnp.ndarray, k_segments: jnp.ndarray) -> jnp.ndarray:
    """Attention only within the same packed segment; segment id 0 (padding) sees nothing."""
    same = q_segments[:, None, :, None] == k_segments[:, None, None, :]
    return same & (q_segments[:, None, :, None] > 0)


def padding_mask(q_valid: jnp.ndarray, k_valid: jnp.ndarray) -> jnp.ndarray:
    """Attention only between valid (non-pad) tokens; ``*_valid`` are boolean ``[B, T]``."""
    return q_valid[:, None, :, None] & k_valid[:, None, None, :]


def combine(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
    """Logical AND of the masks that are not None (None if all are)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else (out & m)
    return out


@struct.dataclass
class TokenMask:
    """A padding / packing mask described by per-token vectors instead of a ``[B, 1, T, S]`` array.

    Query t may attend key s iff (both segment vectors given) ``q_segments[t] == k_segments[s]``
    and ``q_segments[t] > 0``, and (``k_valid`` given) ``k_valid[s]``. Memory-linear attention
    evaluates it per tile (:meth:`tile`); other implementations call :meth:`dense`. Causal and
    sliding-window restrictions are not part of it: they are arguments of the attention functions.

    Attributes:
      q_segments: ``[B|1, T]`` int query segment ids (0 = padding), or None.
      k_segments: ``[B|1, S]`` int key segment ids, or None (given together with ``q_segments``).
      k_valid: ``[B|1, S]`` bool, False for padding keys, or None.
    """

    q_segments: jnp.ndarray | None = None
    k_segments: jnp.ndarray | None = None
    k_valid: jnp.ndarray | None = None

    def tile(
        self, q_segments: jnp.ndarray | None, k_segments: jnp.ndarray | None, k_valid: jnp.ndarray | None
    ) -> jnp.ndarray | None:
        """``[B|1, 1, t, s]`` boolean mask from (slices of) the vectors; None = everything allowed."""
        out = None
        if q_segments is not None:
            out = segment_mask(q_segments, k_segments)
        if k_valid is not None:
            out = combine(out, k_valid[:, None, None, :])
        return out

    def dense(self) -> jnp.ndarray | None:
        """The whole mask: ``[B, 1, T, S]`` with segments, ``[B, 1, 1, S]`` with key padding only."""
        return self.tile(self.q_segments, self.k_segments, self.k_valid)


def window_mask(t: int, s: int, window: int | jnp.ndarray, *, causal: bool, q_offset: int | jnp.ndarray = 0):
    """``[1, 1, T, S]`` sliding-window mask by index: ``q - window < k`` (and ``k < q + window`` unless causal).

    ``window`` may be traced; a window of 0 allows everything. ``q_offset`` shifts the query
    indices (a query chunk that starts later than the keys).
    """
    q = jnp.arange(t)[:, None] + q_offset
    k = jnp.arange(s)[None, :]
    inside = k > q - window
    if not causal:
        inside = inside & (k < q + window)
    return (inside | (jnp.asarray(window) <= 0))[None, None]
