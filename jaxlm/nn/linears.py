"""Dense layers with logical axis names, and the Transformer MLP.

Shapes: B batch, T length, D model dim, F mlp dim. Matmuls feed ``dtype`` operands and
accumulate in float32 (``preferred_element_type``), which is what makes bf16 fast on CPUs with
AMX and on TPUs/GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import logical_axes as ax

Initializer = Callable[..., jnp.ndarray]


def default_kernel_init(std: float = 0.02) -> Initializer:
    """Normal(0, std) initializer, the GPT-2 / BERT convention."""
    return nn.initializers.normal(stddev=std)


class DenseGeneral(nn.Module):
    """A dense layer over the trailing ``len(in_axes_shape)`` input axes.

    Attributes:
      features: output feature shape, e.g. ``(N, H)`` for a query projection.
      kernel_axes: logical names of the kernel's axes (input axes then output axes).
      in_axes: how many trailing input axes are contracted.
    """

    features: Sequence[int]
    kernel_axes: Sequence[str]
    in_axes: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = tuple(self.features)
        in_shape = x.shape[-self.in_axes :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            in_shape + features,
            self.param_dtype,
        )
        contract_x = tuple(range(x.ndim - self.in_axes, x.ndim))
        contract_k = tuple(range(self.in_axes))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((contract_x, contract_k), ((), ())),
            preferred_element_type=jnp.float32,
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.kernel_axes[self.in_axes :])),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}


class Mlp(nn.Module):
    """Position-wise feed-forward block: D -> F -> activation -> dropout -> D."""

    mlp_dim: int
    activation: str = "gelu"
    dropout_rate: float = 0.0
    use_bias: bool = True
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        d = x.shape[-1]
        h = DenseGeneral(
            (self.mlp_dim,),
            (ax.EMBED, ax.MLP),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="wi",
        )(x)
        h = ACTIVATIONS[self.activation](h)
        h = nn.with_logical_constraint(h, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_MLP))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return DenseGeneral(
            (d,),
            (ax.MLP, ax.EMBED),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=default_kernel_init(self.out_init_std),
            name="wo",
        )(h)


def residual_init_std(num_layers: int, std: float = 0.02) -> float:
    """GPT-2's scaled init for layers that write into the residual stream."""
    return std / float(np.sqrt(2 * num_layers))
