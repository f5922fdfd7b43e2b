"""Beam search over a key/value (or recurrent) cache, jit-compatible and batched.

The algorithm is the one of Hugging Face ``transformers`` (``GenerationMixin._beam_search``,
v5), step for step, so that the same model gives the same beams: at each step the ``2 K`` best
continuations of all ``K`` running beams are taken by accumulated log-probability; those that
end in ``eos_id`` (or reach ``max_new_tokens``) and rank among the first ``K`` compete for the
``K`` finished slots with the length-penalized score ``sum log p / len ** length_penalty``
(``len`` counts the generated tokens, EOS included, not the prompt); the best ``K`` of the rest
keep running. ``early_stopping`` is ``transformers``' flag: ``True`` stops a batch row as soon
as it has ``K`` finished beams; ``False`` stops it when the best running beam, scored at its
current length, cannot beat the worst finished one; ``'never'`` scores that bound at the
longest possible length when ``length_penalty > 0`` (exact search within the beam).

The model enters as two functions, so decoder-only, encoder-decoder and recurrent models all
work: ``step_fn(cache, tokens[R, T], positions[R, T]) -> (logits[R, T, V], cache)`` (as in
:mod:`jaxlm.decoding`) and ``init_cache(rows) -> cache``, an empty cache for ``R`` rows. Row
``b * K + k`` is beam ``k`` of prompt ``b``; an encoder-decoder's ``step_fn`` closes over its
encoder output repeated ``K`` times in that order (``jnp.repeat(encoded, K, axis=0)``). Which
axis of each cache leaf is the row axis is found by comparing ``init_cache(1)`` with
``init_cache(2)`` abstractly; leaves without one (a write index) are shared by all rows.

Shapes: B batch, K beams, P prompt length, N new tokens, V vocab, R = B * K rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.decoding import StepFn

InitCacheFn = Callable[[int], Any]
# transformers' "minus infinity" for beam scores: large but finite, so sums stay ordered.
_NEG = -1.0e9


def cache_batch_axes(init_cache: InitCacheFn) -> Any:
    """The row axis of every leaf of ``init_cache(rows)`` (None where a leaf has none).

    Computed abstractly (no arrays are allocated) from the shapes for 1 and 2 rows.
    """
    one = jax.eval_shape(lambda: init_cache(1))
    two = jax.eval_shape(lambda: init_cache(2))

    def axis(a: jax.ShapeDtypeStruct, b: jax.ShapeDtypeStruct) -> int | None:
        differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        if len(differ) > 1:
            raise ValueError(f"a cache leaf changes in more than one axis with the batch: {a.shape} vs {b.shape}")
        return differ[0] if differ else None

    return jax.tree.map(axis, one, two)


def reorder_cache(cache: Any, axes: Any, rows: jnp.ndarray) -> Any:
    """Gather ``rows [R]`` along each leaf's row axis (from :func:`cache_batch_axes`)."""

    def take(leaf: jnp.ndarray, axis: int | None) -> jnp.ndarray:
        return leaf if axis is None else jnp.take(leaf, rows, axis=axis)

    # ``axes`` holds None leaves, so map over the cache and look the axis up by path.
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: x is None)[0])
    return jax.tree_util.tree_map_with_path(lambda path, leaf: take(leaf, flat_axes[path]), cache)


def _gather(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """``x[b, index[b, j], ...]``: pick beams per batch row (``transformers``' ``_gather_beams``)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(
    step_fn: StepFn,
    init_cache: InitCacheFn,
    prompt: jnp.ndarray,
    *,
    beam_size: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    pad_id: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Beam search continuing ``prompt [B, P]`` (every row the same length ``P``).

    Args:
      step_fn: extends the cache by ``T`` tokens and returns their next-token logits.
      init_cache: an empty cache for the given number of rows (``B * K`` are used).
      prompt: ``[B, P]`` token ids, pre-filled in one ``step_fn`` call (for an encoder-decoder,
        the decoder's start token, ``P = 1``).
      beam_size: ``K``.
      max_new_tokens: ``N``, the most tokens generated (EOS included).
      eos_id: the token that finishes a beam (None: every beam runs ``N`` tokens).
      length_penalty: exponent of the generated length that divides a finished beam's summed
        log-probability (> 0 favours longer sequences, < 0 shorter ones).
      early_stopping: ``True``, ``False`` or ``'never'`` (see the module docstring).
      pad_id: fills a beam's tokens after its EOS.

    Returns:
      ``(tokens [B, K, N], scores [B, K])``: the generated tokens of the ``K`` best finished
      beams, best first, and their length-penalized scores.
    """
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    b, p = prompt.shape
    k, n = beam_size, max_new_tokens
    stop_when_full = early_stopping is True
    bound_at_max_len = early_stopping == "never" and length_penalty > 0.0

    axes = cache_batch_axes(init_cache)
    rows = jnp.repeat(prompt, k, axis=0)
    logits, cache = step_fn(init_cache(b * k), rows, jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b * k, p)))
    v = logits.shape[-1]
    if v < 2:
        raise ValueError(f"beam search needs a vocabulary of at least 2 ids, got {v}")
    # Of the 2K candidates per step only the first K may finish (transformers' top_num_beam_mask).
    may_finish = jnp.arange(2 * k) < k
    batch_offset = (jnp.arange(b, dtype=jnp.int32) * k)[:, None]

    def body(carry: dict[str, Any]) -> dict[str, Any]:
        i = carry["i"]  # tokens generated so far
        log_probs = jax.nn.log_softmax(carry["logits"].astype(jnp.float32), axis=-1).reshape(b, k, v)
        scores = (log_probs + carry["running_scores"][:, :, None]).reshape(b, k * v)
        top_scores, top_index = jax.lax.top_k(scores, 2 * k)  # [B, 2K]
        parent = top_index // v
        token = (top_index % v).astype(jnp.int32)
        top_seqs = _gather(carry["running_seqs"], parent)
        top_seqs = jax.lax.dynamic_update_index_in_dim(top_seqs, token, i, axis=2)
        hits = jnp.broadcast_to(i + 1 >= n, token.shape)
        if eos_id is not None:
            hits = hits | (token == eos_id)

        # The K best candidates that did not finish keep running.
        running_candidates = top_scores + hits.astype(jnp.float32) * _NEG
        keep = jax.lax.top_k(running_candidates, k)[1]
        running_seqs = _gather(top_seqs, keep)
        running_scores = _gather(running_candidates, keep)
        running_parent = _gather(parent, keep)

        # Finished candidates compete with the finished beams for the K slots.
        just_finished = hits & may_finish[None, :]
        length = (i + 1).astype(jnp.float32)
        final = top_scores / length**length_penalty
        if stop_when_full:
            final = final + jnp.all(carry["finished"], axis=-1, keepdims=True).astype(jnp.float32) * _NEG
        final = final + (~carry["improvable"]).astype(jnp.float32) * _NEG
        final = final + (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([carry["scores"], final], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        seqs = _gather(jnp.concatenate([carry["seqs"], top_seqs], axis=1), best)
        finished = _gather(jnp.concatenate([carry["finished"], just_finished], axis=1), best)
        beam_scores = _gather(merged_scores, best)

        # Stop when no running beam can still beat the worst finished one (per batch row).
        bound_length = jnp.float32(n) if bound_at_max_len else length
        best_running = running_scores[:, :1] / bound_length**length_penalty
        worst_finished = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), _NEG)
        improvable = carry["improvable"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        go_on = jnp.any(improvable) & ~jnp.all(hits)
        if stop_when_full:
            go_on = go_on & ~jnp.all(finished)

        cache = reorder_cache(carry["cache"], axes, (running_parent + batch_offset).reshape(-1))

        def advance(cache: Any) -> tuple[jnp.ndarray, Any]:
            last = jax.lax.dynamic_index_in_dim(running_seqs, i, axis=2, keepdims=False).reshape(b * k, 1)
            new_logits, cache = step_fn(cache, last, jnp.full((b * k, 1), p + i, jnp.int32))
            return new_logits[:, -1].astype(carry["logits"].dtype), cache

        # The model runs only if another step follows: the last step never writes past the cache.
        logits, cache = jax.lax.cond(go_on, advance, lambda c: (carry["logits"], c), cache)
        return dict(
            i=i + 1,
            go_on=go_on,
            logits=logits,
            cache=cache,
            running_seqs=running_seqs,
            running_scores=running_scores,
            seqs=seqs,
            scores=beam_scores,
            finished=finished,
            improvable=improvable,
        )

    init = dict(
        i=jnp.array(0, jnp.int32),
        go_on=jnp.array(True),
        logits=logits[:, -1],
        cache=cache,
        running_seqs=jnp.full((b, k, n), pad_id, jnp.int32),
        # Only beam 0 starts alive, so the first step does not pick the same token K times.
        running_scores=jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None, :].repeat(b, axis=0).astype(jnp.float32),
        seqs=jnp.full((b, k, n), pad_id, jnp.int32),
        scores=jnp.full((b, k), _NEG, jnp.float32),
        finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b, 1), bool),
    )
    out = jax.lax.while_loop(lambda c: c["go_on"], body, init)
    return out["seqs"], out["scores"]
