"""Dropout whose keep-mask costs half the random bits: 16 per element instead of 32.

``jax.random.bernoulli`` draws one 32-bit word per element (then converts it to a float and
compares). Random bits are the dominant cost of dropout on CPU: threefry costs tens of integer ops per
word, and in a BERT-small train step with dropout 0.1 they were ~20% of the op time. Here each
32-bit word is split into two 16-bit draws and an element is kept when its draw is at least
``round(rate * 2**16)``, so the dropped fraction is that threshold over 2**16 (within 2**-17 of
``rate``) and kept values are scaled by the exact inverse keep probability, which keeps the
layer unbiased. Draws cover the last axis in pairs, so the mask of a sharded activation is drawn
where it lives (threefry is partitionable) and the leading axes are untouched.

Masks differ from ``flax.linen.Dropout``'s for the same key (fewer, repacked bits); everything in
jaxlm that drops (activations, attention probabilities, every attention implementation) uses
:func:`keep_mask`, so the same key gives the same mask everywhere.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_LEVELS = 1 << 16


def _threshold(rate: float) -> int:
    return min(int(round(rate * _LEVELS)), _LEVELS)


def keep_scale(rate: float) -> float:
    """The factor kept values are multiplied by: 1 / the exact keep probability of ``keep_mask``."""
    kept = _LEVELS - _threshold(rate)
    return _LEVELS / kept if kept else 0.0


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jnp.ndarray:
    """Boolean ``shape`` mask, True with probability ``1 - round(rate * 2**16) / 2**16``."""
    threshold = _threshold(rate)
    if threshold == 0:
        return jnp.ones(shape, bool)
    if threshold == _LEVELS:
        return jnp.zeros(shape, bool)
    *lead, last = shape if shape else (1,)
    words = jax.random.bits(rng, (*lead, (last + 1) // 2), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, 2 * ((last + 1) // 2))
    return (halves[..., :last] >= threshold).reshape(shape)


def dropout(x: jnp.ndarray, rate: float, rng: jax.Array) -> jnp.ndarray:
    """``x`` with elements zeroed by :func:`keep_mask` and the rest scaled by :func:`keep_scale`."""
    keep = keep_mask(rng, rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(keep_scale(rate), x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """``flax.linen.Dropout``'s interface (``Dropout(rate)(x, deterministic=...)``), 16-bit draws."""

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        """Identity when ``deterministic`` or ``rate == 0``; draws from the ``dropout`` stream otherwise."""
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng(self.rng_collection))
