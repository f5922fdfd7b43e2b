"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): ``x + up(act(down(x)))``.

A small residual MLP inserted after a Transformer sublayer (``config.peft.method=adapter``):
``down [D, A]`` and ``up [A, D]`` with biases, ``A = config.peft.adapter_dim``. ``up`` starts at
zero, so a fresh adapter is the identity and training starts from the pretrained model. The
activation follows the ``adapters`` library's presets: SiLU ("swish") for Houlsby, ReLU for
Pfeiffer. Where the models place them (``config.peft.adapter_kind``): see
``jaxlm.models.transformer.TransformerBlock``.

Shapes: B batch, T length, D model dim, A adapter dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.nn.linears import DenseGeneral, activation

# config.peft.adapter_kind -> the adapter's activation (the ``adapters`` library's presets).
ADAPTER_ACTIVATIONS: dict[str, str] = {"houlsby": "silu", "pfeiffer": "relu"}
# config.peft.adapter_kind -> the sublayers (TransformerBlock names) followed by an adapter.
ADAPTER_SUBLAYERS: dict[str, tuple[str, ...]] = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
DOWN_INIT_STD = 0.02  # the down-projection's init (as the models' other dense layers)


class BottleneckAdapter(nn.Module):
    """``[B, T, D] -> [B, T, D]``: ``x + up(act(down(x)))``, the identity at initialization.

    Attributes:
      features: the bottleneck width A.
      kind: 'houlsby' | 'pfeiffer' (chooses the activation, see ``ADAPTER_ACTIVATIONS``).
    """

    features: int
    kind: str = "houlsby"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Add the adapter's bottleneck MLP of ``x`` to ``x``."""
        if self.kind not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; valid: {', '.join(ADAPTER_ACTIVATIONS)}")
        act: Callable[[jnp.ndarray], jnp.ndarray] = activation(ADAPTER_ACTIVATIONS[self.kind])
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = DenseGeneral(
            (self.features,),
            (ax.EMBED, None),
            kernel_init=nn.initializers.normal(stddev=DOWN_INIT_STD),
            name="down",
            **dense,
        )(x)
        h = DenseGeneral((x.shape[-1],), (None, ax.EMBED), kernel_init=nn.initializers.zeros, name="up", **dense)(
            act(h)
        )
        return x + h.astype(x.dtype)
