"""Pre-training objectives as grain transforms: masked LM and next-sentence pairs.

Each objective turns a token sequence into one model-ready row of fixed shape. Randomness
comes from a per-example generator, :func:`example_rng`, seeded by ``(seed, objective,
epoch, document index, piece index)`` (or by the row counter of a concatenated stream), so
batches are deterministic for a seed, identical after a resume or with worker processes,
and yet a document gets a fresh mask every epoch (dynamic masking).

Row conventions (T is the row length): ``inputs`` int32 ``[T]``; ``targets`` int32;
``weights`` float32, 1 where a target is scored; ``segment_ids`` int32, 1 on real tokens and
0 on padding (the attention padding mask, as in packed causal LM); ``token_types`` int32,
0 for the first segment of a pair and 1 for the second.

Whole-word masking groups tokens into words by this rule: a token *starts a word* when
decoding it right after an ordinary letter puts whitespace in front of its text (the
SentencePiece ``▁`` and GPT-2 ``Ġ`` markers, a WordPiece token without ``##``, and for the
``byte`` / ``char`` tokenizers a whitespace byte or character); a word is a token that starts
a word plus the tokens after it that do not. For ``byte``, ``"the cat"`` has the words
``the`` and `` cat``. Special tokens are never masked and are words of their own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data.packing import LONG_DOCUMENTS, chunks, pad_to
from jaxlm.data.tokenizers import SPECIAL_ROLES, Tokenizer

IGNORE_LABEL = -100  # per-token label of positions that carry no loss (weights 0), as in Hugging Face

# Distinct streams of randomness per objective, so two objectives on one seed are independent.
SALT_MASK, SALT_NSP, SALT_SPANS = 1, 2, 3  # SALT_SPANS: objectives_t5


def example_rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``key`` (say objective, epoch, index, piece)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 63), *(int(k) for k in key)]))


def text_of(record: Mapping[str, Any], field: str) -> str:
    """``record[field]`` as text (tfds stores strings as bytes); a :class:`DataError` if absent."""
    if not isinstance(record, Mapping) or field not in record:
        fields = ", ".join(map(str, record)) if isinstance(record, Mapping) else type(record).__name__
        raise DataError(f"record has no field {field!r} (it has: {fields}); set the objective's field argument")
    value = record[field]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return str(value)


class TokenTable:
    """Per-id facts about a tokenizer's vocabulary: special ids, ordinary ids, word starts."""

    def __init__(self, tokenizer: Tokenizer, *, words: bool = False) -> None:
        vocab = tokenizer.vocab_size
        self.special = np.zeros(vocab, bool)
        for role in SPECIAL_ROLES:
            sid = tokenizer.special_ids[role]
            if sid is not None and 0 <= sid < vocab:
                self.special[sid] = True
        self.ordinary = np.flatnonzero(~self.special).astype(np.int32)
        # Only whole-word masking needs word starts: it costs one decode per vocabulary id.
        self.starts_word = word_start_table(tokenizer, self.special) if words else None


def document_tokens(
    tokenizer: Tokenizer, record: Mapping[str, Any], field: str, *, add_bos: bool = False
) -> np.ndarray:
    """``[bos] ids eos`` of ``record[field]``: one causal-LM document (int32)."""
    ids = tokenizer.encode(text_of(record, field))
    parts = ([[tokenizer.bos_id]] if add_bos else []) + [ids, [tokenizer.eos_id]]
    return np.concatenate(parts).astype(np.int32)


def word_start_table(tokenizer: Tokenizer, special: np.ndarray) -> np.ndarray:
    """``starts_word[id]``: whether a token begins a new word (see the module docstring for the rule)."""
    letter = tokenizer.encode("a")
    ref = [int(letter[-1])] if len(letter) else []
    prefix = len(tokenizer.decode(ref))
    starts = np.zeros(len(special), bool)
    for i in range(len(special)):
        if special[i]:
            starts[i] = True
            continue
        text = tokenizer.decode([*ref, i])[prefix:]
        starts[i] = bool(text) and text[0].isspace()
    return starts


def word_ids(tokens: np.ndarray, starts_word: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Word index of each token (consecutive from 0); special tokens get a word of their own."""
    starts = starts_word[tokens] | special[tokens]
    starts[0] = True
    after_special = np.zeros(len(tokens), bool)
    after_special[1:] = special[tokens[:-1]]  # a word never continues across a special token
    return np.cumsum(starts | after_special) - 1


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    table: TokenTable,
    mask_id: int,
    rate: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    whole_word: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one sequence: returns ``(inputs, selected)``.

    ``round(rate * n)`` (at least 1) of the ``n`` non-special tokens are selected, in whole
    words when ``whole_word`` (words in random order, skipping a word that would overshoot,
    as Google's ``create_pretraining_data.py``). Each selected token independently becomes
    ``mask_id`` (``mask_fraction``), a uniformly random non-special id (``random_fraction``)
    or stays unchanged (the rest).
    """
    tokens = np.asarray(tokens)
    maskable = ~table.special[tokens]
    n = int(maskable.sum())
    selected = np.zeros(len(tokens), bool)
    if n == 0 or rate <= 0:
        return tokens.copy(), selected
    budget = max(1, int(round(n * rate)))
    if whole_word:
        assert table.starts_word is not None, "TokenTable(words=True) is needed for whole-word masking"
        words = word_ids(tokens, table.starts_word, table.special)
        candidates = np.unique(words[maskable])
        count = 0
        for w in rng.permutation(candidates):
            members = words == w
            size = int(members.sum())
            if count + size > budget:
                continue
            selected |= members
            count += size
            if count == budget:
                break
    else:
        selected[rng.choice(np.flatnonzero(maskable), size=budget, replace=False)] = True
    u = rng.random(len(tokens))
    inputs = tokens.copy()
    to_mask = selected & (u < mask_fraction)
    to_random = selected & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.choice(table.ordinary, size=int(to_random.sum()))
    return inputs, selected


class MaskedLMRow(grain.transforms.Map):
    """``{tokens, key[, token_types, nsp_label]}`` -> padded masked-LM row.

    Output: ``inputs`` (masked), ``targets`` (the original ids), ``weights`` (1 only at the
    selected positions), ``segment_ids``, ``token_types``, and ``nsp_label`` when given.
    """

    def __init__(
        self,
        table: TokenTable,
        *,
        seq_len: int,
        seed: int,
        mask_id: int,
        pad_id: int,
        rate: float = 0.15,
        whole_word: bool = False,
    ) -> None:
        if not 0.0 <= rate < 1.0:
            raise DataError(f"mask_rate={rate} must be in [0, 1); BERT uses 0.15")
        self.table, self.seq_len, self.seed = table, seq_len, seed
        self.mask_id, self.pad_id, self.rate, self.whole_word = mask_id, pad_id, rate, whole_word

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        tokens = element["tokens"]
        rng = example_rng(self.seed, SALT_MASK, *element["key"])
        inputs, selected = mask_tokens(
            tokens, rng, table=self.table, mask_id=self.mask_id, rate=self.rate, whole_word=self.whole_word
        )
        n, length = len(tokens), self.seq_len
        token_types = element.get("token_types", np.zeros(n, np.int32))
        row = {
            "inputs": pad_to(inputs, length, self.pad_id),
            "targets": pad_to(tokens, length, self.pad_id),
            "weights": pad_to(selected, length, 0, np.float32),
            "segment_ids": pad_to(np.ones(n), length, 0),
            "token_types": pad_to(token_types, length, 0),
        }
        if "nsp_label" in element:
            row["nsp_label"] = np.int32(element["nsp_label"])
        return row


class DocumentPieces(grain.experimental.FlatMapTransform):
    """Keyed document -> ``[cls] piece [sep]`` token sequences of at most ``seq_len``, keyed by piece."""

    max_fan_out = 1 << 20

    def __init__(self, tokenizer: Tokenizer, *, seq_len: int, field: str, long_documents: str) -> None:
        if seq_len < 3:
            raise DataError(f"seq_len={seq_len} leaves no room for a token between [cls] and [sep]; raise it")
        if long_documents not in LONG_DOCUMENTS:
            raise DataError(f"long_documents={long_documents!r} is not one of: {', '.join(LONG_DOCUMENTS)}")
        self.tokenizer, self.seq_len, self.field, self.long_documents = tokenizer, seq_len, field, long_documents
        self.cls, self.sep = tokenizer.special_id("cls"), tokenizer.special_id("sep")

    def flat_map(self, element: dict[str, Any]) -> list[dict[str, Any]]:
        ids = self.tokenizer.encode(text_of(element["record"], self.field))
        pieces = chunks(ids, self.seq_len - 2, long_documents=self.long_documents)
        key = (element["epoch"], element["index"])
        return [
            {"tokens": np.concatenate([[self.cls], p, [self.sep]]).astype(np.int32), "key": (*key, j)}
            for j, p in enumerate(pieces)
        ]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: its non-empty lines, further cut after ``.``, ``!`` or ``?`` followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def truncate_pair(a: np.ndarray, b: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop tokens from the end of the longer of ``a`` and ``b`` until both fit in ``budget`` (BERT's rule)."""
    la, lb = len(a), len(b)
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


NSP_IS_NEXT, NSP_RANDOM = 0, 1  # Hugging Face BERT's next_sentence_label convention


class NextSentencePairs(grain.experimental.FlatMapTransform):
    """Keyed document -> ``[cls] A [sep] B [sep]`` pairs, one per sentence A that has a successor.

    With probability ``1 - random_rate`` B is the sentence after A (``nsp_label`` 0,
    :data:`NSP_IS_NEXT`, as Hugging Face's ``next_sentence_label``); otherwise B is a random
    sentence of another document (``nsp_label`` 1, :data:`NSP_RANDOM`). A document of one
    sentence gives one pair, always with a random B. ``token_types`` are 0 on ``[cls] A
    [sep]`` and 1 on ``B [sep]``; the longer of A and B is cut from its end to fit ``seq_len``.
    """

    max_fan_out = 1 << 20

    def __init__(
        self,
        source: Any,
        indices: Sequence[int],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        seed: int,
        field: str,
        random_rate: float = 0.5,
    ) -> None:
        if seq_len < 5:
            raise DataError(f"seq_len={seq_len} leaves no room for two sentences after [cls] [sep] [sep]; raise it")
        if len(indices) < 2:
            raise DataError("next-sentence pairs need at least 2 documents (one to draw random sentences from)")
        self.source, self.indices, self.tokenizer = source, np.asarray(indices), tokenizer
        self.seq_len, self.seed, self.field, self.random_rate = seq_len, seed, field, random_rate
        self.cls, self.sep = tokenizer.special_id("cls"), tokenizer.special_id("sep")

    def _random_sentence(self, rng: np.random.Generator, exclude: int) -> str:
        for _ in range(10):  # skip empty documents
            other = int(self.indices[rng.integers(len(self.indices))])
            if other == exclude:
                continue
            sentences = split_sentences(text_of(self.source[other], self.field))
            if sentences:
                return sentences[rng.integers(len(sentences))]
        return ""

    def flat_map(self, element: dict[str, Any]) -> list[dict[str, Any]]:
        sentences = split_sentences(text_of(element["record"], self.field))
        epoch, index = element["epoch"], element["index"]
        out = []
        for j in range(max(len(sentences) - 1, 1) if sentences else 0):
            rng = example_rng(self.seed, SALT_NSP, epoch, index, j)
            if j + 1 < len(sentences) and rng.random() >= self.random_rate:
                label, b_text = NSP_IS_NEXT, sentences[j + 1]
            else:
                label, b_text = NSP_RANDOM, self._random_sentence(rng, index)
            a, b = truncate_pair(self.tokenizer.encode(sentences[j]), self.tokenizer.encode(b_text), self.seq_len - 3)
            tokens = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]]).astype(np.int32)
            types = np.concatenate([np.zeros(len(a) + 2, np.int32), np.ones(len(b) + 1, np.int32)])
            out.append({"tokens": tokens, "token_types": types, "nsp_label": label, "key": (epoch, index, j)})
        return out
