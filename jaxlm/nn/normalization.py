"""Normalization layers, chosen by ``config.model.norm`` through ``NORMS``.

Shapes: ``[..., D]``; statistics are computed in float32. Models pass ``config.model.norm_eps``
as ``epsilon`` (1e-5 GPT-2, 1e-12 BERT, 1e-6 T5); use :func:`make_norm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al., 2016) with learned scale and bias over the last axis."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (ax.NORM,)), (features,), self.param_dtype
        )
        y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, (ax.NORM,)), (features,), self.param_dtype
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): scale only, no mean subtraction."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = x.shape[-1]
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon))
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (ax.NORM,)), (features,), self.param_dtype
        )
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


NORMS: dict[str, type[nn.Module]] = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(
    kind: str, *, epsilon: float, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, **kw: Any
) -> nn.Module:
    """Instantiate ``NORMS[kind]`` with ``epsilon``; ``kw`` may carry the submodule ``name``."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")
    return NORMS[kind](epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, **kw)
