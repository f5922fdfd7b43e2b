"""Model assemblies, built by name from a validated ModelConfig."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from jaxlm.config_lib import ModelConfig
from jaxlm.models.decoder_only import DecoderOnly

MODELS: dict[str, type[nn.Module]] = {"decoder_only": DecoderOnly}


def build(cfg: ModelConfig, vocab_size: int | None = None) -> nn.Module:
    """Instantiate ``MODELS[cfg.kind]``; ``vocab_size`` fills ``cfg.vocab_size == 0``."""
    if cfg.kind not in MODELS:
        raise ValueError(f"unknown model kind {cfg.kind!r}; valid: {', '.join(MODELS)}")
    if cfg.vocab_size == 0:
        if vocab_size is None:
            raise ValueError("config.model.vocab_size is 0 and no tokenizer vocab size was given")
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    return MODELS[cfg.kind](cfg)


def resolve(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """``cfg`` with ``vocab_size`` filled in from the tokenizer when it is 0."""
    return cfg if cfg.vocab_size else dataclasses.replace(cfg, vocab_size=vocab_size)
