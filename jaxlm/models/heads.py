"""Task heads for fine-tuning, attached to ``DecoderOnly`` / ``EncoderOnly`` by a :class:`HeadConfig`.

A model built with ``head=HeadConfig(...)`` (``jaxlm.models.build(cfg, head=...)``) creates no
language-model head (no MLM / NSP heads, no untied ``lm_head``) and returns a dict:

* ``classification``: ``{"logits": [B, L]}``; ``regression``: ``{"logits": [B, 1]}``;
* ``token_classification``: ``{"logits": [B, T, L]}``;
* ``qa``: ``{"start_logits": [B, T], "end_logits": [B, T]}`` (extractive span boundaries).

All float32. Sequence-level heads read one vector per sequence (``pooling``):

* ``auto``: an encoder's BERT pooler (the model's own ``pooler`` dense + tanh on position 0, the
  ``[CLS]`` token); a decoder's last non-padding token (its only position that has seen the
  whole sequence), as Hugging Face ``GPT2ForSequenceClassification`` does;
* ``cls``: the hidden state at position 0, no pooler; ``last``: the last non-padding token;
* ``mean``: the mean over non-padding positions.

Padding is where ``segment_ids == 0`` (as the task batches give it), or, without segment ids,
where ``tokens == 0`` (``PAD_ID``).

Parameter paths and the Hugging Face module each mirrors (``[D, L]`` kernel, ``[L]`` bias)::

    encoder classification / regression   pooler/{kernel, bias} (pooling=auto) + head/classifier/{kernel, bias}
                                          BertForSequenceClassification: bert.pooler.dense, classifier
    encoder token classification          head/classifier/{kernel, bias}     BertForTokenClassification
    encoder qa                            head/qa_outputs/{kernel [D, 2], bias [2]}   BertForQuestionAnswering
    decoder classification / regression   head/score/kernel (no bias)        GPT2ForSequenceClassification
    decoder token classification          head/classifier/{kernel, bias}     GPT2ForTokenClassification
    decoder qa                            head/qa_outputs/{kernel, bias}     GPT2ForQuestionAnswering

Dropout (``config.model.dropout_rate``) comes before the layer exactly where Hugging Face puts
it: before ``classifier``; not before ``score`` or ``qa_outputs``.

Shapes: B batch, T length, D model dim, L labels.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import Config, ModelConfig, task_head
from jaxlm.models.transformer import dtypes
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.linears import DenseGeneral

PAD_ID = 0  # the padding id of every jaxlm tokenizer
KINDS = ("classification", "regression", "token_classification", "qa")
SEQUENCE_KINDS = ("classification", "regression")  # one output vector per sequence (pooled)
POOLINGS = ("auto", "cls", "last", "mean")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Which task head a model carries.

    Attributes:
      kind: 'classification' | 'regression' | 'token_classification' | 'qa'.
      num_labels: classes (classification, token classification); regression has one output
        (0 or 1 here); qa ignores it (two outputs, start and end).
      pooling: how sequence-level heads read the sequence: 'auto' | 'cls' | 'last' | 'mean'.
    """

    kind: str
    num_labels: int
    pooling: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"config.task.head={self.kind!r} is not one of: {', '.join(KINDS)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"config.task.pooling={self.pooling!r} is not one of: {', '.join(POOLINGS)}")
        if self.kind == "regression" and self.num_labels not in (0, 1):
            raise ConfigError(
                f"config.task.num_labels={self.num_labels} with a regression head: it has one output; "
                "set num_labels=1 or use head=classification"
            )
        if self.kind in ("classification", "token_classification") and self.num_labels < 1:
            raise ConfigError(
                f"config.task.num_labels={self.num_labels}: a {self.kind} head needs >= 1 label; "
                "set config.task.num_labels or config.task.labels"
            )

    @property
    def features(self) -> int:
        """Outputs per position (token heads) or per sequence: 2 for qa, 1 for regression."""
        return {"qa": 2, "regression": 1}.get(self.kind, self.num_labels)

    @property
    def sequence_level(self) -> bool:
        """Whether the head reads one pooled vector per sequence."""
        return self.kind in SEQUENCE_KINDS


def from_config(config: Config, num_labels: int | None = None) -> HeadConfig | None:
    """The :class:`HeadConfig` of a validated config (None when the model carries no task head).

    ``num_labels`` overrides the config's count (e.g. a catalog dataset's own label count when
    ``config.task.num_labels`` and ``config.task.labels`` are both unset).
    """
    kind = task_head(config)
    if kind == "none":
        return None
    n = num_labels if num_labels is not None else (config.task.num_labels or len(config.task.label_list))
    return HeadConfig(kind=kind, num_labels=1 if kind == "regression" else n, pooling=config.task.pooling)


def padding_mask(tokens: jnp.ndarray, segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    """``[B, T]`` bool, True at real tokens: ``segment_ids != 0``, else ``tokens != PAD_ID``."""
    return (segment_ids != 0) if segment_ids is not None else (tokens != PAD_ID)


def last_token_index(tokens: jnp.ndarray, segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    """``[B]`` int32: the last real (non-padding) position of each row; 0 for an all-padding row.

    The largest index among real positions (Hugging Face's ``argmax(arange * non_pad)``), so
    left and right padding both work.
    """
    real = padding_mask(tokens, segment_ids)
    idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(real, idx[None, :], 0), axis=1)


def pool(hidden: jnp.ndarray, tokens: jnp.ndarray, segment_ids: jnp.ndarray | None, pooling: str) -> jnp.ndarray:
    """``hidden [B, T, D] -> [B, D]`` by ``pooling`` 'cls' | 'last' | 'mean' (no parameters).

    ('auto' resolves in the model: the encoder's pooler or the decoder's 'last'.)
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        idx = last_token_index(tokens, segment_ids)
        return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        real = padding_mask(tokens, segment_ids).astype(jnp.float32)
        total = jnp.einsum("btd,bt->bd", hidden.astype(jnp.float32), real)
        return (total / jnp.maximum(real.sum(axis=1, keepdims=True), 1.0)).astype(hidden.dtype)
    raise ValueError(f"pooling {pooling!r} is resolved by the model; pool() takes: cls, last, mean")


class TaskHead(nn.Module):
    """The output layer of a task head (called ``head`` inside the model).

    Attributes:
      cfg: the model's config (dtypes, dropout rate).
      head: which head.
      decoder: True on a decoder-only model: its sequence-level layer is GPT-2's bias-free
        ``score`` (no dropout) instead of BERT's ``classifier``.
    """

    cfg: ModelConfig
    head: HeadConfig
    decoder: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> dict[str, jnp.ndarray]:
        """``x``: ``[B, D]`` pooled (sequence-level heads) or ``[B, T, D]`` hidden -> the output dict."""
        cfg, head = self.cfg, self.head
        dt, pdt = dtypes(cfg)

        def dense(features: int, name: str, *, use_bias: bool = True) -> DenseGeneral:
            return DenseGeneral((features,), (ax.EMBED, None), use_bias=use_bias, dtype=dt, param_dtype=pdt, name=name)

        if head.kind == "qa":
            logits = dense(2, "qa_outputs")(x).astype(jnp.float32)
            logits = nn.with_logical_constraint(logits, (ax.ACT_BATCH, ax.ACT_LENGTH, None))
            return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
        if head.sequence_level and self.decoder:
            logits = dense(head.features, "score", use_bias=False)(x).astype(jnp.float32)
        else:
            x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
            logits = dense(head.features, "classifier")(x).astype(jnp.float32)
        names = (ax.ACT_BATCH, None) if head.sequence_level else (ax.ACT_BATCH, ax.ACT_LENGTH, None)
        return {"logits": nn.with_logical_constraint(logits, names)}
