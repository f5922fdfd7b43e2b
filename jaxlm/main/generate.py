"""``jaxlm generate``: sample continuations of a prompt from a workdir's latest checkpoint."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import decoding
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


def init_cache(model: Any, batch: int, length: int) -> Any:
    """An empty key/value cache for ``batch`` sequences of up to ``length`` tokens."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32), decode=True)["cache"]
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def run(config: Config, workdir: str, prompt: str) -> list[str]:
    """Return ``config.decode.num_samples`` texts: the prompt followed by its continuation."""
    exp, params, tokenizer, _ = restore.open_trained(config, workdir)
    d = config.decode
    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]) if not prompt else tokenizer.encode(prompt)
    max_len = exp.model_cfg.max_len
    if len(ids) + d.max_new_tokens > max_len:
        raise UserError(
            f"--prompt ({len(ids)} tokens) + --max_new_tokens={d.max_new_tokens} exceeds the model's "
            f"max_len={max_len}; shorten the prompt or lower --max_new_tokens"
        )
    if d.beam_size > 1:
        raise UserError("config.decode.beam_size > 1: beam search is not available yet; use beam_size=1")
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
