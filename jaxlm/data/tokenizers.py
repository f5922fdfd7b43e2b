"""Tokenizers behind one interface.

Every tokenizer names the same seven special tokens, so objectives and models can rely on
them: ``pad`` (never predicted), ``bos``, ``eos``, ``unk``, ``mask``, ``cls`` and ``sep``.
The jaxlm-native tokenizers give them fixed ids:

=====================  ===  ===  ===  ====  =====  ===  ===  ===============================
tokenizer              pad  bos  eos  unk   mask   cls  sep  ordinary tokens
=====================  ===  ===  ===  ====  =====  ===  ===  ===============================
``byte``               0    1    2    259   260    261  262  bytes 0..255 at ids 3..258
``char``               0    1    2    3     4      5    6    sorted characters from 7
``sentencepiece_*``    0    1    2    3     4      5    6    pieces from 7
=====================  ===  ===  ===  ====  =====  ===  ===  ===============================

(``byte`` keeps its byte ids from before unk/mask/cls/sep existed; it never emits ``unk``.)
A Hugging Face ``tokenizer.json`` (``hf``) keeps the ids of its file; see
:mod:`jaxlm.data.tokenizers_hf` for how its special tokens are found.

``encode`` never adds bos/eos; ``decode`` drops pad/bos/eos/mask/cls/sep and writes ``unk``
as U+FFFD. A tokenizer saves itself to a directory (:meth:`Tokenizer.save`) and is rebuilt
from it (:func:`load`), so a workdir carries what it was trained with. Names, as used by
``config.data.tokenizer``, dispatch through :data:`TOKENIZERS`.
"""

from __future__ import annotations

import abc
import collections
import importlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from jaxlm.common_types import DataError

# Special-token roles, in id order for the native tokenizers, and their surface forms.
SPECIAL_ROLES = ("pad", "bos", "eos", "unk", "mask", "cls", "sep")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<cls>", "<sep>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID, CLS_ID, SEP_ID = range(len(SPECIAL_ROLES))
NATIVE_SPECIAL_IDS: dict[str, int] = dict(zip(SPECIAL_ROLES, range(len(SPECIAL_ROLES))))
UNK_TEXT = "\ufffd"  # what decode writes for unk, the same character a bad UTF-8 byte gives

TOKENIZER_FILE = "tokenizer.json"

# Config name -> "module:Class" implementing it. Modules load on first use, so importing this
# module needs neither sentencepiece nor tokenizers.
TOKENIZERS: dict[str, str] = {
    "byte": "jaxlm.data.tokenizers:ByteTokenizer",
    "char": "jaxlm.data.tokenizers:CharTokenizer",
    "sentencepiece_unigram": "jaxlm.data.tokenizers_sp:SentencePieceTokenizer",
    "sentencepiece_bpe": "jaxlm.data.tokenizers_sp:SentencePieceTokenizer",
    "hf": "jaxlm.data.tokenizers_hf:HFTokenizer",
}


class Tokenizer(abc.ABC):
    """Maps text to integer ids and back.

    Subclasses implement ``vocab_size``, ``encode``, ``decode`` and the constructors
    ``from_path`` / ``from_state`` / ``train`` they support; ``special_ids`` gives the id of
    each role in :data:`SPECIAL_ROLES` (``None`` where an imported tokenizer lacks it).
    """

    name: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def special_ids(self) -> dict[str, int | None]:
        """Id of every special role (``pad``, ``bos``, ... ``sep``); ``None`` where absent."""
        return dict(NATIVE_SPECIAL_IDS)

    @property
    def pad_id(self) -> int:
        """Padding id; targets with this id carry zero loss weight."""
        return self.special_id("pad")

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return self.special_id("bos")

    @property
    def eos_id(self) -> int:
        """End-of-sequence id; separates documents in packed streams."""
        return self.special_id("eos")

    @property
    def unk_id(self) -> int | None:
        """Id of unknown text; ``None`` only for an imported tokenizer without one."""
        return self.special_ids["unk"]

    @property
    def mask_id(self) -> int | None:
        """Masked-LM mask id; ``None`` only for an imported tokenizer without one."""
        return self.special_ids["mask"]

    @property
    def cls_id(self) -> int | None:
        """Classification id (start of a classified sequence); ``None`` only if imported without one."""
        return self.special_ids["cls"]

    @property
    def sep_id(self) -> int | None:
        """Segment separator id; ``None`` only for an imported tokenizer without one."""
        return self.special_ids["sep"]

    def special_id(self, role: str) -> int:
        """Id of special ``role``; a :class:`DataError` if this tokenizer has none (say, mask for GPT-2)."""
        if role not in SPECIAL_ROLES:
            raise ValueError(f"unknown special role {role!r}; valid: {', '.join(SPECIAL_ROLES)}")
        value = self.special_ids[role]
        if value is None:
            raise DataError(
                f"tokenizer {self.name!r} has no {role} token; pick a tokenizer with one "
                f"(the jaxlm-native ones all have it) or an objective that does not need it"
            )
        return value

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Encode text to an int32 array of ids (no bos/eos added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode each text; tokenizers with a faster batch path override this."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode ids to text; special ids are dropped (unk is written as U+FFFD)."""

    def save(self, directory: str) -> None:
        """Write ``directory/tokenizer.json`` (and model files) so :func:`load` can rebuild this tokenizer."""
        os.makedirs(directory, exist_ok=True)
        state = {"jaxlm_tokenizer": self.name, "vocab_size": self.vocab_size, **self._save_files(directory)}
        write_atomic(os.path.join(directory, TOKENIZER_FILE), json.dumps(state, ensure_ascii=False).encode())

    def _save_files(self, directory: str) -> dict[str, Any]:
        """Write any model files into ``directory``; return the JSON state :meth:`from_state` reads."""
        return {}

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any], directory: str) -> Tokenizer:
        """Rebuild from the state (and files) that :meth:`save` wrote into ``directory``."""
        return cls()

    @classmethod
    def from_path(cls, name: str, path: str | None, **options: Any) -> Tokenizer:
        """Build ``name`` from a file or directory (or from nothing, where no file is needed)."""
        raise DataError(
            f"config.data.tokenizer={name!r} is built from data: train it (jaxlm.data.tokenizers.train) "
            f"or give the path of a trained one"
        )

    @classmethod
    def train(cls, name: str, texts: Iterable[str], vocab_size: int, **options: Any) -> Tokenizer:
        """Train ``name`` on ``texts`` with at most ``vocab_size`` ids (0: the tokenizer's choice)."""
        raise DataError(f"config.data.tokenizer={name!r} cannot be trained; give the path of its tokenizer file")


def complete_special_ids(ids: dict[str, int | None], source: str) -> dict[str, int | None]:
    """Fill the roles an imported tokenizer lacks from the ones it has, the way Hugging Face does.

    ``eos`` falls back to ``sep`` then ``bos``; ``bos`` to ``cls`` then ``eos``; ``pad`` to
    ``eos`` (so GPT-2 pads with ``<|endoftext|>``). unk/mask/cls/sep stay ``None`` when absent.
    ``source`` names the file in the error raised when not even ``eos`` can be found.
    """
    out = {role: ids.get(role) for role in SPECIAL_ROLES}
    if out["eos"] is None:
        out["eos"] = out["sep"] if out["sep"] is not None else out["bos"]
    if out["bos"] is None:
        out["bos"] = out["cls"] if out["cls"] is not None else out["eos"]
    if out["pad"] is None:
        out["pad"] = out["eos"]
    if out["eos"] is None:
        raise DataError(
            f"{source}: no end-of-sequence token found; pass special_tokens={{'eos': '<its eos token>'}} to build()"
        )
    return out


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _as_id_array(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 3..258 are the bytes 0..255, after pad/bos/eos; unk/mask/cls/sep follow at 259..262."""

    name = "byte"
    offset = 3  # pad, bos, eos come before the bytes

    @property
    def vocab_size(self) -> int:
        return self.offset + 256 + 4

    @property
    def special_ids(self) -> dict[str, int | None]:
        after = self.offset + 256  # unk, mask, cls, sep come after the bytes
        return dict(zip(SPECIAL_ROLES, (PAD_ID, BOS_ID, EOS_ID, after, after + 1, after + 2, after + 3)))

    def encode(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return data.astype(np.int32) + self.offset

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = _as_id_array(ids)
        unk = self.special_ids["unk"]
        # Bytes between unk ids decode on their own, so an unk stays one U+FFFD.
        parts = np.split(arr, np.flatnonzero(arr == unk))
        out = []
        for i, part in enumerate(parts):
            part = part[(part >= self.offset) & (part < self.offset + 256)] - self.offset
            out.append((UNK_TEXT if i else "") + part.astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        return "".join(out)

    @classmethod
    def from_path(cls, name: str, path: str | None, **options: Any) -> Tokenizer:
        return cls()

    @classmethod
    def train(cls, name: str, texts: Iterable[str], vocab_size: int, **options: Any) -> Tokenizer:
        # Nothing to learn; training only exists so that every name can go through train().
        return cls()


class CharTokenizer(Tokenizer):
    """Characters (Unicode code points) seen in training, sorted, at ids 7..; unseen ones map to unk."""

    name = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise DataError("char tokenizer: 'chars' must be distinct single characters; retrain the tokenizer")
        self.chars = list(chars)
        first = len(SPECIAL_ROLES)
        self._ids = {c: i + first for i, c in enumerate(self.chars)}
        self._table = np.array(list(SPECIAL_TOKENS) + self.chars, dtype=object)
        self._table[UNK_ID] = UNK_TEXT
        for role in ("pad", "bos", "eos", "mask", "cls", "sep"):
            self._table[NATIVE_SPECIAL_IDS[role]] = ""

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_ROLES) + len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        get = self._ids.get
        return np.fromiter((get(c, UNK_ID) for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = _as_id_array(ids)
        arr = arr[(arr >= 0) & (arr < self.vocab_size)]
        return "".join(self._table[arr].tolist())

    def _save_files(self, directory: str) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any], directory: str) -> Tokenizer:
        if not isinstance(state.get("chars"), list):
            raise DataError(f"{os.path.join(directory, TOKENIZER_FILE)}: no 'chars' list; retrain the char tokenizer")
        return cls(state["chars"])

    @classmethod
    def from_path(cls, name: str, path: str | None, **options: Any) -> Tokenizer:
        if not path:
            return super().from_path(name, path)
        return expect_kind(load(path), cls, name, path)

    @classmethod
    def train(cls, name: str, texts: Iterable[str], vocab_size: int, **options: Any) -> Tokenizer:
        """Keep every character seen, or the ``vocab_size - 7`` most frequent (ties by code point)."""
        if options:
            raise DataError(f"char tokenizer: unknown training options {sorted(options)}; it takes only vocab_size")
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(text)
        if not counts:
            raise DataError("char tokenizer: the training texts are empty; check config.data.files")
        chars = sorted(counts)
        if vocab_size:
            keep = vocab_size - len(SPECIAL_ROLES)
            if keep < 1:
                raise DataError(f"char tokenizer: vocab_size={vocab_size} leaves no room after 7 special tokens")
            chars = sorted(sorted(chars, key=lambda c: -counts[c])[:keep])
        return cls(chars)


def expect_kind(tok: Tokenizer, cls: type, name: str, path: str) -> Tokenizer:
    """``tok``, after checking it is a ``cls`` (the class of config name ``name``) loaded from ``path``."""
    if not isinstance(tok, cls):
        raise DataError(f"{path} holds a {tok.name!r} tokenizer, not {name!r}; fix config.data.tokenizer or the path")
    return tok


def tokenizer_class(name: str) -> type[Tokenizer]:
    """Return the class implementing config name ``name``; a :class:`DataError` lists valid names otherwise."""
    if name not in TOKENIZERS:
        raise DataError(f"config.data.tokenizer={name!r} is not one of: {', '.join(TOKENIZERS)}")
    module, attr = TOKENIZERS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build(name: str, path: str | None = None, **options: Any) -> Tokenizer:
    """Build a tokenizer by config name (``config.data.tokenizer``).

    ``byte`` needs nothing. The others read ``path``: for ``char`` and ``sentencepiece_*`` a
    directory written by :func:`train` (``sentencepiece_*`` also takes a ``.model`` file); for
    ``hf`` a ``tokenizer.json`` file or a directory holding one (``options`` may carry
    ``special_tokens={'pad': '[PAD]', ...}``).
    """
    return tokenizer_class(name).from_path(name, path or None, **options)


def train(name: str, texts: Iterable[str], directory: str | None, vocab_size: int = 0, **options: Any) -> Tokenizer:
    """Train tokenizer ``name`` offline on ``texts`` and save it in ``directory`` (unless ``None``).

    ``vocab_size`` counts the 7 special tokens; 0 lets ``char`` keep every character and the
    SentencePiece kinds make 8000 ids or as many as ``texts`` support.
    ``options`` go to the trainer (for SentencePiece, any
    ``SentencePieceTrainer`` flag such as ``character_coverage`` or ``byte_fallback``).
    Run it on one process only; the files are written atomically.
    """
    tok = tokenizer_class(name).train(name, texts, vocab_size, **options)
    if directory is not None:
        tok.save(directory)
        _add_to_state(directory, {"train_vocab_size": vocab_size})
    return tok


def _add_to_state(directory: str, extra: dict[str, Any]) -> None:
    path = os.path.join(directory, TOKENIZER_FILE)
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    write_atomic(path, json.dumps({**state, **extra}, ensure_ascii=False).encode())


def load(directory: str) -> Tokenizer:
    """Rebuild the tokenizer saved in ``directory`` by :meth:`Tokenizer.save`.

    ``directory`` may also be a ``tokenizer.json`` file, or a Hugging Face model directory
    (its ``tokenizer.json`` is then loaded as ``hf``).
    """
    path = directory if directory.endswith(".json") else os.path.join(directory, TOKENIZER_FILE)
    directory = os.path.dirname(path)
    if not os.path.isfile(path):
        raise DataError(f"no {TOKENIZER_FILE} in {directory}; train there first or pass --workdir of a trained run")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); delete it and train again") from e
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a tokenizer file; delete it and train again")
    if "jaxlm_tokenizer" not in state and "model" in state:  # a Hugging Face tokenizer.json
        return build("hf", path)
    name = state.get("jaxlm_tokenizer", "")
    if name not in TOKENIZERS:
        raise DataError(f"{path}: unknown tokenizer {name!r}; valid: {', '.join(TOKENIZERS)}")
    return tokenizer_class(name).from_state(name, state, directory)


def load_or_train(
    name: str,
    directory: str,
    texts: Callable[[], Iterable[str]] | None = None,
    vocab_size: int = 0,
    *,
    path: str | None = None,
    **options: Any,
) -> Tokenizer:
    """Reuse the tokenizer saved in ``directory`` (a workdir), or make it and save it there.

    Making it means ``build(name, path)`` when ``path`` is given (or ``texts`` is ``None``),
    else training on ``texts()``, called only then. A saved tokenizer of another name, or
    trained for another ``vocab_size``, is an error rather than silently reused: its ids are
    what the checkpoints in ``directory`` were trained with.
    """
    saved_path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(saved_path):
        if path or texts is None:
            tok = build(name, path, **options)
            tok.save(directory)
            return tok
        return train(name, texts(), directory, vocab_size, **options)
    tok = load(directory)
    if tok.name != name:
        raise DataError(
            f"{saved_path} holds a {tok.name!r} tokenizer, not config.data.tokenizer={name!r}; "
            "use a fresh workdir or set it back"
        )
    with open(saved_path, encoding="utf-8") as f:
        saved = json.load(f).get("train_vocab_size", vocab_size)
    if saved != vocab_size:
        raise DataError(
            f"{saved_path} was trained with vocab_size={saved}, not {vocab_size}; use a fresh workdir or set it back"
        )
    return tok
