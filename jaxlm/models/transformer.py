"""The Transformer block and a stack of them (unrolled or ``nn.scan``-ned, optionally remat).

Shapes: B batch, T length, S key length, D model dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models import config as model_config
from jaxlm.nn.attention import MultiHeadAttention
from jaxlm.nn.linears import Mlp, residual_init_std
from jaxlm.nn.normalization import NORMS

ACT = (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_EMBED)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block: ``x + Attn(Norm(x))`` then ``x + Mlp(Norm(x))``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None,
        bias: jnp.ndarray | None,
        deterministic: bool,
        decode: bool,
    ) -> jnp.ndarray:
        cfg = self.cfg
        dt, pdt = model_config.dtype(cfg.dtype), model_config.dtype(cfg.param_dtype)
        norm = NORMS[cfg.norm]
        out_std = residual_init_std(cfg.num_layers)
        x = nn.with_logical_constraint(x, ACT)
        h = norm(dtype=dt, param_dtype=pdt, name="attn_norm")(x)
        h = MultiHeadAttention(
            num_heads=cfg.num_heads,
            num_kv_heads=model_config.kv_heads(cfg),
            head_dim=cfg.head_dim,
            dropout_rate=cfg.dropout_rate,
            implementation=cfg.attention,
            out_init_std=out_std,
            dtype=dt,
            param_dtype=pdt,
            name="attn",
        )(h, mask=mask, bias=bias, deterministic=deterministic, decode=decode)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = norm(dtype=dt, param_dtype=pdt, name="mlp_norm")(x)
        h = Mlp(
            cfg.mlp_dim, cfg.activation, cfg.dropout_rate, out_init_std=out_std, dtype=dt, param_dtype=pdt, name="mlp"
        )(h, deterministic=deterministic)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ACT)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class _ScanBody(nn.Module):
    """Adapts a block to ``nn.scan``'s (carry, x) -> (carry, y) signature."""

    cfg: ModelConfig
    block: type[nn.Module]

    @nn.compact
    def __call__(self, x: jnp.ndarray, _: Any, mask: Any, bias: Any, deterministic: bool, decode: bool) -> Any:
        return self.block(self.cfg, name="block")(x, mask, bias, deterministic, decode), None


class BlockStack(nn.Module):
    """``num_layers`` blocks, either unrolled (``layer_0`` ...) or scanned (``layers``)."""

    cfg: ModelConfig
    block: type[nn.Module] = DecoderBlock

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        *,
        mask: jnp.ndarray | None,
        bias: jnp.ndarray | None = None,
        deterministic: bool,
        decode: bool = False,
    ) -> jnp.ndarray:
        cfg = self.cfg
        policy = REMAT_POLICIES[cfg.remat]
        if cfg.scan_layers:
            body = _ScanBody
            if cfg.remat != "none":
                body = nn.remat(body, policy=policy, prevent_cse=False, static_argnums=(5, 6))
            scanned = nn.scan(
                body,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: ax.LAYERS},
            )
            x, _ = scanned(cfg, self.block, name="layers")(x, None, mask, bias, deterministic, decode)
            return x
        block = self.block
        if cfg.remat != "none":
            block = nn.remat(block, policy=policy, prevent_cse=True, static_argnums=(4, 5))
        for i in range(cfg.num_layers):
            x = block(cfg, name=f"layer_{i}")(x, mask, bias, deterministic, decode)
        return x
