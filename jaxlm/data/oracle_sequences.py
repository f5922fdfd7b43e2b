"""Fixed-length token sequences for text GANs: the oracle's samples or short lines of real text.

A GAN's data set is a small ``[N, T]`` array held in memory: the SeqGAN oracle's samples
(``jaxlm.data.oracle``), or the lines of a text source that fit ``T`` tokens, each padded with
the tokenizer's pad id after an end-of-sequence id (Texygen's layout, so the generator learns
where a sentence ends). :class:`SequenceBatches` cuts it into shuffled global batches, one
permutation per epoch from ``(seed, epoch)``, and is resumable from ``{"epoch", "index"}``.
Every process computes the same global batch and keeps its own contiguous rows.

Shapes: N sequences, T length, B global batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data import sources
from jaxlm.data.tokenizers import Tokenizer


class SequenceBatches:
    """Shuffled global batches ``{"tokens": [B/P, T]}`` of an ``[N, T]`` array (this process's rows)."""

    def __init__(
        self, data: np.ndarray, batch_size: int, seed: int, *, process_index: int = 0, process_count: int = 1
    ) -> None:
        if batch_size % process_count:
            raise DataError(f"config.data.batch_size={batch_size} must be divisible by the {process_count} processes")
        if len(data) < batch_size:
            raise DataError(
                f"the GAN data set has {len(data)} sequences, fewer than config.data.batch_size={batch_size}"
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        rows = batch_size // process_count
        self._rows = slice(process_index * rows, (process_index + 1) * rows)
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one pass (the remainder of each shuffled epoch is dropped)."""
        return len(self.data) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def __iter__(self) -> SequenceBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        ids = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return {"tokens": self.data[ids[self._rows]]}

    def get_state(self) -> dict[str, Any]:
        """The position: ``{"epoch", "index"}`` (the same on every process)."""
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`get_state` output."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def encode_lines(texts: list[str], tokenizer: Tokenizer, seq_len: int, *, min_tokens: int = 2) -> np.ndarray:
    """Lines of ``min_tokens .. seq_len - 1`` tokens as ``[N, seq_len]`` int32: ids, eos, then pads."""
    rows = []
    for text in texts:
        text = text.strip()
        if not text:
            continue
        ids = tokenizer.encode(text)
        if min_tokens <= len(ids) <= seq_len - 1:
            row = np.full((seq_len,), tokenizer.pad_id, np.int32)
            row[: len(ids)] = ids
            row[len(ids)] = tokenizer.eos_id
            rows.append(row)
    if not rows:
        raise DataError(
            f"no line of the text data fits config.data.seq_len={seq_len} tokens; raise seq_len or use other files"
        )
    return np.stack(rows)


def source_lines(source: sources.TextSource) -> list[str]:
    """Every non-empty line of every document of a text source, in order."""
    out = []
    for text in sources.record_texts(source):
        out.extend(line for line in text.splitlines() if line.strip())
    return out
