"""``jaxlm generate``: continue a prompt from a workdir's latest checkpoint.

Sampling (``config.decode.temperature``, ``top_k``, ``top_p``; 0 is greedy) draws
``num_samples`` continuations; ``config.decode.beam_size > 1`` runs beam search instead
(:mod:`jaxlm.beam_search`, with ``length_penalty`` and ``early_stopping``) and prints the best
``num_samples`` beams. The model adapters here (:func:`make_step_fn`,
:func:`make_seq2seq_step_fn`, :func:`init_cache`, :func:`cache_fn`) serve any program that decodes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import beam_search, decoding
from jaxlm.common_types import UserError
from jaxlm.config_lib import Config
from jaxlm.main import restore


def make_step_fn(model: Any, params: Any) -> decoding.StepFn:
    """A decoding step over the model's key/value cache."""

    def step_fn(cache: Any, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, Any]:
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, tokens, positions=positions, decode=True, mutable=["cache"]
        )
        return logits, mutated["cache"]

    return step_fn


def make_seq2seq_step_fn(model: Any, params: Any, encoded: jax.Array, inputs: jax.Array) -> decoding.StepFn:
    """A decoder step of an encoder-decoder model over its cache; the encoder ran once."""

    def step_fn(cache: Any, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, Any]:
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            encoded,
            inputs,
            tokens,
            targets_positions=positions,
            decode=True,
            method="decode",
            mutable=["cache"],
        )
        return logits, mutated["cache"]

    return step_fn


def init_cache(model: Any, batch: int, length: int, inputs: jax.Array | None = None) -> Any:
    """An empty key/value cache for ``batch`` sequences of up to ``length`` tokens.

    For an encoder-decoder, ``inputs`` are the encoder's tokens and the cache is the decoder's.
    """
    targets = jnp.zeros((batch, length), jnp.int32)
    args = (targets,) if inputs is None else (inputs, targets)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_fn(model: Any, length: int, input_length: int | None = None) -> beam_search.InitCacheFn:
    """``rows -> empty cache`` for :func:`jaxlm.beam_search.beam_search`.

    For an encoder-decoder give ``input_length``, the encoder's token count (it sizes nothing
    in the decoder's cache but the model's init call needs inputs).
    """

    def make(rows: int) -> Any:
        inputs = None if input_length is None else jnp.zeros((rows, input_length), jnp.int32)
        return init_cache(model, rows, length, inputs)

    return make


def run(config: Config, workdir: str, prompt: str) -> list[str]:
    """Return ``config.decode.num_samples`` texts: the prompt followed by its continuation."""
    exp, params, tokenizer, _ = restore.open_trained(config, workdir)
    if exp.model_cfg.kind not in GENERATORS:
        raise UserError(
            f"jaxlm generate needs a generative model; config.model.kind={exp.model_cfg.kind!r} is not one of: "
            f"{', '.join(GENERATORS)}"
        )
    return GENERATORS[exp.model_cfg.kind](exp, params, tokenizer, config, prompt)


def _continue_prompt(exp: Any, params: Any, tokenizer: Any, config: Config, prompt: str) -> list[str]:
    """Decoder-only and recurrent models: continue the prompt."""
    d = config.decode
    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]) if not prompt else tokenizer.encode(prompt)
    max_len = exp.model_cfg.max_len
    if len(ids) + d.max_new_tokens > max_len:
        raise UserError(
            f"--prompt ({len(ids)} tokens) + --max_new_tokens={d.max_new_tokens} exceeds the model's "
            f"max_len={max_len}; shorten the prompt or lower --max_new_tokens"
        )
    if d.beam_size > 1:

        @jax.jit
        def search(params: Any, prompt_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
            return beam_search.beam_search(
                make_step_fn(exp.model, params),
                cache_fn(exp.model, max_len),
                prompt_ids,
                **_beam_settings(d, tokenizer),
            )

        tokens, _ = search(params, jnp.asarray(ids[None, :], jnp.int32))
        return [prompt + tokenizer.decode(row) for row in np.asarray(tokens)[0, : d.num_samples]]
    prompt_ids = jnp.asarray(np.tile(ids[None, :], (d.num_samples, 1)), jnp.int32)
    cache = init_cache(exp.model, d.num_samples, max_len)

    @jax.jit
    def sample(params: Any, cache: Any, prompt_ids: jax.Array, rng: jax.Array) -> jax.Array:
        return decoding.generate(
            make_step_fn(exp.model, params),
            cache,
            prompt_ids,
            rng,
            max_new_tokens=d.max_new_tokens,
            temperature=d.temperature,
            top_k=d.top_k,
            top_p=d.top_p,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )

    new = np.asarray(sample(params, cache, prompt_ids, jax.random.key(d.seed)))
    return [prompt + tokenizer.decode(row) for row in new]


def _seq2seq(exp: Any, params: Any, tokenizer: Any, config: Config, prompt: str) -> list[str]:
    """Encoder-decoder models: the prompt is the encoder input; the decoder starts from id 0."""
    d = config.decode
    ids = tokenizer.encode(prompt)
    if len(ids) == 0 or len(ids) > exp.model_cfg.max_len:
        raise UserError(f"--prompt must be 1..{exp.model_cfg.max_len} tokens for an encoder-decoder, got {len(ids)}")
    if 1 + d.max_new_tokens > exp.model_cfg.max_len:
        raise UserError(f"--max_new_tokens={d.max_new_tokens} exceeds the model's max_len={exp.model_cfg.max_len}")
    if d.beam_size > 1:
        k = d.beam_size

        @jax.jit
        def search(params: Any, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
            encoded = exp.model.apply({"params": params}, inputs, method="encode")
            # Row b * K + k of the beams reads prompt b: the encoder ran once per prompt.
            step = make_seq2seq_step_fn(
                exp.model, params, jnp.repeat(encoded, k, axis=0), jnp.repeat(inputs, k, axis=0)
            )
            start = jnp.zeros((inputs.shape[0], 1), jnp.int32)  # T5's decoder start id is the pad id 0
            return beam_search.beam_search(
                step, cache_fn(exp.model, exp.model_cfg.max_len, inputs.shape[1]), start, **_beam_settings(d, tokenizer)
            )

        tokens, _ = search(params, jnp.asarray(ids[None, :], jnp.int32))
        return [tokenizer.decode(row) for row in np.asarray(tokens)[0, : d.num_samples]]
    inputs = jnp.asarray(np.tile(ids[None, :], (d.num_samples, 1)), jnp.int32)
    start = jnp.zeros((d.num_samples, 1), jnp.int32)  # T5's decoder start id is the pad id 0
    cache = init_cache(exp.model, d.num_samples, exp.model_cfg.max_len, inputs)

    @jax.jit
    def sample(params: Any, cache: Any, inputs: jax.Array, rng: jax.Array) -> jax.Array:
        encoded = exp.model.apply({"params": params}, inputs, method="encode")
        return decoding.generate(
            make_seq2seq_step_fn(exp.model, params, encoded, inputs),
            cache,
            start,
            rng,
            max_new_tokens=d.max_new_tokens,
            temperature=d.temperature,
            top_k=d.top_k,
            top_p=d.top_p,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )

    new = np.asarray(sample(params, cache, inputs, jax.random.key(d.seed)))
    return [tokenizer.decode(row) for row in new]


def _beam_settings(d: Any, tokenizer: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`jaxlm.beam_search.beam_search` from ``config.decode``."""
    return dict(
        beam_size=d.beam_size,
        max_new_tokens=d.max_new_tokens,
        eos_id=tokenizer.eos_id,
        length_penalty=d.length_penalty,
        early_stopping=d.early_stopping,
        pad_id=tokenizer.pad_id,
    )


# Model kind -> how it generates.
GENERATORS = {
    "decoder_only": _continue_prompt,
    "rnn": _continue_prompt,
    "encoder_decoder": _seq2seq,
}
