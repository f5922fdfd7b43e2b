"""The objective registry of the step layer: for each ``config.data.objective``, its loss, eval step and init inputs.

One explicit dict, :data:`OBJECTIVES`, keyed by the same names as the data layer's batch
builders (:data:`jaxlm.data.pipeline.OBJECTIVES`) and the host-side metrics
(:data:`jaxlm.evaluation.METRICS`); a test asserts that the three key sets agree with
``config_lib.CHOICES['data.objective']``. Nothing here dispatches on ``model.kind``.

Losses return sums, not means, so gradient accumulation and multi-device reductions weight
every target token equally however the batch is split; the step divides once at the end.
Eval steps return ``(pairs, outputs)`` (see :mod:`jaxlm.steps.tasks`).

Batch keys (see ``jaxlm.data.pipeline``): causal LM ``inputs, targets, weights`` [B, T]
(+ ``positions, segment_ids`` when packed); masked LM ``inputs, targets, weights,
segment_ids, token_types`` [B, T] (+ ``nsp_label`` [B]); seq2seq / span corruption
``inputs, inputs_segment_ids`` [B, T] and ``targets, weights`` [B, U].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import losses
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import ModelConfig
from jaxlm.steps import tasks

Batch = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, jax.Array]]
EvalFn = Callable[..., tuple[dict[str, tuple[jax.Array, jax.Array]], dict[str, jax.Array]]]


_apply = tasks.apply


def causal_lm(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool) -> tuple:
    """Next-token loss of a decoder-only or recurrent LM."""
    kwargs = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    logits = _apply(model, params, rng, deterministic, batch["inputs"], **kwargs)
    return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])


def masked_lm(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool) -> tuple:
    """BERT pre-training loss: masked-token loss, plus next-sentence loss when labels are given.

    The NSP term enters as its mean per pair times the batch's MLM weight, so that after the
    step divides by the total weight the loss is ``mean MLM + mean NSP`` (as in BERT).
    """
    kwargs = {k: batch[k] for k in ("token_types", "segment_ids", "positions") if k in batch}
    out = _apply(model, params, rng, deterministic, batch["inputs"], **kwargs)
    loss_sum, weight_sum = losses.weighted_cross_entropy(out["mlm_logits"], batch["targets"], batch["weights"])
    if "nsp_label" in batch:
        nsp = jnp.mean(losses.cross_entropy(out["nsp_logits"], batch["nsp_label"]))
        loss_sum = loss_sum + nsp * weight_sum
    return loss_sum, weight_sum


def _loss_eval(loss: LossFn) -> EvalFn:
    """An eval step that reports the loss as a ``(sum, weight)`` pair (perplexity follows on the host)."""

    def evaluate(model: nn.Module, params: Any, batch: Batch) -> tuple[dict, dict]:
        return {"loss": loss(model, params, batch, None, True)}, {}

    return evaluate


def _masked_lm_eval(model: nn.Module, params: Any, batch: Batch) -> tuple[dict, dict]:
    """MLM loss and masked-token accuracy (plus next-sentence accuracy when the batch has labels)."""
    kwargs = {k: batch[k] for k in ("token_types", "segment_ids", "positions") if k in batch}
    out = _apply(model, params, None, True, batch["inputs"], **kwargs)
    pairs = {"loss": masked_lm(model, params, batch, None, True)}
    w = batch["weights"].astype(jnp.float32)
    hit = (jnp.argmax(out["mlm_logits"], axis=-1) == batch["targets"]).astype(jnp.float32)
    pairs["mlm_accuracy"] = (jnp.sum(hit * w), jnp.sum(w))
    if "nsp_label" in batch:
        rows = tasks.row_weights(batch)
        nsp_hit = (jnp.argmax(out["nsp_logits"], axis=-1) == batch["nsp_label"]).astype(jnp.float32)
        pairs["nsp_accuracy"] = (jnp.sum(nsp_hit * rows), jnp.sum(rows))
    return pairs, {}


def _tokens(cfg: ModelConfig, seq_len: int) -> jax.Array:
    return jnp.zeros((1, min(seq_len, cfg.max_len)), jnp.int32)


def _lm_example(cfg: ModelConfig, seq_len: int) -> tuple[jax.Array, ...]:
    """Positional init inputs of an LM: tokens, plus decoder tokens for an encoder-decoder."""
    tokens = _tokens(cfg, seq_len)
    return (tokens, tokens) if cfg.kind == "encoder_decoder" else (tokens,)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step layer knows of one objective.

    Attributes:
      loss: ``(model, params, batch, rng, deterministic) -> (loss_sum, weight_sum)``.
      evaluate: ``(model, params, batch, **options) -> (pairs, outputs)``; ``options`` are the
        objective's evaluation options (:func:`eval_options`).
      example_args: ``(model_cfg, seq_len) -> positional inputs`` that initialize the model.
    """

    loss: LossFn
    evaluate: EvalFn
    example_args: Callable[[ModelConfig, int], tuple[jax.Array, ...]]


# config.data.objective -> its loss, eval step and init inputs.
OBJECTIVES: dict[str, Objective] = {
    "causal_lm": Objective(causal_lm, _loss_eval(causal_lm), _lm_example),
    "masked_lm": Objective(masked_lm, _masked_lm_eval, _lm_example),
    "nsp": Objective(masked_lm, _masked_lm_eval, _lm_example),
    "span_corruption": Objective(tasks.seq2seq_loss, _loss_eval(tasks.seq2seq_loss), _lm_example),
    "seq2seq": Objective(tasks.seq2seq_loss, tasks.seq2seq_eval, _lm_example),
    "classification": Objective(tasks.classification_loss, tasks.classification_eval, _lm_example),
    "token_classification": Objective(tasks.token_classification_loss, tasks.token_classification_eval, _lm_example),
    "qa": Objective(tasks.qa_loss, tasks.qa_eval, _lm_example),
}


def get(name: str) -> Objective:
    """The objective ``name``; a one-line :class:`ConfigError` lists the valid names otherwise."""
    if name not in OBJECTIVES:
        raise ConfigError(f"config.data.objective={name!r} is not one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
