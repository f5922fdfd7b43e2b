"""Autoregressive decoding: temperature / top-k / top-p sampling with a KV cache.

Shapes: B batch, P prompt length, N new tokens, V vocab. The model enters as functions, so
this module works for any decoder: ``step_fn(cache, tokens[B, T], positions[B, T]) ->
(logits[B, T, V], cache)`` extends a key/value cache by T tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, Any]]
ForwardFn = Callable[[jnp.ndarray], jnp.ndarray]


def filter_logits(logits: jnp.ndarray, *, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
    """Set logits outside the top-k / top-p (nucleus) set to -inf. ``[B, V] -> [B, V]``."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token is kept if the mass
        # before it is still below top_p (so the most likely token is always kept).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample(
    logits: jnp.ndarray, rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jnp.ndarray:
    """Draw one token per row from ``[B, V]`` logits; ``temperature == 0`` is greedy."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
    step_fn: StepFn,
    cache: Any,
    prompt: jnp.ndarray,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jnp.ndarray:
    """Pre-fill the cache with ``prompt [B, P]`` in one call, then sample ``max_new_tokens``.

    Returns ``[B, N]`` new tokens; after a row emits ``eos_id`` it emits ``pad_id``.
    """
    b, p = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = step_fn(cache, prompt, positions)
    rng, first_rng = jax.random.split(rng)
    token = sample(logits[:, -1], first_rng, temperature=temperature, top_k=top_k, top_p=top_p)
    done = jnp.zeros((b,), bool) if eos_id is None else token == eos_id

    def body(carry: tuple, i: jax.Array) -> tuple[tuple, jax.Array]:
        cache, token, done, rng = carry
        rng, step_rng = jax.random.split(rng)
        pos = jnp.full((b, 1), p + i, jnp.int32)
        logits, cache = step_fn(cache, token[:, None], pos)
        nxt = sample(logits[:, -1], step_rng, temperature=temperature, top_k=top_k, top_p=top_p)
        nxt = jnp.where(done, pad_id, nxt)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return (cache, nxt, done, rng), token

    if max_new_tokens == 1:
        return token[:, None]
    (_, last, _, _), tokens = jax.lax.scan(body, (cache, token, done, rng), jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate_uncached(forward_fn: ForwardFn, prompt: jnp.ndarray, *, max_new_tokens: int) -> jnp.ndarray:
    """Greedy decoding that recomputes the whole prefix every step; returns ``[B, N]``.

    The reference for tests and the baseline for benchmarks of cached decoding.
    """
    b, p = prompt.shape
    buffer = jnp.concatenate([prompt, jnp.zeros((b, max_new_tokens), prompt.dtype)], axis=1)

    def body(i: jax.Array, buffer: jnp.ndarray) -> jnp.ndarray:
        logits = forward_fn(buffer)  # causal: the zeros after position p + i do not matter
        token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), p + i, axis=1)

    buffer = jax.lax.fori_loop(0, max_new_tokens, body, buffer)
    return buffer[:, p:]


def sample_by_cdf(logits: jnp.ndarray, rng: jax.Array, *, temperature: float = 1.0) -> jnp.ndarray:
    """Draw one token per row of ``[B, V]`` logits by inverse-CDF sampling: one uniform per row.

    The same distribution as :func:`sample` without filtering, but with one random number per
    row instead of ``V`` Gumbel draws, which is what dominates sampling over a large vocabulary
    for many rows on a CPU (GAN rollouts).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(rng, logits.shape[:-1] + (1,)) * cdf[..., -1:]
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def rollout(
    step_fn: StepFn,
    cache: Any,
    tokens: jnp.ndarray,
    start: jnp.ndarray,
    rng: jax.Array,
    *,
    num_rollouts: int,
    temperature: float = 1.0,
) -> jnp.ndarray:
    """Monte-Carlo completions of every proper prefix of ``tokens [B, T]`` (SeqGAN's rollouts).

    Returns ``[T-1, R, B, T]`` (R = ``num_rollouts``): entry ``[t-1, r, b]`` keeps
    ``tokens[b, :t]`` and samples positions ``t..T-1`` from the model, for ``t = 1..T-1``.
    ``start [B]`` is the first input of each row (the start id). All ``(T-1)*R*B`` rows run in
    one scan over the ``T`` positions through the model's cache, which must be sized for that
    many rows; a row is teacher-forced while ``position < t`` and sampled after, so each model
    call is one batched step (about twice the minimal work, for one compiled loop of fixed shape).
    """
    b, t = tokens.shape
    copies = (t - 1) * num_rollouts
    rows = copies * b
    given = jnp.repeat(jnp.arange(1, t, dtype=jnp.int32), num_rollouts * b)  # row order (t, r, b)
    forced = jnp.tile(tokens.astype(jnp.int32), (copies, 1))
    first = jnp.tile(start.astype(jnp.int32), copies)

    def body(carry: tuple, i: jax.Array) -> tuple[tuple, jax.Array]:
        cache, previous, rng = carry
        rng, step_rng = jax.random.split(rng)
        logits, cache = step_fn(cache, previous[:, None], jnp.full((rows, 1), i, jnp.int32))
        sampled = sample_by_cdf(logits[:, -1], step_rng, temperature=temperature)
        token = jnp.where(i < given, jax.lax.dynamic_index_in_dim(forced, i, axis=1, keepdims=False), sampled)
        return (cache, token, rng), token

    _, out = jax.lax.scan(body, (cache, first, rng), jnp.arange(t, dtype=jnp.int32))
    return out.T.reshape(t - 1, num_rollouts, b, t)
