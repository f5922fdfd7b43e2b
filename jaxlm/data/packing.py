"""Sequence packing: fixed-length rows from variable-length token sequences.

Causal-LM rows of ``seq_len`` tokens are filled in one of three ways (:data:`PACKINGS`):

``concat``
    Documents (each ended by ``eos``) are concatenated and cut every ``seq_len + 1`` tokens
    (grain's ``ConcatThenSplitIterDataset``); ``inputs = row[:-1]``, ``targets = row[1:]``.
    Rows cross document boundaries and attention sees the previous document: no padding,
    no segment ids. This is the GPT-2 recipe.
``windows``
    Training rows of ``seq_len + 1`` tokens at uniformly random offsets of the tokenized,
    concatenated text (nanoGPT's ``get_batch``; :mod:`jaxlm.data.windows`); a finite pass
    (evaluation) reads ``concat`` chunks.
``first_fit`` / ``best_fit``
    Each document is first shifted on its own (``inputs = doc[:-1]``, ``targets = doc[1:]``,
    so no target ever belongs to another document), then whole documents are placed into
    rows by grain's ``FirstFitPackIterDataset`` / ``BestFitPackIterDataset``. A row carries
    ``segment_ids`` (1, 2, ... per document, 0 on padding) and ``positions`` (restarting at
    0 for each document); ``weights`` are 0 on padding. Passing ``positions=`` and
    ``segment_ids=`` to the model keeps attention inside each document, so a packed
    document's logits are those of the document run alone.

A document longer than a row is either cut into row-sized pieces (``split``: each piece is a
document of its own, its positions restart at 0; consecutive pieces overlap by one token so
every target is still predicted once) or cut to its first row (``truncate``); see
:data:`LONG_DOCUMENTS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.common_types import DataError

PACKINGS = ("concat", "windows", "first_fit", "best_fit")
LONG_DOCUMENTS = ("split", "truncate")

_PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}


def check_choice(value: str, valid: Sequence[str], field: str) -> str:
    """``value`` if it is one of ``valid``, else a :class:`DataError` naming ``field`` and the choices."""
    if value not in valid:
        raise DataError(f"{field}={value!r} is not one of: {', '.join(valid)}")
    return value


def pad_to(x: np.ndarray, length: int, value: int | float = 0, dtype: Any = np.int32) -> np.ndarray:
    """``x`` (1-D) cut to ``length`` and padded with ``value`` up to it, as ``dtype``."""
    out = np.full(length, value, dtype=dtype)
    n = min(len(x), length)
    out[:n] = np.asarray(x)[:n]
    return out


def chunks(tokens: np.ndarray, size: int, *, overlap: int = 0, long_documents: str = "split") -> list[np.ndarray]:
    """Cut ``tokens`` into pieces of at most ``size``; consecutive pieces share ``overlap`` tokens.

    ``long_documents='truncate'`` keeps only the first piece. A sequence no longer than
    ``size`` is returned whole; an empty one gives no pieces.
    """
    check_choice(long_documents, LONG_DOCUMENTS, "long_documents")
    if size <= overlap:
        raise DataError(f"piece size {size} must exceed the overlap {overlap}; raise seq_len")
    if len(tokens) == 0:
        return []
    if len(tokens) <= size or long_documents == "truncate":
        return [tokens[:size]]
    stride = size - overlap
    starts = range(0, len(tokens) - overlap, stride)
    return [tokens[s : s + size] for s in starts]


class ShiftedDocuments(grain.experimental.FlatMapTransform):
    """``{'tokens': doc}`` -> per-document ``{inputs, targets, weights}`` pieces of at most ``seq_len``.

    The shift happens inside each piece (``inputs = piece[:-1]``, ``targets = piece[1:]``),
    so a packed row never has a target from another document.
    """

    max_fan_out = 1 << 20  # only bounds the MapDataset variant; the iterator one reads all pieces

    def __init__(self, seq_len: int, long_documents: str = "split") -> None:
        self.seq_len = seq_len
        self.long_documents = check_choice(long_documents, LONG_DOCUMENTS, "long_documents")

    def flat_map(self, element: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        out = []
        for piece in chunks(element["tokens"], self.seq_len + 1, overlap=1, long_documents=self.long_documents):
            if len(piece) < 2:  # a lone token has nothing to predict
                continue
            out.append(
                {
                    "inputs": piece[:-1].astype(np.int32),
                    "targets": piece[1:].astype(np.int32),
                    "weights": np.ones(len(piece) - 1, np.float32),
                }
            )
        return out


def pack(
    ds: grain.IterDataset,
    *,
    lengths: Mapping[str, int],
    method: str,
    num_bins: int,
    seed: int,
    padding: Mapping[str, int | float],
) -> grain.IterDataset:
    """Pack the variable-length features ``lengths`` of ``ds`` into rows with grain's packers.

    All features of an element must have the same length (they are aligned token by token).
    Rows gain ``segment_ids`` (1.. per element, 0 on padding) and ``positions`` (0.. within
    each element); grain's per-feature copies of them are dropped. ``num_bins`` rows are
    filled at a time and emitted in an order shuffled by ``seed`` (more bins: less padding).
    """
    check_choice(method, tuple(_PACKERS), "packing")
    if num_bins < 1:
        raise DataError(f"num_packing_bins={num_bins} must be at least 1")
    packed = _PACKERS[method](
        ds,
        length_struct=dict(lengths),
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=True,
        padding_struct=dict(padding),
    )
    return packed.map(_KeepOneSegmentation(tuple(lengths)))


class _KeepOneSegmentation(grain.transforms.Map):
    """Rename grain's ``<first feature>_{segment_ids,positions}`` and drop the other copies."""

    def __init__(self, features: tuple[str, ...]) -> None:
        self.features = features

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = self.features[0]
        out = {k: row[k] for k in self.features}
        out["segment_ids"] = row[f"{first}_segment_ids"].astype(np.int32)
        out["positions"] = row[f"{first}_positions"].astype(np.int32)
        return out


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 wherever the segment id changes (0 on padding), for any shape ``[..., T]``."""
    seg = np.asarray(segment_ids)
    pos = np.zeros(seg.shape, np.int32)
    for t in range(1, seg.shape[-1]):
        same = seg[..., t] == seg[..., t - 1]
        pos[..., t] = np.where(same, pos[..., t - 1] + 1, 0)
    return np.where(seg > 0, pos, 0).astype(np.int32)
