"""Quantities derived from a ModelConfig: dtypes, parameter counts and FLOPs per token."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxlm.config_lib import ModelConfig

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str) -> Any:
    """The jnp dtype for a config dtype name."""
    return DTYPES[name]


def kv_heads(cfg: ModelConfig) -> int:
    """Number of key/value heads (``num_kv_heads``, or ``num_heads`` when it is 0)."""
    return cfg.num_kv_heads or cfg.num_heads


def matmul_params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one block's matmuls (attention q/k/v/o and the MLP), biases excluded."""
    d, f, h = cfg.embed_dim, cfg.mlp_dim, cfg.head_dim
    attn = d * cfg.num_heads * h * 2 + d * kv_heads(cfg) * h * 2
    return attn + 2 * d * f


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the formula behind MFU.

    ``6 * N`` for the matmul weights N (the blocks plus the output projection; the input
    embedding is a gather and costs nothing), plus attention scores and their weighted sum:
    each layer computes ``QK^T`` and ``AV``, 2 * 2 * T * D FLOPs per token forward, times 3
    for the backward pass, i.e. ``12 * L * T * D`` (Kaplan et al. 2020; PaLM appendix B).
    Causal masking is not discounted, matching how MFU is usually reported.
    """
    n = cfg.num_layers * matmul_params_per_layer(cfg) + cfg.embed_dim * cfg.vocab_size
    attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return float(6 * n + attention)
