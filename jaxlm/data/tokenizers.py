"""Tokenizers behind one interface.

Every tokenizer reserves the same special tokens, so objectives and models can rely on them:
``pad`` (id 0, never predicted), ``bos``, ``eos``. A tokenizer saves itself to a directory
(``save``) and is rebuilt from it (``load``), so a workdir carries what it was trained with.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence

import numpy as np

from jaxlm.common_types import DataError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(abc.ABC):
    """Maps text to integer ids and back."""

    name: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def pad_id(self) -> int:
        """Padding id; targets with this id carry zero loss weight."""
        return PAD_ID

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return BOS_ID

    @property
    def eos_id(self) -> int:
        """End-of-sequence id; separates documents in packed streams."""
        return EOS_ID

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Encode text to an int32 array of ids (no bos/eos added)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode ids to text; special ids are dropped."""

    def save(self, directory: str) -> None:
        """Write ``directory/tokenizer.json`` so :func:`load` can rebuild this tokenizer."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"jaxlm_tokenizer": self.name, **self._state()}, f)
        os.replace(tmp, path)

    def _state(self) -> dict:
        return {}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 3..258 are the bytes 0..255, after pad/bos/eos."""

    name = "byte"
    offset = len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return data.astype(np.int32) + self.offset

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= self.offset) & (arr < self.vocab_size)] - self.offset
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


TOKENIZERS: dict[str, type[Tokenizer]] = {"byte": ByteTokenizer}


def build(name: str) -> Tokenizer:
    """Build a tokenizer by config name (``config.data.tokenizer``)."""
    if name not in TOKENIZERS:
        raise DataError(f"config.data.tokenizer={name!r} is not one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


def load(directory: str) -> Tokenizer:
    """Rebuild the tokenizer saved in ``directory`` by :meth:`Tokenizer.save`."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise DataError(f"no {TOKENIZER_FILE} in {directory}; train there first or pass --workdir of a trained run")
    with open(path) as f:
        state = json.load(f)
    name = state.get("jaxlm_tokenizer", "")
    if name not in TOKENIZERS:
        raise DataError(f"{path}: unknown tokenizer {name!r}; valid: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()
