"""Losses and evaluation steps of the fine-tuning objectives (and the model-input plumbing they share).

Every loss returns ``(loss_sum, weight_sum)`` like the language-model losses, so gradient
accumulation and device reductions weight every example (or token) equally. Every evaluation
step returns ``(pairs, outputs)``: ``pairs`` maps a metric name to a ``(sum, count)`` pair that
:func:`jaxlm.evaluation.reduce` averages over the whole split, and ``outputs`` holds per-row
arrays (predictions and gold) that the host-side metrics of :mod:`jaxlm.evaluation` score.

Batches (see :mod:`jaxlm.data.pipeline`) may carry ``valid [B]``: the evaluator pads a split's
last, partial batch with rows of weight 0 there. Shapes: B batch, T length, L labels, U target
length, N generated tokens.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import losses
from jaxlm.models.encoder_decoder import shift_right

Batch = dict[str, jax.Array]
Pairs = dict[str, tuple[jax.Array, jax.Array]]

# Batch keys a model may take as keyword inputs, in the order models declare them.
_MODEL_INPUTS = ("token_types", "positions", "segment_ids")


@functools.cache
def _accepted(model_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.__call__).parameters)


def model_inputs(model: nn.Module, batch: Batch, names: tuple[str, ...] = _MODEL_INPUTS) -> dict[str, jax.Array]:
    """The batch's optional model inputs that this model's ``__call__`` takes (decoders take no token types)."""
    accepted = _accepted(type(model))
    return {k: batch[k] for k in names if k in batch and k in accepted}


def apply(model: nn.Module, params: Any, rng: jax.Array | None, deterministic: bool, *args: Any, **kw: Any) -> Any:
    """``model.apply`` with dropout drawn from ``rng`` (None: no dropout rng)."""
    rngs = {"dropout": rng} if rng is not None else {}
    return model.apply({"params": params}, *args, deterministic=deterministic, rngs=rngs, **kw)


def row_weights(batch: Batch) -> jax.Array:
    """``[B]`` float32: 1 for real rows, 0 for the evaluator's padding rows."""
    b = batch["inputs"].shape[0]
    return batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((b,), jnp.float32)


# ---- Sequence classification and regression.


def classification_loss(
    model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool
) -> tuple:
    """Cross-entropy of ``label [B]`` (or squared error of a float label for a 1-output regression head)."""
    out = apply(model, params, rng, deterministic, batch["inputs"], **model_inputs(model, batch))
    logits, w = out["logits"], row_weights(batch)
    if logits.shape[-1] == 1:  # regression
        per_row = jnp.square(logits[:, 0] - batch["label"].astype(jnp.float32))
    else:
        per_row = losses.cross_entropy(logits, batch["label"].astype(jnp.int32))
    return jnp.sum(per_row * w), jnp.sum(w)


def classification_eval(model: nn.Module, params: Any, batch: Batch) -> tuple[Pairs, dict[str, jax.Array]]:
    """Loss and accuracy pairs; predicted and gold labels per row (predictions are floats for regression)."""
    out = apply(model, params, None, True, batch["inputs"], **model_inputs(model, batch))
    logits, w = out["logits"], row_weights(batch)
    loss_sum, count = classification_loss(model, params, batch, None, True)
    if logits.shape[-1] == 1:
        pred = logits[:, 0]
        return {"loss": (loss_sum, count)}, {"pred": pred, "gold": batch["label"].astype(jnp.float32), "valid": w}
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    correct = jnp.sum((pred == batch["label"]).astype(jnp.float32) * w)
    pairs = {"loss": (loss_sum, count), "accuracy": (correct, count)}
    return pairs, {"pred": pred, "gold": batch["label"].astype(jnp.int32), "valid": w}


# ---- Token classification (tagging).


def token_classification_loss(
    model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool
) -> tuple:
    """Cross-entropy over the tagged positions (``weights``; ignored positions have target -100)."""
    out = apply(model, params, rng, deterministic, batch["inputs"], **model_inputs(model, batch))
    weights = batch["weights"] * row_weights(batch)[:, None]
    targets = jnp.where(weights > 0, batch["targets"], 0)
    return losses.weighted_cross_entropy(out["logits"], targets, weights)


def token_classification_eval(model: nn.Module, params: Any, batch: Batch) -> tuple[Pairs, dict[str, jax.Array]]:
    """Loss and token-accuracy pairs; predicted tag ids per position, gold targets (-100 = not a word start)."""
    out = apply(model, params, None, True, batch["inputs"], **model_inputs(model, batch))
    weights = batch["weights"] * row_weights(batch)[:, None]
    targets = jnp.where(weights > 0, batch["targets"], 0)
    loss_sum, weight_sum = losses.weighted_cross_entropy(out["logits"], targets, weights)
    pred = jnp.argmax(out["logits"], axis=-1).astype(jnp.int32)
    correct = jnp.sum((pred == targets).astype(jnp.float32) * weights)
    gold = jnp.where(weights > 0, batch["targets"], -100)
    pairs = {"loss": (loss_sum, weight_sum), "token_accuracy": (correct, weight_sum)}
    return pairs, {"pred": pred, "gold": gold}


# ---- Extractive question answering.


def qa_loss(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool) -> tuple:
    """Mean of the start and end cross-entropies (BERT's SQuAD loss), summed over rows."""
    out = apply(model, params, rng, deterministic, batch["inputs"], **model_inputs(model, batch))
    return _qa_loss_of(out, batch)


def _qa_loss_of(out: dict[str, jax.Array], batch: Batch) -> tuple:
    w = row_weights(batch)
    start = losses.cross_entropy(out["start_logits"], batch["start_position"].astype(jnp.int32))
    end = losses.cross_entropy(out["end_logits"], batch["end_position"].astype(jnp.int32))
    return jnp.sum(0.5 * (start + end) * w), jnp.sum(w)


def best_span(start_logits: jax.Array, end_logits: jax.Array, allowed: jax.Array, max_answer_len: int) -> tuple:
    """The ``(start, end)`` maximizing ``start + end`` logits with ``start <= end < start + max_answer_len``.

    ``allowed [B, T]`` marks positions an answer may use (the context); position 0 (``[cls]``,
    "no answer") is always allowed as the span (0, 0). Returns two ``[B]`` int32 arrays.
    """
    t = start_logits.shape[-1]
    neg = jnp.float32(-1e9)
    ok = allowed.at[:, 0].set(True)
    s = jnp.where(ok, start_logits.astype(jnp.float32), neg)
    e = jnp.where(ok, end_logits.astype(jnp.float32), neg)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    band = (j >= i) & (j < i + max_answer_len) & ((i > 0) == (j > 0))
    scores = jnp.where(band[None], s[:, :, None] + e[:, None, :], neg)  # [B, T, T]; T is a task's length
    flat = jnp.argmax(scores.reshape(scores.shape[0], -1), axis=-1)
    return (flat // t).astype(jnp.int32), (flat % t).astype(jnp.int32)


def qa_eval(
    model: nn.Module, params: Any, batch: Batch, *, max_answer_len: int = 30
) -> tuple[Pairs, dict[str, jax.Array]]:
    """Loss and exact-span accuracy pairs; predicted and gold spans and the input ids to read them from."""
    out = apply(model, params, None, True, batch["inputs"], **model_inputs(model, batch))
    w = row_weights(batch)
    loss_sum, count = _qa_loss_of(out, batch)  # from the same forward pass
    context = (batch["token_types"] == 1) & (batch["segment_ids"] != 0)
    start, end = best_span(out["start_logits"], out["end_logits"], context, max_answer_len)
    exact = (start == batch["start_position"]) & (end == batch["end_position"])
    pairs = {"loss": (loss_sum, count), "span_accuracy": (jnp.sum(exact.astype(jnp.float32) * w), count)}
    outputs = {
        "pred_start": start,
        "pred_end": end,
        "gold_start": batch["start_position"].astype(jnp.int32),
        "gold_end": batch["end_position"].astype(jnp.int32),
        "inputs": batch["inputs"],
        "valid": w,
    }
    return pairs, outputs


# ---- Sequence to sequence: encoder-decoder (text-to-text) or decoder-only (loss on the target part).


def seq2seq_loss(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool) -> tuple:
    """Teacher-forced target loss: an encoder-decoder reads the shifted targets; a decoder reads one row."""
    if "inputs_segment_ids" not in batch:  # decoder-only layout: weights cover the target part only
        out = apply(model, params, rng, deterministic, batch["inputs"], **model_inputs(model, batch))
        return losses.weighted_cross_entropy(out, batch["targets"], batch["weights"] * row_weights(batch)[:, None])
    kwargs = {k: batch[k] for k in ("inputs_segment_ids", "targets_segment_ids") if k in batch}
    targets_in = shift_right(batch["targets"], segment_ids=batch.get("targets_segment_ids"))
    logits = apply(model, params, rng, deterministic, batch["inputs"], targets_in, **kwargs)
    return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"] * row_weights(batch)[:, None])


def greedy_targets(model: nn.Module, params: Any, batch: Batch, num_tokens: int) -> jax.Array:
    """Greedy ``[B, N]`` continuations that the host scores against the targets.

    Encoder-decoder: the decoder starts from id 0 and fills ``num_tokens`` positions. Decoder-only:
    each row's prompt is its source part (up to its first target weight), filled in place. Both
    recompute the whole sequence per token (no cache): evaluation sets are small, and the
    same code then serves any decoder.
    """
    if "inputs_segment_ids" in batch:
        b = batch["inputs"].shape[0]
        kwargs = {"inputs_segment_ids": batch["inputs_segment_ids"]}
        buffer = jnp.zeros((b, num_tokens + 1), jnp.int32)

        def enc_dec(i: jax.Array, buf: jax.Array) -> jax.Array:
            logits = apply(model, params, None, True, batch["inputs"], buf[:, :-1], **kwargs)
            tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), axis=-1)
            return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(jnp.int32)[:, None], i + 1, axis=1)

        return jax.lax.fori_loop(0, num_tokens, enc_dec, buffer)[:, 1:]

    inputs = batch["inputs"]
    b, t = inputs.shape
    prompt_len = jnp.argmax(batch["weights"] > 0, axis=-1) + 1  # the first target is predicted at len - 1
    cols = jnp.arange(t)[None, :]
    buffer = jnp.where(cols < prompt_len[:, None], inputs, 0)
    rows = jnp.arange(b)

    def dec(i: jax.Array, carry: tuple) -> tuple:
        buf, out = carry
        logits = apply(model, params, None, True, buf)
        at = jnp.minimum(prompt_len + i - 1, t - 1)
        tok = jnp.argmax(logits[rows, at], axis=-1).astype(jnp.int32)
        write = prompt_len + i
        buf = jnp.where((cols == write[:, None]) & (write[:, None] < t), tok[:, None], buf)
        return buf, out.at[:, i].set(tok)

    _, out = jax.lax.fori_loop(0, num_tokens, dec, (buffer, jnp.zeros((b, num_tokens), jnp.int32)))
    return out


def seq2seq_eval(
    model: nn.Module, params: Any, batch: Batch, *, num_tokens: int = 0
) -> tuple[Pairs, dict[str, jax.Array]]:
    """Target loss pair; with ``num_tokens > 0`` also greedy generations and the gold targets for BLEU/ROUGE."""
    loss_sum, weight_sum = seq2seq_loss(model, params, batch, None, True)
    pairs = {"loss": (loss_sum, weight_sum)}
    if num_tokens <= 0:
        return pairs, {}
    gold = jnp.where(batch["weights"] > 0, batch["targets"], 0)
    outputs = {"generated": greedy_targets(model, params, batch, num_tokens), "gold": gold, "valid": row_weights(batch)}
    return pairs, outputs
