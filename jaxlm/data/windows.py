"""Causal-LM rows drawn at uniformly random offsets of the tokenized training text (nanoGPT's ``get_batch``).

``packing='windows'``: this host's training documents are tokenized once, each ended by
``eos``, into one token stream held in memory (``uint16`` when the vocabulary fits, else
``int32``); row ``k`` of the run is the ``seq_len + 1`` tokens starting at an offset drawn
from ``(seed, shard, k)`` alone. Rows are therefore independent draws from the whole text, as
nanoGPT trains: a batch mixes many documents and a short run already sees all of the text,
where ``concat`` reads the shuffled documents' chunks in order, so consecutive batches come
from the same document and a run shorter than an epoch sees only the documents it reached.
The row index is the iterator's position, so checkpoints resume with the same rows.

Evaluation keeps ``concat`` (one deterministic pass over fixed chunks). Holding the tokenized
text in memory suits local corpora (the built-in one is ~4M tokens, 8 MB, tokenized in under a
second); ``packing='auto'`` therefore picks ``windows`` for ``builtin``, ``files`` and
``synthetic`` sources and ``concat`` for catalog datasets, which are streamed.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data import objectives
from jaxlm.data.sources import TextSource
from jaxlm.data.tokenizers import Tokenizer


def token_stream(
    source: TextSource,
    tokenizer: Tokenizer,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    add_bos: bool = False,
    text_field: str = "text",
) -> np.ndarray:
    """The documents ``shard_index::shard_count`` of ``source``, tokenized and ended by ``eos``, as one array.

    The last stream is kept for the same source and tokenizer objects: the trainer builds a
    throwaway pipeline to read the batch shapes before the real one, and must not tokenize twice.
    """
    global _last
    if len(source) == 0:
        raise DataError("the data source has no documents; check config.data.files")
    if len(source) < shard_count:
        raise DataError(f"{len(source)} documents cannot be sharded over {shard_count} hosts; add documents")
    key = (shard_index, shard_count, add_bos, text_field)
    if _last is not None and _last[0] is source and _last[1] is tokenizer and _last[2] == key:
        return _last[3]
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    parts = [
        objectives.document_tokens(tokenizer, source[i], text_field, add_bos=add_bos).astype(dtype)
        for i in range(shard_index, len(source), shard_count)
    ]
    stream = np.concatenate(parts)
    _last = (source, tokenizer, key, stream)
    return stream


# (source, tokenizer, options, stream) of the last token_stream call.
_last: tuple[Any, Any, tuple, np.ndarray] | None = None


class _Window(grain.transforms.MapWithIndex):
    """Row index ``k`` -> ``{inputs, targets, weights}`` from the window at offset ``rng(seed, shard, k)``."""

    def __init__(self, stream: np.ndarray, seq_len: int, seed: int, shard: int, pad_id: int) -> None:
        self.stream, self.seq_len, self.key, self.pad_id = stream, seq_len, (seed, shard), pad_id

    def map_with_index(self, k: int, _: Any) -> dict[str, np.ndarray]:
        start = int(np.random.default_rng((*self.key, k)).integers(len(self.stream) - self.seq_len))
        row = self.stream[start : start + self.seq_len + 1].astype(np.int32)
        targets = row[1:]
        return {"inputs": row[:-1], "targets": targets, "weights": (targets != self.pad_id).astype(np.float32)}


def window_rows(stream: np.ndarray, *, seq_len: int, seed: int, pad_id: int, shard_index: int = 0) -> grain.MapDataset:
    """Endless rows of ``seq_len`` inputs and targets at offsets of ``stream`` drawn from ``(seed, shard_index)``."""
    if len(stream) < seq_len + 2:  # shorter than a row: repeated, as concat's epochs would fill a row
        stream = np.tile(stream, -(-(seq_len + 2) // len(stream)))
    # One "epoch" is as many rows as non-overlapping chunks fit: only the index count matters here.
    epoch = max(1, len(stream) // (seq_len + 1))
    window = _Window(stream, seq_len, seed, shard_index, pad_id)
    return grain.MapDataset.range(epoch).repeat(None).map_with_index(window)
