"""Fine-tuning objectives as grain transforms: seq2seq, classification, token tagging, extractive QA.

Every transform maps one keyed record ``{'record': {...}, 'epoch': e, 'index': i}`` (what
:mod:`jaxlm.data.pipeline` reads from a source) to one row of fixed shape; field names are
arguments. Text fields may be ``str`` or ``bytes`` (tfds stores text as bytes). Encoder
inputs use the BERT layout ``[cls] A [sep] (B [sep])`` with ``segment_ids`` 1 on real tokens,
0 on padding, and ``token_types`` 0 on the first part, 1 on the second. Label sets map
values to class indices by position: ``labels=('neg', 'pos')`` makes ``'pos'`` class 1; a
value outside the set is a :class:`~jaxlm.common_types.DataError` naming it and the set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data.objectives import IGNORE_LABEL, text_of, truncate_pair
from jaxlm.data.packing import check_choice, pad_to
from jaxlm.data.tokenizers import Tokenizer

QA_IMPOSSIBLE = ("drop", "mark")


def _plain(value: Any) -> Any:
    """A record value as a plain Python scalar (NumPy scalars unwrapped, bytes decoded)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class LabelSet:
    """Maps label values to class indices ``0..len(labels)-1`` by their position in ``labels``."""

    def __init__(self, labels: Sequence[Any], field: str) -> None:
        self.labels = [_plain(v) for v in labels]
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise DataError(f"labels={list(labels)!r} for {field!r} must be a non-empty list of distinct values")
        self.field = field
        self._index = {v: i for i, v in enumerate(self.labels)}

    def __call__(self, value: Any) -> int:
        v = _plain(value)
        if v not in self._index:
            raise DataError(f"{self.field}={v!r} is not in the label set {self.labels}; fix the record or pass labels=")
        return self._index[v]


def bio_labels(entity_types: Sequence[str]) -> list[str]:
    """The BIO tag set ``['O', 'B-T1', 'I-T1', 'B-T2', ...]`` for entity types ``T1, T2, ...``."""
    return ["O"] + [f"{p}-{t}" for t in entity_types for p in ("B", "I")]


def encoder_row(
    a: np.ndarray, b: np.ndarray | None, *, cls: int, sep: int, pad: int, seq_len: int
) -> dict[str, np.ndarray]:
    """``[cls] a [sep] (b [sep])`` padded to ``seq_len``, with ``segment_ids`` and ``token_types``."""
    if b is None:
        a = a[: seq_len - 2]
        tokens = np.concatenate([[cls], a, [sep]])
        types = np.zeros(len(tokens), np.int32)
    else:
        a, b = truncate_pair(a, b, seq_len - 3)
        tokens = np.concatenate([[cls], a, [sep], b, [sep]])
        types = np.concatenate([np.zeros(len(a) + 2, np.int32), np.ones(len(b) + 1, np.int32)])
    return {
        "inputs": pad_to(tokens, seq_len, pad),
        "segment_ids": pad_to(np.ones(len(tokens)), seq_len, 0),
        "token_types": pad_to(types, seq_len, 0),
    }


class _EncoderTask(grain.transforms.Map):
    def __init__(self, tokenizer: Tokenizer, seq_len: int) -> None:
        if seq_len < 3:
            raise DataError(f"seq_len={seq_len} leaves no room for a token between [cls] and [sep]; raise it")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.cls, self.sep, self.pad = tokenizer.special_id("cls"), tokenizer.special_id("sep"), tokenizer.pad_id


class Seq2SeqRow(grain.transforms.Map):
    """Source/target text fields -> ``{inputs, inputs_segment_ids, targets, weights}``.

    ``inputs = encode(prefix + source)`` cut to ``inputs_length - 1`` tokens, then ``eos``;
    ``targets = encode(target)`` cut to ``targets_length - 1`` tokens, then ``eos``; both padded.
    The model shifts ``targets`` right (prepending its start id) to form the decoder inputs.

    ``decoder_only=True`` lays the pair out for a decoder-only model instead: one row
    ``source eos target eos`` of ``inputs_length + 1`` tokens (the source cut to leave room for
    the target), shifted into ``{inputs, targets, weights}`` [inputs_length] like causal LM, with
    weight only on the target's tokens, so the loss is on the target part alone.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        inputs_length: int,
        targets_length: int,
        source_field: str = "source",
        target_field: str = "target",
        prefix: str = "",
        decoder_only: bool = False,
    ) -> None:
        if inputs_length < 2 or targets_length < 2:
            raise DataError(f"seq_len={inputs_length} and targets_len={targets_length} must both be at least 2")
        if decoder_only and targets_length >= inputs_length:
            raise DataError(
                f"targets_len={targets_length} must be below seq_len={inputs_length} for a decoder-only model, "
                "which reads source and target in one row; set config.task.targets_len"
            )
        self.tokenizer, self.inputs_length, self.targets_length = tokenizer, inputs_length, targets_length
        self.source_field, self.target_field, self.prefix = source_field, target_field, prefix
        self.decoder_only = decoder_only

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        record, tok = element["record"], self.tokenizer
        if self.decoder_only:
            return self._decoder_row(record)
        src = np.append(
            tok.encode(self.prefix + text_of(record, self.source_field))[: self.inputs_length - 1], tok.eos_id
        )
        tgt = np.append(tok.encode(text_of(record, self.target_field))[: self.targets_length - 1], tok.eos_id)
        return {
            "inputs": pad_to(src, self.inputs_length, tok.pad_id),
            "inputs_segment_ids": pad_to(np.ones(len(src)), self.inputs_length, 0),
            "targets": pad_to(tgt, self.targets_length, tok.pad_id),
            "weights": pad_to(np.ones(len(tgt)), self.targets_length, 0, np.float32),
        }

    def _decoder_row(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        tgt = np.append(tok.encode(text_of(record, self.target_field))[: self.targets_length - 1], tok.eos_id)
        room = self.inputs_length + 1 - len(tgt) - 1
        src = np.append(tok.encode(self.prefix + text_of(record, self.source_field))[:room], tok.eos_id)
        row = np.concatenate([src, tgt]).astype(np.int32)
        weights = np.concatenate([np.zeros(len(src) - 1), np.ones(len(tgt))])
        n = self.inputs_length
        return {
            "inputs": pad_to(row[:-1], n, tok.pad_id),
            "targets": pad_to(row[1:], n, tok.pad_id),
            "weights": pad_to(weights, n, 0, np.float32),
        }


class ClassificationRow(_EncoderTask):
    """Text (and optional paired text) with a label -> ``{inputs, segment_ids, token_types, label}``."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        labels: Sequence[Any] | None,
        text_field: str = "text",
        pair_field: str | None = None,
        label_field: str = "label",
    ) -> None:
        super().__init__(tokenizer, seq_len)
        # labels=None: a regression target, the record's number as float32.
        self.label_set = None if labels is None else LabelSet(labels, label_field)
        self.text_field, self.pair_field, self.label_field = text_field, pair_field, label_field

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        record = element["record"]
        if self.label_field not in record:
            raise DataError(f"record has no field {self.label_field!r} (it has: {', '.join(record)}); set label_field")
        a = self.tokenizer.encode(text_of(record, self.text_field))
        b = self.tokenizer.encode(text_of(record, self.pair_field)) if self.pair_field else None
        row = encoder_row(a, b, cls=self.cls, sep=self.sep, pad=self.pad, seq_len=self.seq_len)
        if self.label_set is None:
            try:
                row["label"] = np.float32(_plain(record[self.label_field]))
            except (TypeError, ValueError):
                raise DataError(
                    f"{self.label_field}={record[self.label_field]!r} is not a number; a regression task "
                    "(config.task.num_labels=1) needs numeric labels"
                ) from None
        else:
            row["label"] = np.int32(self.label_set(record[self.label_field]))
        return row


def encode_words(tokenizer: Tokenizer, words: Sequence[str]) -> tuple[list[np.ndarray], list[int]]:
    """Encode words as one text would be (a space before every word but the first).

    Returns each word's ids and the offset of its *first* sub-token: the first one whose text
    is not blank, so the space a ``byte`` tokenizer (or a lone SentencePiece ``▁``) puts in
    front of a word does not take the word's label. An offset of ``-1`` marks a word with no
    such token (it gets no label).
    """
    ids, firsts = [], []
    for i, word in enumerate(words):
        w = tokenizer.encode(word if i == 0 else " " + word)
        first = next((j for j, t in enumerate(w) if tokenizer.decode([int(t)]).strip()), -1)
        ids.append(w)
        firsts.append(first)
    return ids, firsts


class TaggingRow(_EncoderTask):
    """Word-level tags -> per-token ``{inputs, segment_ids, targets, weights, word_ids}``.

    Only the first sub-token of each word carries its tag (``targets`` = class index,
    ``weights`` 1); other sub-tokens, ``[cls]``, ``[sep]`` and padding have
    ``targets = IGNORE_LABEL`` (-100) and weight 0. ``word_ids`` gives each token's word
    index (-1 off words), to map predictions back to words. Words past ``seq_len - 2``
    tokens are cut.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        labels: Sequence[Any],
        words_field: str = "tokens",
        tags_field: str = "tags",
    ) -> None:
        super().__init__(tokenizer, seq_len)
        self.label_set = LabelSet(labels, tags_field)
        self.words_field, self.tags_field = words_field, tags_field

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        record = element["record"]
        for field in (self.words_field, self.tags_field):
            if field not in record:
                raise DataError(f"record has no field {field!r} (it has: {', '.join(record)}); set {field}_field")
        words = [_plain(w) for w in record[self.words_field]]
        tags = [self.label_set(t) for t in record[self.tags_field]]
        if len(words) != len(tags):
            raise DataError(
                f"record {element['index']}: {len(words)} {self.words_field!r} but {len(tags)} "
                f"{self.tags_field!r}; every word needs one tag"
            )
        word_ids, firsts = encode_words(self.tokenizer, [str(w) for w in words])
        tokens, targets, which = [self.cls], [IGNORE_LABEL], [-1]
        for k, (w, first) in enumerate(zip(word_ids, firsts)):
            tokens.extend(int(t) for t in w)
            targets.extend(tags[k] if j == first else IGNORE_LABEL for j in range(len(w)))
            which.extend([k] * len(w))
        n = min(len(tokens), self.seq_len - 1)
        tokens, targets, which = tokens[:n] + [self.sep], targets[:n] + [IGNORE_LABEL], which[:n] + [-1]
        targets = pad_to(np.asarray(targets), self.seq_len, IGNORE_LABEL)
        return {
            "inputs": pad_to(np.asarray(tokens), self.seq_len, self.pad),
            "segment_ids": pad_to(np.ones(len(tokens)), self.seq_len, 0),
            "targets": targets,
            "weights": (targets != IGNORE_LABEL).astype(np.float32),
            "word_ids": pad_to(np.asarray(which), self.seq_len, -1),
        }


def first_answer(value: Any, field: str) -> tuple[str, int] | None:
    """``(text, char_start)`` of the first answer in a SQuAD-style ``{'text': [...], 'answer_start': [...]}``.

    Scalars instead of lists are accepted; ``None`` when the list is empty (unanswerable).
    """
    if not isinstance(value, Mapping) or "text" not in value or "answer_start" not in value:
        raise DataError(f"{field} must be a mapping with 'text' and 'answer_start' (SQuAD layout); set answers_field")
    texts, starts = value["text"], value["answer_start"]
    texts = [texts] if isinstance(texts, (str, bytes)) or np.ndim(texts) == 0 else list(texts)
    starts = [starts] if np.ndim(starts) == 0 else list(starts)
    if not texts or not starts:
        return None
    return str(_plain(texts[0])), int(_plain(starts[0]))


def qa_keep(row: dict[str, np.ndarray] | None) -> bool:
    """Filter for :class:`QARow` with ``impossible='drop'``: keeps rows that were not dropped."""
    return row is not None


class QARow(_EncoderTask):
    """Question, context and answer char span -> ``{inputs, segment_ids, token_types, start_position, end_position}``.

    Layout ``[cls] question [sep] context [sep]``; the question is cut to
    ``max_question_len`` tokens, the context to what is left. The context is encoded in
    three pieces split at the answer's characters, so the answer is whole tokens; positions
    are token indices in the row, ``end_position`` inclusive. Unanswerable records (no
    answer) get ``start = end = 0`` (the ``[cls]`` token, SQuAD 2.0's convention). When the
    answer lies past the cut, ``impossible='mark'`` does the same, ``'drop'`` returns
    ``None`` (filter with :func:`qa_keep`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        question_field: str = "question",
        context_field: str = "context",
        answers_field: str = "answers",
        max_question_len: int = 64,
        impossible: str = "drop",
    ) -> None:
        super().__init__(tokenizer, seq_len)
        self.impossible = check_choice(impossible, QA_IMPOSSIBLE, "impossible")
        self.question_field, self.context_field, self.answers_field = question_field, context_field, answers_field
        self.max_question_len = max_question_len

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray] | None:
        record, tok = element["record"], self.tokenizer
        context = text_of(record, self.context_field)
        if self.answers_field not in record:
            raise DataError(f"record has no field {self.answers_field!r}; set answers_field")
        answer = first_answer(record[self.answers_field], self.answers_field)
        question = tok.encode(text_of(record, self.question_field))[: self.max_question_len]
        budget = self.seq_len - len(question) - 3
        if budget < 1:
            raise DataError(f"seq_len={self.seq_len} leaves no room for the context; raise it or max_question_len")
        if answer is None:
            parts, span = [tok.encode(context)], None
        else:
            text, start = answer
            end = start + len(text)
            if context[start:end] != text:
                raise DataError(
                    f"record {element['index']}: {self.answers_field}.answer_start={start} does not point at "
                    f"{text!r} in the context; fix the record"
                )
            parts = [tok.encode(context[:start]), tok.encode(text), tok.encode(context[end:])]
            first = len(question) + 2 + len(parts[0])
            span = (first, first + len(parts[1]) - 1) if len(parts[1]) else None
        ctx = np.concatenate(parts)[:budget]
        row = encoder_row(question, ctx, cls=self.cls, sep=self.sep, pad=self.pad, seq_len=self.seq_len)
        last_context = len(question) + 1 + len(ctx)  # index of the final context token
        if span is not None and span[1] > last_context:
            if self.impossible == "drop":
                return None
            span = None
        start_pos, end_pos = span if span is not None else (0, 0)
        row["start_position"], row["end_position"] = np.int32(start_pos), np.int32(end_pos)
        return row
