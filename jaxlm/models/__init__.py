"""Model assemblies, built by name from a validated ModelConfig.

``MODELS`` maps ``config.model.kind`` to the module class; every class takes the ModelConfig
as its only attribute. Call signatures (all keyword arguments after the first are optional):

* ``decoder_only``: ``DecoderOnly(cfg)(tokens, *, positions, segment_ids, deterministic, decode) -> [B, T, V]``
* ``encoder_only``: ``EncoderOnly(cfg)(tokens, *, token_types, positions, segment_ids, deterministic)
  -> {mlm_logits, nsp_logits, pooled, hidden}``
* ``encoder_decoder``: ``EncoderDecoder(cfg)(inputs, targets_in, *, inputs_positions, targets_positions,
  inputs_segment_ids, targets_segment_ids, deterministic, decode) -> [B, T, V]``, plus ``encode`` and
  ``decode`` methods for generation
* ``rnn``: ``RnnLM(cfg)(tokens, *, deterministic, decode, positions, segment_ids) -> [B, T, V]``

``build(cfg, head=HeadConfig(...))`` gives a decoder-only or encoder-only model a task head
(:mod:`jaxlm.models.heads`) instead of its language-model heads; its call then returns the
head's dict (``logits``, or ``start_logits`` / ``end_logits``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from jaxlm.common_types import ConfigError
from jaxlm.config_lib import ModelConfig
from jaxlm.models.decoder_only import DecoderOnly
from jaxlm.models.encoder_decoder import EncoderDecoder
from jaxlm.models.encoder_only import EncoderOnly
from jaxlm.models.heads import HeadConfig
from jaxlm.models.rnn import RnnLM

MODELS: dict[str, type[nn.Module]] = {
    "decoder_only": DecoderOnly,
    "encoder_only": EncoderOnly,
    "encoder_decoder": EncoderDecoder,
    "rnn": RnnLM,
}


# The kinds a task head (jaxlm.models.heads) attaches to.
HEAD_KINDS = ("decoder_only", "encoder_only")


def build(cfg: ModelConfig, vocab_size: int | None = None, *, head: HeadConfig | None = None) -> nn.Module:
    """Instantiate ``MODELS[cfg.kind]``; ``vocab_size`` fills ``cfg.vocab_size == 0``.

    ``head`` replaces the language-model heads by a task head (decoder_only, encoder_only).
    """
    if cfg.kind not in MODELS:
        raise ConfigError(f"config.model.kind={cfg.kind!r} is not one of: {', '.join(MODELS)}")
    if head is not None and cfg.kind not in HEAD_KINDS:
        raise ConfigError(
            f"config.task.head={head.kind!r} attaches to {' or '.join(HEAD_KINDS)} models, not "
            f"config.model.kind={cfg.kind!r}"
        )
    if cfg.vocab_size == 0:
        if vocab_size is None:
            raise ConfigError("config.model.vocab_size is 0 and no tokenizer vocab size was given; set it")
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    if head is not None:
        return MODELS[cfg.kind](cfg, head=head)
    return MODELS[cfg.kind](cfg)


def resolve(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """``cfg`` with ``vocab_size`` filled in from the tokenizer when it is 0."""
    return cfg if cfg.vocab_size else dataclasses.replace(cfg, vocab_size=vocab_size)
