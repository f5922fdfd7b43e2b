"""SentencePiece tokenizers (``sentencepiece_unigram``, ``sentencepiece_bpe``), trained offline.

Training fixes the special ids of :mod:`jaxlm.data.tokenizers` (pad 0, bos 1, eos 2, unk 3,
mask 4, cls 5, sep 6, as control symbols that text can never produce) and, by default,
keeps text as it is (``normalization_rule_name='identity'``, extra whitespace kept,
newline and carriage return as pieces of their own), so ``decode(encode(text)) == text`` for every
character seen in training. Training is deterministic: lines beyond ``input_sentence_size``
are sampled here with a fixed ``seed``. Unseen characters become ``unk`` (decoded as U+FFFD) unless
``byte_fallback=True``. A ``.model`` file trained elsewhere also loads; its special ids are
read from the model.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from jaxlm.common_types import DataError
from jaxlm.data.tokenizers import (
    NATIVE_SPECIAL_IDS,
    SPECIAL_ROLES,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    UNK_TEXT,
    Tokenizer,
    complete_special_ids,
    expect_kind,
    load,
    write_atomic,
)

MODEL_FILE = "sentencepiece.model"
# vocab_size=0 (config.data.tokenizer_vocab_size's default): this many ids, or as many as the corpus supports.
DEFAULT_VOCAB_SIZE = 8000
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
DEFAULT_MAX_SENTENCES = 1_000_000  # lines trained on, as SentencePiece's README suggests

# Trainer flags that pin the special ids; callers may not override them.
_PINNED_FLAGS: dict[str, Any] = {
    **{f"{role}_id": NATIVE_SPECIAL_IDS[role] for role in ("pad", "bos", "eos", "unk")},
    **{f"{role}_piece": SPECIAL_TOKENS[NATIVE_SPECIAL_IDS[role]] for role in ("pad", "bos", "eos", "unk")},
    "control_symbols": [SPECIAL_TOKENS[NATIVE_SPECIAL_IDS[role]] for role in ("mask", "cls", "sep")],
}
# Defaults chosen for lossless round trips; callers may override them.
_DEFAULT_FLAGS: dict[str, Any] = {
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "user_defined_symbols": ["\n", "\r"],  # the trainer reads lines, so it would never learn these
    "unk_surface": UNK_TEXT,
    "max_sentence_length": 1 << 14,  # bytes; longer lines are skipped, and 4192 drops long paragraphs
    "minloglevel": 2,
}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (unigram or BPE), held as its serialized bytes."""

    def __init__(self, name: str, model_proto: bytes, source: str = "sentencepiece model") -> None:
        self.name = name
        self._proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{source} is not a SentencePiece model ({e}); train one with jaxlm") from e
        sp = self._sp
        raw: dict[str, int | None] = {}
        for role, getter in (("pad", sp.pad_id), ("bos", sp.bos_id), ("eos", sp.eos_id), ("unk", sp.unk_id)):
            raw[role] = getter() if getter() >= 0 else None
        for role in ("mask", "cls", "sep"):
            i = sp.piece_to_id(SPECIAL_TOKENS[NATIVE_SPECIAL_IDS[role]])
            raw[role] = i if i != sp.unk_id() else None  # piece_to_id answers unk for unknown pieces
        self._special = complete_special_ids(raw, source)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int | None]:
        return dict(self._special)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._proto

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        # SentencePiece drops control pieces itself; ids outside the vocabulary would raise.
        return self._sp.decode(arr[(arr >= 0) & (arr < self.vocab_size)].tolist())

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the bytes, not the C++ processor, so grain worker processes get a copy.
        return {"name": self.name, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["proto"])

    def _save_files(self, directory: str) -> dict[str, Any]:
        write_atomic(os.path.join(directory, MODEL_FILE), self._proto)
        return {"model_file": MODEL_FILE}

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any], directory: str) -> Tokenizer:
        path = os.path.join(directory, str(state.get("model_file", MODEL_FILE)))
        return cls(name, _read(path), source=path)

    @classmethod
    def from_path(cls, name: str, path: str | None, **options: Any) -> Tokenizer:
        """Load a directory written by ``train``/``save``, or a ``.model`` file."""
        if not path:
            return super().from_path(name, path)
        if os.path.isdir(path) or path.endswith(TOKENIZER_FILE):
            return expect_kind(load(path), cls, name, path)
        return cls(name, _read(path), source=path)

    @classmethod
    def train(cls, name: str, texts: Iterable[str], vocab_size: int, **options: Any) -> Tokenizer:
        """Train with ``SentencePieceTrainer``; ``options`` are its flags.

        ``input_sentence_size`` (default 1,000,000; 0 keeps all) caps the lines trained on: a
        uniform sample drawn here with ``seed`` (default 0), because SentencePiece's own
        sampling differs from run to run. ``vocab_size=0`` means :data:`DEFAULT_VOCAB_SIZE`, capped
        at what the corpus supports (the result's ``vocab_size`` tells); an explicit size the
        corpus cannot fill is a :class:`DataError` naming the largest it can.
        """
        model_type = name.removeprefix("sentencepiece_")
        auto = vocab_size == 0
        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        if vocab_size <= len(SPECIAL_ROLES):
            raise DataError(f"{name}: vocab_size={vocab_size} must be > 7 (the special tokens); set it")
        pinned = sorted(set(options) & (set(_PINNED_FLAGS) | {"model_type", "vocab_size", "shuffle_input_sentence"}))
        if pinned:
            raise DataError(f"{name}: training options {pinned} are fixed by jaxlm (special ids, sampling); drop them")
        seed = int(options.pop("seed", 0))
        limit = int(options.pop("input_sentence_size", DEFAULT_MAX_SENTENCES))
        sentences = _sample(_sentences(texts), limit, seed)
        if not sentences:
            raise DataError(f"{name}: the training texts are empty; check config.data.files")
        flags = {**_DEFAULT_FLAGS, **options, **_PINNED_FLAGS, "model_type": model_type}
        try:
            return cls(name, _train_model(sentences, seed, flags, vocab_size))
        except (RuntimeError, ValueError, TypeError) as e:
            reason = str(e).split("]")[-1].strip() or str(e)
            too_high = _TOO_HIGH.search(reason)
            if too_high is None:
                raise DataError(f"{name}: SentencePiece training failed: {reason}") from e
            most = int(too_high.group(2))
        if not auto or most <= len(SPECIAL_ROLES):
            raise DataError(
                f"{name}: SentencePiece training failed: Vocabulary size too high ({vocab_size}): the corpus supports "
                f"at most {most} ids; lower config.data.tokenizer_vocab_size (0 = {DEFAULT_VOCAB_SIZE} capped to the "
                "corpus) or add text"
            )
        try:  # the default size, capped at the corpus's
            return cls(name, _train_model(sentences, seed, flags, most))
        except (RuntimeError, ValueError, TypeError) as e:
            reason = str(e).split("]")[-1].strip() or str(e)
            raise DataError(f"{name}: SentencePiece training failed: {reason}") from e


def _train_model(sentences: list[str], seed: int, flags: dict[str, Any], vocab_size: int) -> bytes:
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=writer, input_sentence_size=0, vocab_size=vocab_size, **flags
    )
    return writer.getvalue()


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of ``texts``: the trainer reads one line per sentence."""
    for text in texts:
        for line in text.replace("\r", "\n").split("\n"):
            if line:
                yield line


def _sample(items: Iterator[str], limit: int, seed: int) -> list[str]:
    """Draw a uniform sample of at most ``limit`` items (all if ``limit <= 0``), in their original order."""
    if limit <= 0:
        return list(items)
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, item in enumerate(items):  # reservoir sampling ("algorithm R")
        if i < limit:
            reservoir.append((i, item))
        else:
            j = int(rng.random() * (i + 1))
            if j < limit:
                reservoir[j] = (i, item)
    return [item for _, item in sorted(reservoir)]


def _read(path: str) -> bytes:
    if not os.path.isfile(path):
        raise DataError(f"SentencePiece model {path} does not exist; train the tokenizer or fix the path")
    with open(path, "rb") as f:
        return f.read()
