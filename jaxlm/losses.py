"""Losses. Shapes: B batch, T length, V vocab."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Per-token negative log-likelihood ``[B, T]`` of integer targets, in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def weighted_cross_entropy(
    logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sum of weighted per-token losses and the sum of weights (divide for the mean).

    Returning the two sums, not the mean, lets gradient accumulation and multi-device
    reductions weight every token equally however the batch is split.
    """
    nll = cross_entropy(logits, targets)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)
