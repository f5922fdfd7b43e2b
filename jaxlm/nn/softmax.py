"""Masked softmax with a one-pass backward, for the reference (``xla``) attention.

``masked_softmax(logits, mask)`` is ``softmax(where(mask, logits, NEG))`` with rows that may
attend to nothing set to zeros. Its gradient is written by hand, ``dx = p * (g - sum(g * p))``
from the saved probabilities ``p`` alone: autodiff of the same expression differentiates the
normalising division and both selects, which on XLA:CPU costs several extra passes over the
``[B, N, T, S]`` array per layer. Masked entries have ``p == 0`` exactly (``exp(NEG - max)``
underflows), so their gradient is zero without a select.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.nn.blockwise import NEG


@jax.custom_vjp
def masked_softmax(logits: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """Softmax over the last axis where ``mask`` (broadcastable, boolean) allows; float32 in and out."""
    return _forward(logits, mask)


def _forward(logits: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    p = jax.nn.softmax(jnp.where(mask, logits, NEG), axis=-1)
    # A row that may attend to nothing softmaxes to uniform weights; make it zeros instead.
    return p * jnp.any(mask, axis=-1, keepdims=True)


def _fwd(logits: jnp.ndarray, mask: jnp.ndarray | None):
    p = _forward(logits, mask)
    return p, (p, mask)


def _bwd(residuals, g: jnp.ndarray):
    p, mask = residuals
    dlogits = p * (g - jnp.sum(g * p, axis=-1, keepdims=True))
    # The mask is boolean: its cotangent is float0 zeros.
    dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return dlogits, dmask


masked_softmax.defvjp(_fwd, _bwd)
