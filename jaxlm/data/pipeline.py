"""Deterministic, resumable grain pipelines producing host-local numpy batches.

Causal LM: documents are shuffled (per epoch, by seed), tokenized, terminated with ``eos``,
concatenated and cut into rows of ``seq_len + 1`` tokens; a row gives ``inputs = row[:-1]``
and ``targets = row[1:]``. Each host reads only its shard of the documents
(``process_index :: process_count``) and yields its part of the global batch. The iterator's
state is a small JSON-able dict saved with each checkpoint, so a resumed run sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data.sources import TextSource
from jaxlm.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        text = record["text"]
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._tokenizer.encode(text)
        return {"tokens": np.append(ids, self._tokenizer.eos_id).astype(np.int32)}


def _to_lm_example(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    tokens = row["tokens"]
    targets = tokens[1:]
    return {
        "inputs": tokens[:-1],
        "targets": targets,
        "weights": (targets != pad_id).astype(np.float32),
    }


def lm_dataset(
    source: TextSource,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """A causal-LM ``IterDataset`` of host-local batches ``{inputs, targets, weights}``.

    Args:
      source: random-access documents.
      seq_len: tokens per row (model input length).
      batch_size: rows per batch on this host (the global batch divided by the host count).
      shuffle: reshuffle documents every epoch (train); False keeps source order (eval).
      shard_index, shard_count: this host's share of the documents.
      prefetch: batches prepared ahead on a background thread (0 disables).
    """
    if len(source) == 0:
        raise DataError("the data source has no documents; check config.data.files")
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        if len(source) < shard_count:
            raise DataError(f"{len(source)} documents cannot be sharded over {shard_count} hosts; add documents")
        ds = ds[shard_index::shard_count]
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(None)
    ds = ds.map(_Tokenize(tokenizer))
    it = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
    pad_id = tokenizer.pad_id
    it = it.map(lambda row: _to_lm_example(row, pad_id))
    it = it.batch(batch_size, drop_remainder=True)
    if prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


def take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    """The next ``n`` batches of an iterator."""
    return [next(iterator) for _ in range(n)]
