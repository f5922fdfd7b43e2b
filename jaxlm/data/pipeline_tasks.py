"""Dataset builders of the fine-tuning objectives: seq2seq, classification, tagging, extractive QA.

Each reads one record per row through a transform of :mod:`jaxlm.data.objectives_tasks`; the
shared arguments are those of :func:`jaxlm.data.pipeline.lm_dataset`. Use them through
:data:`jaxlm.data.pipeline.OBJECTIVES` (or ``pipeline.<name>_dataset``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain

from jaxlm.data import objectives_tasks
from jaxlm.data.loading import finish, keyed_records, to_iter
from jaxlm.data.sources import TextSource
from jaxlm.data.tokenizers import Tokenizer


def _record_task(
    transform: grain.transforms.Map,
    source: TextSource,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    shard_index: int,
    shard_count: int,
    prefetch: int,
    num_workers: int,
    num_epochs: int | None = None,
    keep: Callable[[Any], bool] | None = None,
) -> grain.IterDataset:
    """One row per record through ``transform`` (optionally filtered by ``keep``), batched."""
    ds, _ = keyed_records(
        source, seed=seed, shuffle=shuffle, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs
    )
    ds = ds.map(transform)
    if keep is not None:
        ds = ds.filter(keep)
    return finish(
        to_iter(ds, prefetch),
        batch_size=batch_size,
        prefetch=prefetch,
        num_workers=num_workers,
        drop_remainder=num_epochs is None,
    )


def seq2seq_dataset(
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
    targets_len: int = 0,
    source_field: str = "source",
    target_field: str = "target",
    prefix: str = "",
    decoder_only: bool = False,
) -> grain.IterDataset:
    """Translation / summarization batches from ``{source_field, target_field}`` records.

    ``inputs`` (``prefix + source``, ``eos``) are cut and padded to ``seq_len``, ``targets``
    (``target``, ``eos``) to ``targets_len`` (0: ``seq_len``); the model shifts the targets
    right to make its decoder inputs. ``decoder_only`` makes causal-LM rows of ``source eos
    target eos`` weighted on the target instead (see :class:`~jaxlm.data.objectives_tasks.Seq2SeqRow`).
    """
    row = objectives_tasks.Seq2SeqRow(
        tokenizer,
        inputs_length=seq_len,
        targets_length=targets_len or seq_len,
        source_field=source_field,
        target_field=target_field,
        prefix=prefix,
        decoder_only=decoder_only,
    )
    return _record_task(
        row,
        source,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        shard_index=shard_index,
        shard_count=shard_count,
        prefetch=prefetch,
        num_workers=num_workers,
        num_epochs=num_epochs,
    )


def classification_dataset(
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
    labels: Sequence[Any] | None = (0, 1),
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str = "label",
) -> grain.IterDataset:
    """Sequence-classification batches: ``[cls] text [sep] (pair [sep])`` and ``label``.

    ``label`` is the position of the record's ``label_field`` value in ``labels``; a value
    outside ``labels`` is a :class:`DataError` naming it and the set. ``labels=None`` reads a
    numeric regression target (float32) instead.
    """
    row = objectives_tasks.ClassificationRow(
        tokenizer, seq_len=seq_len, labels=labels, text_field=text_field, pair_field=pair_field, label_field=label_field
    )
    return _record_task(
        row,
        source,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        shard_index=shard_index,
        shard_count=shard_count,
        prefetch=prefetch,
        num_workers=num_workers,
        num_epochs=num_epochs,
    )


def tagging_dataset(
    source: TextSource,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    labels: Sequence[Any],
    shard_index: int = 0,
    shard_count: int = 1,
    prefetch: int = 2,
    num_workers: int = 0,
    num_epochs: int | None = None,
    words_field: str = "tokens",
    tags_field: str = "tags",
) -> grain.IterDataset:
    """Token-tagging batches (NER with BIO tags, say ``labels=bio_labels(['PER', 'LOC'])``).

    Word-level tags go to the first sub-token of each word; the other positions get
    ``targets = -100`` and weight 0 (see :class:`~jaxlm.data.objectives_tasks.TaggingRow`).
    """
    row = objectives_tasks.TaggingRow(
        tokenizer, seq_len=seq_len, labels=labels, words_field=words_field, tags_field=tags_field
    )
    return _record_task(
        row,
        source,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        shard_index=shard_index,
        shard_count=shard_count,
        prefetch=prefetch,
        num_workers=num_workers,
        num_epochs=num_epochs,
    )


def qa_dataset(
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
    question_field: str = "question",
    context_field: str = "context",
    answers_field: str = "answers",
    max_question_len: int = 64,
    impossible: str = "drop",
) -> grain.IterDataset:
    """Extractive-QA batches (SQuAD layout): token ``start_position`` / ``end_position`` of the answer.

    An answer cut off by ``seq_len`` is dropped (``impossible='drop'``) or marked unanswerable
    with both positions 0, the ``[cls]`` token (``'mark'``); records without an answer are
    always marked so (see :class:`~jaxlm.data.objectives_tasks.QARow`).
    """
    row = objectives_tasks.QARow(
        tokenizer,
        seq_len=seq_len,
        question_field=question_field,
        context_field=context_field,
        answers_field=answers_field,
        max_question_len=max_question_len,
        impossible=impossible,
    )
    return _record_task(
        row,
        source,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        shard_index=shard_index,
        shard_count=shard_count,
        prefetch=prefetch,
        num_workers=num_workers,
        num_epochs=num_epochs,
        keep=objectives_tasks.qa_keep,
    )
