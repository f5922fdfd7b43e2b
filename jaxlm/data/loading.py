"""Shared grain plumbing of the dataset builders: keyed records per host shard and epoch, batching, prefetch.

:func:`keyed_records` yields ``{'record', 'epoch', 'index'}`` for this host's shard of a
random-access source, shuffled per epoch by a seed and repeated forever; objectives seed
their per-example randomness from ``(epoch, index)``. :func:`finish` batches and prefetches.
"""

from __future__ import annotations

from typing import Any

import grain
from absl import flags

from jaxlm.common_types import DataError
from jaxlm.data.sources import TextSource


class _ReadKeyed(grain.transforms.MapWithIndex):
    """Global step ``k`` and source index ``i`` -> ``{'record', 'epoch', 'index'}``."""

    def __init__(self, source: TextSource, shard_len: int) -> None:
        self.source, self.shard_len = source, shard_len

    def map_with_index(self, k: int, i: int) -> dict[str, Any]:
        return {"record": self.source[int(i)], "epoch": k // self.shard_len, "index": int(i)}


def keyed_records(
    source: TextSource,
    *,
    seed: int,
    shuffle: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
) -> tuple[grain.MapDataset, list[int]]:
    """Records of this host's shard, shuffled per epoch and repeated, each keyed by epoch and index.

    ``num_epochs=None`` repeats forever (training); evaluation passes 1 for one pass over the
    split. Returns the dataset and the source indices of the shard.
    """
    if len(source) == 0:
        raise DataError("the data source has no documents; check config.data.files")
    ds = grain.MapDataset.range(len(source))
    if shard_count > 1:
        if len(source) < shard_count:
            raise DataError(f"{len(source)} documents cannot be sharded over {shard_count} hosts; add documents")
        ds = ds[shard_index::shard_count]
    indices = list(range(len(source)))[shard_index::shard_count]
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    return ds.repeat(num_epochs).map_with_index(_ReadKeyed(source, len(indices))), indices


def to_iter(ds: grain.MapDataset, prefetch: int) -> grain.IterDataset:
    """``ds`` as an iterator dataset: records read ahead by grain's thread pool, or in the caller when ``prefetch=0``.

    Synchronous reading keeps short runs (evaluation, tests) from filling grain's 500-record
    read-ahead buffer with 16 threads every time an iterator starts.
    """
    if prefetch > 0:
        return ds.to_iter_dataset()
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _parse_flags_in_worker(worker_index: int, worker_count: int) -> None:
    """Worker init: take absl's flag defaults where the program never parsed flags (grain reads some)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def finish(
    it: grain.IterDataset, *, batch_size: int, prefetch: int, num_workers: int, drop_remainder: bool = True
) -> grain.IterDataset:
    """Batch rows (a partial last batch dropped unless told) and prefetch: in ``num_workers`` processes, else a thread.

    A finite pass (evaluation) keeps its last, partial batch (``drop_remainder=False``); the
    evaluator pads it and weights the padding out.

    Worker processes re-import the calling program's main module: it needs an
    ``if __name__ == '__main__':`` guard. Grain reads absl flags in the parent and the
    workers; where no one parsed them (a plain script, pytest), their defaults are taken.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be at least 1 per host")
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    if num_workers > 0:
        _parse_flags_in_worker(-1, num_workers)
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1))
        return it.mp_prefetch(options, worker_init_fn=_parse_flags_in_worker)
    if prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it
