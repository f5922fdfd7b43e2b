"""Hugging Face ``tokenizer.json`` files (config name ``hf``), for imported models.

The ids are the file's own. Each special role is found, first match wins, from:

1. ``special_tokens={'pad': '[PAD]', ...}`` given to ``build``;
2. ``special_tokens_map.json`` or ``tokenizer_config.json`` beside the file (``pad_token``...);
3. the model's ``unk_token`` (for unk), then well-known names among the file's added tokens
   (``[PAD]``/``[CLS]``/``[SEP]``/``[MASK]``/``[UNK]`` for BERT, ``<|endoftext|>`` for GPT-2,
   ``<pad>``/``</s>``/``<unk>`` for T5, ``<s>``/``</s>``/``<mask>`` for RoBERTa);
4. :func:`jaxlm.data.tokenizers.complete_special_ids` for pad/bos/eos still missing (BERT's
   bos is ``[CLS]`` and eos ``[SEP]``; GPT-2 pads with ``<|endoftext|>``).

``encode`` adds no special tokens (no ``[CLS] ... [SEP]`` template); ``decode`` skips every
special token of the file. The ``tokenizers`` package is imported only when one is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data.tokenizers import (
    SPECIAL_ROLES,
    TOKENIZER_FILE,
    Tokenizer,
    complete_special_ids,
    expect_kind,
    load,
    write_atomic,
)

SAVED_FILE = "hf_tokenizer.json"  # in a jaxlm directory, beside jaxlm's own tokenizer.json
_SIDE_FILES = ("special_tokens_map.json", "tokenizer_config.json")
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` with jaxlm's special roles mapped onto its tokens."""

    name = "hf"

    def __init__(self, json_text: str, special_tokens: dict[str, str | None], source: str = "tokenizer.json") -> None:
        tokenizers = _import_tokenizers()
        self._json = json_text
        self._source = source
        try:
            self._tok = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # the Rust side raises a plain Exception for malformed files
            raise DataError(f"{source} is not a Hugging Face tokenizer.json ({e}); fix the path") from e
        self.special_tokens = dict(special_tokens)
        raw: dict[str, int | None] = {}
        for role, token in self.special_tokens.items():
            raw[role] = None if token is None else self._tok.token_to_id(token)
            if token is not None and raw[role] is None:
                raise DataError(
                    f"{source}: special token {role}={token!r} is not in its vocabulary; fix special_tokens"
                )
        self._special = complete_special_ids(raw, source)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> dict[str, int | None]:
        return dict(self._special)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` in the file's vocabulary (added tokens included), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._tok.decode(arr[(arr >= 0) & (arr < self.vocab_size)].tolist(), skip_special_tokens=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._json, "special_tokens": self.special_tokens, "source": self._source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["json"], state["special_tokens"], state["source"])

    def _save_files(self, directory: str) -> dict[str, Any]:
        write_atomic(os.path.join(directory, SAVED_FILE), self._json.encode("utf-8"))
        return {"file": SAVED_FILE, "special_tokens": self.special_tokens}

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any], directory: str) -> Tokenizer:
        path = os.path.join(directory, str(state.get("file", SAVED_FILE)))
        special = state.get("special_tokens")
        if not isinstance(special, dict):
            raise DataError(f"{os.path.join(directory, TOKENIZER_FILE)}: no 'special_tokens'; save the tokenizer again")
        return cls(_read_text(path), special, source=path)

    @classmethod
    def from_path(cls, name: str, path: str | None, **options: Any) -> Tokenizer:
        """Load a ``tokenizer.json`` (or a directory holding one); ``special_tokens`` overrides roles."""
        if not path:
            raise DataError("config.data.tokenizer='hf' needs the path of a Hugging Face tokenizer.json; give one")
        special_tokens = options.pop("special_tokens", None) or {}
        if options:
            raise DataError(f"hf tokenizer: unknown options {sorted(options)}; it takes only special_tokens")
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        text = _read_text(path)
        try:
            state = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not JSON ({e}); give a Hugging Face tokenizer.json") from e
        if isinstance(state, dict) and "jaxlm_tokenizer" in state:  # a directory jaxlm saved
            return expect_kind(load(path), cls, name, path)
        if not isinstance(state, dict) or "model" not in state:
            raise DataError(f"{path} has no 'model'; give a Hugging Face tokenizer.json")
        unknown = sorted(set(special_tokens) - set(SPECIAL_ROLES))
        if unknown:
            raise DataError(f"special_tokens: unknown roles {unknown}; valid: {', '.join(SPECIAL_ROLES)}")
        return cls(text, _find_special_tokens(state, os.path.dirname(path), special_tokens), source=path)


def _find_special_tokens(state: dict[str, Any], directory: str, given: dict[str, str]) -> dict[str, str | None]:
    """Find the token string of every role, by the precedence in the module docstring."""
    side: dict[str, str] = {}
    for filename in reversed(_SIDE_FILES):  # special_tokens_map.json wins over tokenizer_config.json
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path} is not readable JSON ({e}); fix or delete it") from e
            for role in SPECIAL_ROLES:
                value = data.get(f"{role}_token") if isinstance(data, dict) else None
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    side[role] = value
    added = {t.get("content") for t in state.get("added_tokens") or [] if isinstance(t, dict)}
    model = state.get("model") or {}
    model_unk = model.get("unk_token") if isinstance(model, dict) else None  # WordPiece, BPE
    vocab = model.get("vocab") if isinstance(model, dict) else None
    unk_index = model.get("unk_id") if isinstance(model, dict) else None  # Unigram: vocab is [[piece, score]]
    if isinstance(vocab, list) and isinstance(unk_index, int) and 0 <= unk_index < len(vocab):
        model_unk = vocab[unk_index][0] if isinstance(vocab[unk_index], list) and vocab[unk_index] else None
    elif not isinstance(model_unk, str) or not (model_unk in added or isinstance(vocab, dict) and model_unk in vocab):
        model_unk = None
    out: dict[str, str | None] = {}
    for role in SPECIAL_ROLES:
        # Well-known names count only as added tokens: a byte-level vocabulary may hold "</s>" as plain text.
        found = [t for t in _CANDIDATES[role] if t in added]
        if role == "unk" and model_unk:
            found.insert(0, model_unk)
        out[role] = given.get(role) or side.get(role) or (found[0] if found else None)
    return out


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path} does not exist; fix the path")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not readable UTF-8 text ({e}); fix the path") from e


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise DataError("config.data.tokenizer='hf' needs the 'tokenizers' package: pip install 'jaxlm[hf]'") from e
    return tokenizers
