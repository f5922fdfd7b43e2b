"""Deterministic, resumable grain pipelines producing host-local numpy batches, one builder per objective.

Every builder reads a random-access source of records, takes this host's shard of them
(``shard_index :: shard_count``), shuffles them per epoch by ``seed`` (or keeps source order),
repeats forever, applies its objective (:mod:`jaxlm.data.objectives`,
:mod:`jaxlm.data.objectives_t5`, :mod:`jaxlm.data.objectives_tasks`, :mod:`jaxlm.data.packing`)
and batches ``batch_size`` rows of fixed shape. The iterator's state is a small JSON-able dict
saved with each checkpoint; ``set_state`` resumes with exactly the batches an uninterrupted
run would see, also with ``num_workers`` grain worker processes (the calling program needs an
``if __name__ == '__main__':`` guard then).

Causal LM (``lm_dataset``): documents are tokenized and ended with ``eos``; with
``packing='concat'`` they are concatenated and cut into rows of ``seq_len + 1`` tokens
(``inputs = row[:-1]``, ``targets = row[1:]``); with ``'windows'`` training rows are drawn at
random offsets of the tokenized text (:mod:`jaxlm.data.windows`); with ``'first_fit'`` / ``'best_fit'`` whole
documents are packed with ``segment_ids`` and ``positions`` (see :mod:`jaxlm.data.packing`).

All builders share the arguments of :func:`lm_dataset` and dispatch by name through
:data:`OBJECTIVES`; objective options are keyword arguments. Batch keys, with B the batch
size and T ``seq_len`` (int32 unless noted; ``weights`` float32):

====================  ==========================================================================
causal_lm             inputs, targets, weights [B,T]; packed adds segment_ids, positions [B,T]
masked_lm             inputs, targets, weights, segment_ids, token_types [B,T]
nsp                   masked_lm keys + nsp_label [B] (0 = B follows A, 1 = random, as Hugging Face)
span_corruption       inputs, inputs_segment_ids [B,T]; targets, weights [B,U], U from T (T5 helper)
seq2seq               inputs, inputs_segment_ids [B,T]; targets, weights [B,targets_len]
                      (decoder_only: inputs, targets, weights [B,T], weight on the target part)
classification        inputs, segment_ids, token_types [B,T]; label [B]
token_classification  inputs, segment_ids, targets (-100 = ignore), weights, word_ids [B,T]
qa                    inputs, segment_ids, token_types [B,T]; start_position, end_position [B]
====================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data import objectives, objectives_t5, windows
from jaxlm.data import packing as packing_lib
from jaxlm.data.loading import finish, keyed_records, to_iter
from jaxlm.data.pipeline_tasks import classification_dataset, qa_dataset, seq2seq_dataset, tagging_dataset
from jaxlm.data.sources import TextSource
from jaxlm.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]


class _Tokenize(grain.transforms.Map):
    """Keyed record -> ``{'tokens': [bos] ids eos}`` (int32)."""

    def __init__(self, tokenizer: Tokenizer, field: str = "text", add_bos: bool = False) -> None:
        self._tokenizer, self._field, self._add_bos = tokenizer, field, add_bos

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        return {
            "tokens": objectives.document_tokens(self._tokenizer, element["record"], self._field, add_bos=self._add_bos)
        }


class _ShiftRow(grain.transforms.Map):
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = row["tokens"]
        targets = tokens[1:]
        return {"inputs": tokens[:-1], "targets": targets, "weights": (targets != self.pad_id).astype(np.float32)}


# Sentinel ids span corruption adds past the tokenizer's vocabulary by default (T5 uses 100).
SPAN_CORRUPTION_SENTINELS = 100


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
    num_workers: int = 0,
    num_epochs: int | None = None,
    packing: str = "concat",
    long_documents: str = "split",
    num_packing_bins: int = 0,
    add_bos: bool = False,
    text_field: str = "text",
) -> grain.IterDataset:
    """A causal-LM ``IterDataset`` of host-local batches ``{inputs, targets, weights}``.

    Args:
      source: random-access documents.
      seq_len: tokens per row (model input length).
      batch_size: rows per batch on this host (the global batch divided by the host count).
      shuffle: reshuffle documents every epoch (train); False keeps source order (eval).
      shard_index, shard_count: this host's share of the documents.
      prefetch: batches prepared ahead on a background thread; 0 disables it and reads records
        in the caller instead of grain's 16-thread, 500-record read-ahead (cheap to start).
      num_workers: grain worker processes (0: none); each prepares whole batches.
      packing: ``'concat'`` (rows cross documents), ``'windows'`` (training rows at random
        offsets of the tokenized text, :mod:`jaxlm.data.windows`; a finite or unshuffled pass
        reads ``concat`` chunks), ``'first_fit'`` or ``'best_fit'`` (whole documents per row,
        adds ``segment_ids`` and ``positions``).
      long_documents: packed modes only: ``'split'`` a document longer than a row into pieces
        or ``'truncate'`` it.
      num_packing_bins: rows filled at a time when packing (0: ``batch_size``).
      add_bos: start every document with ``bos`` (so its first token is predicted too).
      text_field: the record field holding the text.
    """
    packing_lib.check_choice(packing, packing_lib.PACKINGS, "packing")
    if packing == "windows" and shuffle and num_epochs is None:
        stream = windows.token_stream(
            source, tokenizer, shard_index=shard_index, shard_count=shard_count, add_bos=add_bos, text_field=text_field
        )
        rows = windows.window_rows(stream, seq_len=seq_len, seed=seed, pad_id=tokenizer.pad_id, shard_index=shard_index)
        return finish(to_iter(rows, prefetch), batch_size=batch_size, prefetch=prefetch, num_workers=num_workers)
    ds, _ = keyed_records(
        source, seed=seed, shuffle=shuffle, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs
    )
    it = to_iter(ds.map(_Tokenize(tokenizer, text_field, add_bos)), prefetch)
    pad_id = tokenizer.pad_id
    if packing in ("concat", "windows"):  # a finite pass (evaluation) reads fixed chunks
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
        it = it.map(_ShiftRow(pad_id))
    else:
        it = grain.experimental.FlatMapIterDataset(it, packing_lib.ShiftedDocuments(seq_len, long_documents))
        it = packing_lib.pack(
            it,
            lengths={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
            method=packing,
            num_bins=num_packing_bins or batch_size,
            seed=seed,
            padding={"inputs": pad_id, "targets": pad_id, "weights": 0.0},
        )
    return finish(
        it, batch_size=batch_size, prefetch=prefetch, num_workers=num_workers, drop_remainder=num_epochs is None
    )


def masked_lm_dataset(
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
    num_workers: int = 0,
    num_epochs: int | None = None,
    mask_rate: float = 0.15,
    whole_word: bool = False,
    long_documents: str = "split",
    text_field: str = "text",
) -> grain.IterDataset:
    """Masked-LM batches (BERT, dynamic masking): one ``[cls] piece [sep]`` row per document piece.

    A document longer than ``seq_len - 2`` tokens is split into pieces (or truncated, see
    ``long_documents``). Each time a piece is seen, a fresh mask is drawn from
    ``(seed, epoch, document, piece)``: ``mask_rate`` of its tokens (whole words when
    ``whole_word``), of which 80% become ``mask``, 10% a random token and 10% stay.
    """
    table = objectives.TokenTable(tokenizer, words=whole_word)
    ds, _ = keyed_records(
        source, seed=seed, shuffle=shuffle, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs
    )
    pieces = objectives.DocumentPieces(tokenizer, seq_len=seq_len, field=text_field, long_documents=long_documents)
    it = grain.experimental.FlatMapIterDataset(to_iter(ds, prefetch), pieces)
    it = it.map(_mlm_row(tokenizer, table, seq_len, seed, mask_rate, whole_word))
    return finish(
        it, batch_size=batch_size, prefetch=prefetch, num_workers=num_workers, drop_remainder=num_epochs is None
    )


def _mlm_row(
    tokenizer: Tokenizer, table: objectives.TokenTable, seq_len: int, seed: int, rate: float, whole_word: bool
) -> objectives.MaskedLMRow:
    return objectives.MaskedLMRow(
        table,
        seq_len=seq_len,
        seed=seed,
        mask_id=tokenizer.special_id("mask"),
        pad_id=tokenizer.pad_id,
        rate=rate,
        whole_word=whole_word,
    )


def nsp_dataset(
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
    num_workers: int = 0,
    num_epochs: int | None = None,
    random_rate: float = 0.5,
    mask_rate: float = 0.15,
    whole_word: bool = False,
    text_field: str = "text",
) -> grain.IterDataset:
    """BERT pre-training batches: next-sentence pairs ``[cls] A [sep] B [sep]`` with masked-LM masking.

    One pair per sentence of each document (see
    :class:`~jaxlm.data.objectives.NextSentencePairs`); ``random_rate`` of them pair A with a
    random sentence of another document of this shard. ``mask_rate=0`` turns masking off.
    """
    table = objectives.TokenTable(tokenizer, words=whole_word)
    ds, indices = keyed_records(
        source, seed=seed, shuffle=shuffle, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs
    )
    pairs = objectives.NextSentencePairs(
        source, indices, tokenizer, seq_len=seq_len, seed=seed, field=text_field, random_rate=random_rate
    )
    it = grain.experimental.FlatMapIterDataset(to_iter(ds, prefetch), pairs)
    it = it.map(_mlm_row(tokenizer, table, seq_len, seed, mask_rate, whole_word))
    return finish(
        it, batch_size=batch_size, prefetch=prefetch, num_workers=num_workers, drop_remainder=num_epochs is None
    )


def span_corruption_dataset(
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
    num_workers: int = 0,
    num_epochs: int | None = None,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    sentinel_start: int | None = None,
    num_sentinels: int = SPAN_CORRUPTION_SENTINELS,
    text_field: str = "text",
) -> grain.IterDataset:
    """T5 span-corruption batches: ``inputs`` of ``seq_len``, ``targets`` of the length T5's helper gives.

    Documents (ended by ``eos``) are concatenated and cut into rows of raw tokens sized so the
    corrupted inputs fill ``seq_len`` (:func:`~jaxlm.data.objectives_t5.span_corruption_lengths`;
    ``seq_len=512`` gives 568 raw tokens and 114 targets). Sentinel ids: see
    :func:`~jaxlm.data.objectives_t5.sentinel_ids` (default: past the tokenizer's vocabulary,
    so the model needs ``tokenizer.vocab_size + num_sentinels`` ids).
    """
    if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
        raise DataError(
            f"noise_density={noise_density} must be in (0, 1) and mean_noise_span_length={mean_noise_span_length} "
            "at least 1 (T5: 0.15 and 3)"
        )
    if seq_len < 4:
        raise DataError(f"seq_len={seq_len} is too short for span corruption; use at least 4")
    raw_len, targets_len = objectives_t5.span_corruption_lengths(seq_len, noise_density, mean_noise_span_length)
    sentinels = objectives_t5.sentinel_ids(tokenizer, sentinel_start, num_sentinels)
    spans = max(int(round(round(raw_len * noise_density) / mean_noise_span_length)), 1)
    if spans > num_sentinels:
        raise DataError(f"seq_len={seq_len} gives {spans} noise spans per row; raise num_sentinels to at least that")
    ds, _ = keyed_records(
        source, seed=seed, shuffle=shuffle, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs
    )
    it = to_iter(ds.map(_Tokenize(tokenizer, text_field)), prefetch)
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": raw_len})
    row = objectives_t5.SpanCorruptionRow(
        inputs_length=seq_len,
        targets_length=targets_len,
        sentinels=sentinels,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        seed=seed,
        noise_density=noise_density,
        mean_span=mean_noise_span_length,
    )
    it = it.map_with_index(row)
    return finish(
        it, batch_size=batch_size, prefetch=prefetch, num_workers=num_workers, drop_remainder=num_epochs is None
    )


# Objective name (config.data.objective) -> builder. All take (source, tokenizer, *, seq_len,
# batch_size, seed, shuffle, shard_index, shard_count, prefetch, num_workers, **options).
__all__ = [
    "OBJECTIVES",
    "classification_dataset",
    "keyed_records",
    "lm_dataset",
    "masked_lm_dataset",
    "nsp_dataset",
    "objective_builder",
    "qa_dataset",
    "seq2seq_dataset",
    "span_corruption_dataset",
    "tagging_dataset",
    "take",
]

OBJECTIVES: dict[str, Callable[..., grain.IterDataset]] = {
    "causal_lm": lm_dataset,
    "masked_lm": masked_lm_dataset,
    "nsp": nsp_dataset,
    "span_corruption": span_corruption_dataset,
    "seq2seq": seq2seq_dataset,
    "classification": classification_dataset,
    "token_classification": tagging_dataset,
    "qa": qa_dataset,
}


def objective_builder(name: str) -> Callable[..., grain.IterDataset]:
    """The builder of objective ``name``; a :class:`DataError` lists the valid names otherwise."""
    if name not in OBJECTIVES:
        raise DataError(f"config.data.objective={name!r} is not one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def take(iterator: Iterator[Batch], n: int) -> list[Batch]:
    """The next ``n`` batches of an iterator."""
    return [next(iterator) for _ in range(n)]
