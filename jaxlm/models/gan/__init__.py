"""Text-GAN models: generators and discriminators built by name from ``config.gan``.

``GENERATORS`` and ``DISCRIMINATORS`` map ``config.gan.generator`` / ``config.gan.discriminator``
to builders (kept apart from ``jaxlm.models.MODELS``, which maps ``config.model.kind``). A
built model is a small frozen bundle of the linen module and what the GAN steps need around it:

* :class:`Generator`: teacher-forced logits of token ids or relaxed one-hots, the decoding
  step adapter (``step_fn`` / ``init_cache`` for ``jaxlm.decoding``), the start id.
* :class:`Discriminator`: one logit per sequence; with ``spectral_norm`` every weight matrix
  is spectrally normalized (``jaxlm.nn.spectral_norm``) on the way into the module.

Shapes: B batch, T length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import decoding
from jaxlm.config_lib import GanConfig, ModelConfig
from jaxlm.models.gan.discriminators import CnnDiscriminator, LstmDiscriminator, TransformerDiscriminator
from jaxlm.models.gan.generators import LstmGenerator, TransformerGenerator
from jaxlm.nn import spectral_norm


@dataclasses.dataclass(frozen=True)
class Generator:
    """A generator module with its vocabulary, sequence length and start id."""

    module: nn.Module
    vocab_size: int
    seq_len: int
    start_id: int

    def init(self, rng: jax.Array) -> Any:
        """Boxed (logically partitioned) parameters."""
        return self.module.init({"params": rng}, jnp.zeros((1, self.seq_len), jnp.int32))["params"]

    def logits(self, params: Any, inputs: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced ``[B, T, V]`` logits of shifted inputs (ids or one-hots); ``rng`` enables dropout."""
        rngs = {"dropout": rng} if rng is not None else {}
        return self.module.apply({"params": params}, inputs, deterministic=rng is None, rngs=rngs)

    def inputs(self, tokens: jax.Array) -> jax.Array:
        """The inputs that predict ``tokens [B, T]``: the start id, then ``tokens[:, :-1]``."""
        start = jnp.full((tokens.shape[0], 1), self.start_id, tokens.dtype)
        return jnp.concatenate([start, tokens[:, :-1]], axis=1)

    def step_fn(self, params: Any) -> decoding.StepFn:
        """``(cache, inputs [B, T] or [B, T, V], positions) -> (logits, cache)`` over the decoding cache."""

        def step(cache: Any, inputs: jax.Array, positions: jax.Array) -> tuple[jax.Array, Any]:
            logits, mutated = self.module.apply(
                {"params": params, "cache": cache}, inputs, positions=positions, decode=True, mutable=["cache"]
            )
            return logits, mutated["cache"]

        return step

    def init_cache(self, batch: int) -> Any:
        """An empty decoding cache for ``batch`` sequences of ``seq_len`` tokens."""
        tokens = jnp.zeros((batch, self.seq_len), jnp.int32)
        shapes = jax.eval_shape(lambda: self.module.init(jax.random.key(0), tokens, decode=True)["cache"])
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@dataclasses.dataclass(frozen=True)
class Discriminator:
    """A discriminator module, optionally spectrally normalized."""

    module: nn.Module
    seq_len: int
    spectral_norm: bool = False
    iterations: int = 1

    def init(self, rng: jax.Array) -> Any:
        """Boxed (logically partitioned) parameters."""
        return self.module.init({"params": rng}, jnp.zeros((1, self.seq_len), jnp.int32))["params"]

    def apply(self, params: Any, inputs: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """``[B]`` logits of ids ``[B, T]`` or one-hots ``[B, T, V]``; ``rng`` enables dropout."""
        if self.spectral_norm:
            params = spectral_norm.normalize_tree(params, self.iterations)
        rngs = {"dropout": rng} if rng is not None else {}
        return self.module.apply({"params": params}, inputs, deterministic=rng is None, rngs=rngs)


def _lstm_generator(g: GanConfig, m: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    return LstmGenerator(vocab_size, g.g_embed_dim, g.g_hidden_dim)


def _transformer_generator(g: GanConfig, m: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    return TransformerGenerator(dataclasses.replace(m, vocab_size=vocab_size, max_len=max(m.max_len, seq_len)))


def _cnn_discriminator(g: GanConfig, m: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    return CnnDiscriminator(vocab_size, g.d_embed_dim, tuple(g.d_filter_sizes), tuple(g.d_num_filters), g.d_dropout)


def _transformer_discriminator(g: GanConfig, m: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    cfg = dataclasses.replace(
        m,
        kind="encoder_only",
        num_layers=g.d_num_layers,
        num_heads=g.d_num_heads,
        num_kv_heads=0,
        embed_dim=g.d_embed_dim,
        mlp_dim=4 * g.d_embed_dim,
        max_len=seq_len,
        vocab_size=vocab_size,
        dropout_rate=g.d_dropout,
        position="learned",
        scan_layers=False,
        remat="none",
        fuse_qkv="off",
        grad_barrier="off",
    )
    return TransformerDiscriminator(cfg)


def _lstm_discriminator(g: GanConfig, m: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    return LstmDiscriminator(vocab_size, g.d_embed_dim, g.d_hidden_dim, g.d_dropout)


Builder = Callable[[GanConfig, ModelConfig, int, int], nn.Module]
GENERATORS: dict[str, Builder] = {"lstm": _lstm_generator, "transformer": _transformer_generator}
DISCRIMINATORS: dict[str, Builder] = {
    "cnn": _cnn_discriminator,
    "transformer": _transformer_discriminator,
    "lstm": _lstm_discriminator,
}


def build_generator(g: GanConfig, m: ModelConfig, vocab_size: int, seq_len: int, start_id: int) -> Generator:
    """The generator named by ``g.generator``."""
    if g.generator not in GENERATORS:
        raise ValueError(f"unknown generator {g.generator!r}; valid: {', '.join(GENERATORS)}")
    return Generator(GENERATORS[g.generator](g, m, vocab_size, seq_len), vocab_size, seq_len, start_id)


def build_discriminator(g: GanConfig, m: ModelConfig, vocab_size: int, seq_len: int) -> Discriminator:
    """The discriminator named by ``g.discriminator``, spectrally normalized if ``g.spectral_norm``."""
    if g.discriminator not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {g.discriminator!r}; valid: {', '.join(DISCRIMINATORS)}")
    module = DISCRIMINATORS[g.discriminator](g, m, vocab_size, seq_len)
    return Discriminator(module, seq_len, g.spectral_norm, g.spectral_norm_iterations)
