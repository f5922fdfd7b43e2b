"""Quantities derived from a ModelConfig: dtypes, matmul parameter counts and FLOPs per token.

Shapes: L layers, T sequence length, D model (embedding) dim, F mlp dim, N heads, K key/value
heads, H head dim, V vocab, G recurrent gates. V is the real vocabulary (``vocab_size``): the
columns a padded LM head computes past it (:mod:`jaxlm.models.vocab`) are not model FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxlm.config_lib import ModelConfig

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
GATED_ACTIVATIONS = ("swiglu", "geglu")  # two input projections (see jaxlm.nn.linears.GATED)
RNN_GATES: dict[str, int] = {"lstm": 4, "gru": 3}


def dtype(name: str) -> Any:
    """The jnp dtype for a config dtype name."""
    return DTYPES[name]


def kv_heads(cfg: ModelConfig) -> int:
    """Number of key/value heads (``num_kv_heads``, or ``num_heads`` when it is 0)."""
    return cfg.num_kv_heads or cfg.num_heads


def attention_params(cfg: ModelConfig) -> int:
    """Matmul weights of one attention sublayer: q and out ``D*N*H`` each, k and v ``D*K*H`` each."""
    d, h = cfg.embed_dim, cfg.head_dim
    return 2 * d * cfg.num_heads * h + 2 * d * kv_heads(cfg) * h


def mlp_params(cfg: ModelConfig) -> int:
    """Matmul weights of one MLP: ``2*D*F``, or ``3*D*F`` for gated activations (swiglu, geglu)."""
    return (3 if cfg.activation in GATED_ACTIVATIONS else 2) * cfg.embed_dim * cfg.mlp_dim


def matmul_params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one self-attention block's matmuls (attention and MLP), biases excluded."""
    return attention_params(cfg) + mlp_params(cfg)


def decoder_layers(cfg: ModelConfig) -> int:
    """Depth of an encoder-decoder's decoder (``num_decoder_layers``, 0 = ``num_layers``)."""
    return cfg.num_decoder_layers or cfg.num_layers


def _decoder_only(cfg: ModelConfig) -> tuple[int, int]:
    n = cfg.num_layers * matmul_params_per_layer(cfg) + cfg.embed_dim * cfg.vocab_size
    return n, cfg.num_layers


def _encoder_only(cfg: ModelConfig) -> tuple[int, int]:
    d = cfg.embed_dim
    n = cfg.num_layers * matmul_params_per_layer(cfg) + d * d + d * cfg.vocab_size
    return n, cfg.num_layers


def _encoder_decoder(cfg: ModelConfig) -> tuple[int, int]:
    l_dec = decoder_layers(cfg)
    n = (
        cfg.num_layers * matmul_params_per_layer(cfg)
        + l_dec * (2 * attention_params(cfg) + mlp_params(cfg))
        + cfg.embed_dim * cfg.vocab_size
    )
    return n, cfg.num_layers + 2 * l_dec


def _rnn(cfg: ModelConfig) -> tuple[int, int]:
    g, d, h = RNN_GATES[cfg.rnn_cell], cfg.embed_dim, cfg.mlp_dim
    n = g * h * (d + h) + (cfg.num_layers - 1) * g * h * (h + h) + h * cfg.vocab_size
    return n, 0


# config.model.kind -> (matmul weights N, attention layers A) for 6 * N + 12 * A * T * D.
_COUNTS: dict[str, Callable[[ModelConfig], tuple[int, int]]] = {
    "decoder_only": _decoder_only,
    "encoder_only": _encoder_only,
    "encoder_decoder": _encoder_decoder,
    "rnn": _rnn,
}


def matmul_params(cfg: ModelConfig) -> int:
    """N: the matmul weights one token passes through (see :func:`flops_per_token`)."""
    return _counts(cfg)[0]


def _counts(cfg: ModelConfig) -> tuple[int, int]:
    if cfg.kind not in _COUNTS:
        raise ValueError(f"unknown model kind {cfg.kind!r}; valid: {', '.join(_COUNTS)}")
    return _COUNTS[cfg.kind](cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the formula behind MFU.

    ``6 * N + 12 * A * T * N*H`` (Kaplan et al. 2020; PaLM appendix B), with ``N*H = D``: ``6 * N``
    for the matmul weights N every token passes through (2 FLOPs per weight forward, 4
    backward; input embeddings are gathers and cost nothing; biases, norms, activations and
    softmax are left out), plus, for each of A attention sublayers, ``QK^T`` and ``AV``:
    2 * 2 * T * D FLOPs per token forward, times 3 with the backward pass. Causal masking is not
    discounted, matching how MFU is usually reported. Per kind (G = 4 for LSTM, 3 for GRU;
    an MLP is ``2*D*F``, or ``3*D*F`` when gated; attention ``2*D*N*H + 2*D*K*H``):

    * ``decoder_only``: N = L * (attention + MLP) + D*V (the LM head, tied or not); A = L.
    * ``encoder_only``: N = L * (attention + MLP) + D*D (MLM transform) + D*V (MLM decoder);
      A = L. The pooler and NSP classifier run once per sequence and are left out.
    * ``encoder_decoder``: per target token, with inputs of the same length T (one input token
      per target token): N = L_enc * (attention + MLP) + L_dec * (2 * attention + MLP) + D*V;
      A = L_enc + 2 * L_dec (decoder self- and cross-attention), L_dec = ``num_decoder_layers``
      or ``num_layers``.
    * ``rnn``: N = G*H*(D + H) (layer 0) + (L - 1) * G*H*2H + H*V (output); A = 0, so
      ``6 * N``; ``seq_len`` does not matter.
    """
    n, attention_layers = _counts(cfg)
    attention = 12 * attention_layers * seq_len * cfg.num_heads * cfg.head_dim
    return float(6 * n + attention)


def flops_per_example(cfg: ModelConfig, seq_len: int, targets_len: int = 0) -> float:
    """Training FLOPs of one example (forward + backward): what MFU divides by for an encoder-decoder.

    Other kinds: ``seq_len * flops_per_token``. An encoder-decoder reads ``seq_len`` input
    tokens and ``targets_len`` target tokens, which differ (span corruption: 114 targets for
    512 inputs), so per-token figures overstate it. Counted exactly as :func:`flops_per_token`
    does (6 per matmul weight per token, 12 * T * D per token and attention sublayer):

    * encoder, per input token: ``6 * L_enc * (attention + MLP) + 12 * L_enc * T * D``;
    * decoder, per target token: ``6 * (L_dec * (2 * attention + MLP) + D*V)``
      ``+ 12 * L_dec * (U + T) * D`` (self-attention over U targets, cross-attention over T inputs).
    """
    if cfg.kind != "encoder_decoder":
        return seq_len * flops_per_token(cfg, seq_len)
    u = targets_len or seq_len
    l_dec, d = decoder_layers(cfg), cfg.num_heads * cfg.head_dim
    encoder = 6 * cfg.num_layers * matmul_params_per_layer(cfg) + 12 * cfg.num_layers * seq_len * d
    decoder = 6 * (l_dec * (2 * attention_params(cfg) + mlp_params(cfg)) + cfg.embed_dim * cfg.vocab_size)
    decoder += 12 * l_dec * (u + seq_len) * d
    return float(seq_len * encoder + u * decoder)
