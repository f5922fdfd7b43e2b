"""Boolean attention masks. True means "may attend".

Shapes: query positions ``[B, T]``, key positions ``[B, S]``; masks are ``[B, 1, T, S]`` so
they broadcast over heads.
"""

from __future__ import annotations

import jax.numpy as jnp


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
