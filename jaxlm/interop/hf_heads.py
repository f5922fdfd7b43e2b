"""Hugging Face task heads <-> jaxlm task heads (:mod:`jaxlm.models.heads`): detection, tensors, config.

Supported (``architectures[0]`` in ``config.json``, which ``save_pretrained`` always writes;
a config naming another architecture, or none, imports as the base model, whose import refuses
head tensors it has no place for):

=================================  ===================================  ====================================
Hugging Face                       jaxlm (``config.data.objective``)    head tensors (HF -> jaxlm)
=================================  ===================================  ====================================
``BertForSequenceClassification``  classification (1 label: regression)  ``bert.pooler.dense`` -> ``pooler``,
                                                                         ``classifier`` -> ``head/classifier``
``BertForTokenClassification``     token_classification                 ``classifier`` -> ``head/classifier``
``BertForQuestionAnswering``       qa                                   ``qa_outputs`` -> ``head/qa_outputs``
``GPT2ForSequenceClassification``  classification (1 label: regression)  ``score`` -> ``head/score`` (no bias)
``GPT2ForTokenClassification``     token_classification                 ``classifier`` -> ``head/classifier``
``GPT2ForQuestionAnswering``       qa                                   ``qa_outputs`` -> ``head/qa_outputs``
=================================  ===================================  ====================================

Every head layer is an ``nn.Linear`` ``[L, D]`` whose transpose is the jaxlm kernel ``[D, L]``;
its module name is the jaxlm layer name. The body maps as for the pre-training models
(:mod:`jaxlm.interop.hf`, :mod:`jaxlm.interop.hf_bert`); the language-model heads (GPT-2's
``lm_head``, BERT's ``cls.*``; BERT's pooler for token classification and QA, which Hugging
Face builds with ``add_pooling_layer=False``) are neither read nor written.

Labels: ``config.task.num_labels`` is ``len(id2label)``; ``config.task.labels`` takes the
``id2label`` names unless they are the ``LABEL_i`` defaults (or names a comma-separated config
value cannot hold: commas, surrounding spaces, repeats). Export writes ``id2label`` /
``label2id`` back, ``problem_type: regression`` for one output, and ``pad_token_id`` (GPT-2's
sequence classifier needs it to find the last real token).

Hugging Face pools a sequence one fixed way (BERT: the pooler on ``[CLS]``; GPT-2: the last
non-padding token), which jaxlm's ``config.task.pooling='auto'`` reproduces; other poolings
cannot be exported. This module imports nothing from jaxlm above L0.

Shapes: D model dim, L labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlm.common_types import DataError


@dataclasses.dataclass(frozen=True)
class HfHead:
    """One Hugging Face task-head architecture."""

    architecture: str  # e.g. 'BertForSequenceClassification'
    model_type: str  # 'bert' | 'gpt2'
    family: str  # 'sequence' | 'token' | 'qa'
    layer: str  # the nn.Linear's name in Hugging Face and under jaxlm's head/
    bias: bool = True
    pooler: bool = False  # keeps BERT's pooler (bert.pooler.dense -> pooler)


HEADS: dict[str, HfHead] = {
    h.architecture: h
    for h in (
        HfHead("BertForSequenceClassification", "bert", "sequence", "classifier", pooler=True),
        HfHead("BertForTokenClassification", "bert", "token", "classifier"),
        HfHead("BertForQuestionAnswering", "bert", "qa", "qa_outputs"),
        HfHead("GPT2ForSequenceClassification", "gpt2", "sequence", "score", bias=False),
        HfHead("GPT2ForTokenClassification", "gpt2", "token", "classifier"),
        HfHead("GPT2ForQuestionAnswering", "gpt2", "qa", "qa_outputs"),
    )
}
# The top-level jaxlm parameter groups of each model type's language-model heads (not in a task model).
LM_HEADS: dict[str, tuple[str, ...]] = {"gpt2": ("lm_head",), "bert": ("pooler", "mlm", "nsp")}
# jaxlm head kind -> head family; family -> config.data.objective.
FAMILIES = {"classification": "sequence", "regression": "sequence", "token_classification": "token", "qa": "qa"}
OBJECTIVES = {"sequence": "classification", "token": "token_classification", "qa": "qa"}


@dataclasses.dataclass(frozen=True)
class Task:
    """A task head as both sides see it: the Hugging Face architecture and the jaxlm head."""

    head: HfHead
    kind: str  # jaxlm head kind: classification | regression | token_classification | qa
    num_labels: int  # outputs: classes, 1 for regression, 2 for qa
    # Label names in class order; empty for the LABEL_i defaults, or names config.task.labels
    # cannot hold (a comma, surrounding spaces, repeats), which then become 0..N-1.
    labels: tuple[str, ...] = ()

    @property
    def objective(self) -> str:
        """The jaxlm ``config.data.objective`` that trains this head."""
        return OBJECTIVES[self.head.family]

    def config_fields(self) -> dict[str, Any]:
        """The jaxlm config keys (``'data.objective'``, ``'task.num_labels'``, ``'task.labels'``) of an import."""
        out: dict[str, Any] = {"data.objective": self.objective}
        if self.head.family != "qa":
            out["task.num_labels"] = self.num_labels
            if self.labels:
                out["task.labels"] = ",".join(self.labels)
        return out

    def dropped_groups(self) -> tuple[str, ...]:
        """The top-level groups of the base mapping that a model with this head does not have."""
        return tuple(g for g in LM_HEADS[self.head.model_type] if not (g == "pooler" and self.head.pooler))


def _num_labels(hf_config: Mapping[str, Any], source: str) -> tuple[int, tuple[str, ...]]:
    """``(num_labels, names)`` from ``id2label`` (names empty when they are the LABEL_i defaults)."""
    id2label = hf_config.get("id2label")
    if not id2label:
        n = hf_config.get("num_labels", hf_config.get("_num_labels", 2))  # PretrainedConfig's default is 2
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"{source}: num_labels={n!r} must be a positive integer; fix the config")
        return n, ()
    try:
        by_id = {int(k): str(v) for k, v in dict(id2label).items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: id2label must map class ids 0..N-1 to names ({e}); fix the config") from e
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(f"{source}: id2label ids {sorted(by_id)} are not 0..{len(by_id) - 1}; fix the config")
    names = tuple(by_id[i] for i in range(len(by_id)))
    if names == default_labels(len(names)) or not labels_fit_config(names):
        return len(names), ()
    return len(names), names


def labels_fit_config(names: Sequence[str]) -> bool:
    """Whether ``names`` survive ``config.task.labels`` (comma-separated, stripped, distinct, non-empty)."""
    return len(set(names)) == len(names) and all(n and n == n.strip() and "," not in n for n in names)


def default_labels(n: int) -> tuple[str, ...]:
    """Hugging Face's label names when none are given: ``LABEL_0 .. LABEL_{n-1}``."""
    return tuple(f"LABEL_{i}" for i in range(n))


def detect(hf_config: Mapping[str, Any], state: Mapping[str, Any] | None, source: str) -> Task | None:
    """The task head of a Hugging Face checkpoint (``architectures[0]``), or None for a base model.

    ``state`` is accepted for symmetry with the other readers; the config alone decides, so a
    checkpoint whose config names no head never has its tensors guessed at.
    """
    model_type = hf_config.get("model_type")
    if model_type not in LM_HEADS:
        return None
    del state
    archs = hf_config.get("architectures")
    named = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    head = HEADS.get(named) if named else None
    if head is None:
        return None
    if head.model_type != model_type:
        raise DataError(f"{source}: architectures={head.architecture!r} does not fit model_type={model_type!r}")
    n, names = _num_labels(hf_config, source)
    if head.family == "qa":
        return Task(head, "qa", 2)
    if head.family == "sequence" and n == 1:
        return Task(head, "regression", 1)
    return Task(head, "classification" if head.family == "sequence" else "token_classification", n, names)


def split_state(
    state: Mapping[str, np.ndarray], task: Task, num_features: int, embed_dim: int, source: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(the body's tensors, jaxlm's head/ subtree)``: takes the head layer out of ``state``.

    ``num_features`` is the head's output count, ``embed_dim`` the model's D.
    """
    head = task.head
    rest = dict(state)
    shapes = {"weight": (num_features, embed_dim), "bias": (num_features,)}
    layer: dict[str, np.ndarray] = {}
    for part in ("weight", "bias") if head.bias else ("weight",):
        key = f"{head.layer}.{part}"
        if key not in rest:
            raise DataError(f"{source} has no tensor {key!r}; is it a {head.architecture} checkpoint?")
        value = np.asarray(rest.pop(key), dtype=np.float32)
        if value.shape != shapes[part]:
            raise DataError(
                f"{source}: {key} has shape {value.shape} but config.json implies {shapes[part]} "
                f"({num_features} outputs); fix id2label / num_labels"
            )
        layer["kernel" if part == "weight" else "bias"] = np.ascontiguousarray(value.T if part == "weight" else value)
    if not head.bias and f"{head.layer}.bias" in rest:
        raise DataError(f"{source} has {head.layer}.bias, which {head.architecture} does not have")
    return rest, {head.layer: layer}


def head_to_hf(head_params: Mapping[str, Any], task: Task) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of jaxlm's ``head/`` subtree."""
    layer = task.head.layer
    if set(head_params) != {layer}:
        raise DataError(
            f"the checkpoint's task head has {sorted(head_params)}, not {layer!r}; "
            f"it cannot be exported as {task.head.architecture}"
        )
    params = head_params[layer]
    out = {f"{layer}.weight": np.ascontiguousarray(np.asarray(params["kernel"], dtype=np.float32).T)}
    if task.head.bias:
        out[f"{layer}.bias"] = np.asarray(params["bias"], dtype=np.float32)
    return out


# How each model type's Hugging Face sequence classifier reads the sequence.
POOLED_BY = {"bert": "the pooler on [CLS]", "gpt2": "the last non-padding token"}


def pooling_fits(head: HfHead, pooling: str) -> bool:
    """Whether jaxlm's ``config.task.pooling`` computes what ``head`` does ('auto'; GPT-2 also 'last')."""
    return head.family != "sequence" or pooling == "auto" or (head.model_type == "gpt2" and pooling == "last")


def for_export(model_type: str, kind: str, num_labels: int, labels: Sequence[str], pooling: str) -> Task:
    """The :class:`Task` a jaxlm head exports as; a :class:`DataError` when Hugging Face has no equivalent."""
    family = FAMILIES[kind]
    matches = [h for h in HEADS.values() if h.model_type == model_type and h.family == family]
    if not matches:
        raise DataError(f"config.task.head={kind!r} on a {model_type} model has no Hugging Face equivalent")
    head = matches[0]
    if not pooling_fits(head, pooling):
        raise DataError(
            f"config.task.pooling={pooling!r} has no {head.architecture} equivalent (it pools with "
            f"{POOLED_BY[model_type]}); export a model fine-tuned with pooling=auto"
        )
    names = tuple(labels)
    if names and len(names) != num_labels and kind in ("classification", "token_classification"):
        raise DataError(f"config.task.labels has {len(names)} names but the head has {num_labels} outputs")
    outputs = {"qa": 2, "regression": 1}.get(kind, num_labels)
    return Task(head, kind, outputs, names if kind in ("classification", "token_classification") else ())


def hf_config_fields(task: Task, special_ids: Mapping[str, int | None], pad_default: int) -> dict[str, Any]:
    """The ``config.json`` fields of the head: architectures, labels, problem type, pad id."""
    names = task.labels or default_labels(task.num_labels)
    out: dict[str, Any] = {
        "architectures": [task.head.architecture],
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }
    if task.kind == "regression":
        out["problem_type"] = "regression"
    elif task.kind == "classification":
        out["problem_type"] = "single_label_classification"
    if task.head.model_type == "gpt2":
        pad = special_ids.get("pad")
        out["pad_token_id"] = int(pad_default if pad is None else pad)
    return out
