"""Per-objective losses: how a model family turns a batch into (loss sum, weight sum).

Each returns sums, not means, so gradient accumulation and multi-device reductions weight
every target token equally however the batch is split; the step divides once at the end.

Batch keys (see ``jaxlm.data.pipeline``): causal LM ``inputs, targets, weights`` [B, T]
(+ ``positions, segment_ids`` when packed); masked LM ``inputs, targets, weights,
segment_ids, token_types`` [B, T] (+ ``nsp_label`` [B]); seq2seq / span corruption
``inputs, inputs_segment_ids`` [B, T] and ``targets, weights`` [B, U].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import losses
from jaxlm.models.encoder_decoder import shift_right

Batch = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, jax.Array]]


def _apply(model: nn.Module, params: Any, rng: jax.Array | None, deterministic: bool, *args: Any, **kw: Any) -> Any:
    rngs = {"dropout": rng} if rng is not None else {}
    return model.apply({"params": params}, *args, deterministic=deterministic, rngs=rngs, **kw)


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


def seq2seq(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, deterministic: bool) -> tuple:
    """Encoder-decoder loss: the decoder reads the shifted targets (teacher forcing)."""
    kwargs = {k: batch[k] for k in ("inputs_segment_ids", "targets_segment_ids") if k in batch}
    targets_in = shift_right(batch["targets"], segment_ids=batch.get("targets_segment_ids"))
    logits = _apply(model, params, rng, deterministic, batch["inputs"], targets_in, **kwargs)
    return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])


# Model kind -> its training loss.
LOSSES: dict[str, LossFn] = {
    "decoder_only": causal_lm,
    "rnn": causal_lm,
    "encoder_only": masked_lm,
    "encoder_decoder": seq2seq,
}
