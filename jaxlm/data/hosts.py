"""Rows of each global batch for the calling process, read from a fixed number of data shards.

The documents are split into ``num_shards`` shards, fixed for the life of a run (the first
run's process count unless configured). Shard ``s`` yields rows ``[s*B/S, (s+1)*B/S)`` of every
global batch of ``B`` rows; process ``p`` of ``P`` owns rows ``[p*B/P, (p+1)*B/P)`` and reads
exactly the shards that overlap them. So the global batches do not depend on how many
processes read them: a run checkpointed on 2 hosts resumes on 1 (which then reads both
shards) or on 4 (each pair splitting a shard's rows) and sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxlm.common_types import DataError

Batch = dict[str, np.ndarray]
# (shard_index, shard_count, rows per shard batch) -> an iterable of that shard's batches
ShardBuilder = Callable[[int, int, int], Any]


class ShardedBatches:
    """Iterator over this process's part of each global batch, checkpointable per shard."""

    def __init__(
        self, build: ShardBuilder, *, num_shards: int, process_index: int, process_count: int, global_batch: int
    ) -> None:
        for name, n in (("data shards", num_shards), ("processes", process_count)):
            if global_batch % n:
                raise DataError(
                    f"config.data.batch_size={global_batch} must be divisible by the {n} {name}; change the batch size"
                )
        self.num_shards = num_shards
        per_shard, per_process = global_batch // num_shards, global_batch // process_count
        self._lo, self._hi = process_index * per_process, (process_index + 1) * per_process
        self._shards = [s for s in range(num_shards) if s * per_shard < self._hi and (s + 1) * per_shard > self._lo]
        self._first_row = self._shards[0] * per_shard
        self._iters = {s: iter(build(s, num_shards, per_shard)) for s in self._shards}

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> Batch:
        parts = [next(self._iters[s]) for s in self._shards]
        rows = slice(self._lo - self._first_row, self._hi - self._first_row)
        if len(parts) == 1:
            return {k: v[rows] for k, v in parts[0].items()}
        return {k: np.concatenate([p[k] for p in parts])[rows] for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        """``{"num_shards": S, "shards": {"s": state}}`` for the shards this process reads."""
        return {"num_shards": self.num_shards, "shards": {str(s): it.get_state() for s, it in self._iters.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore from (merged) :meth:`get_state` output holding at least this process's shards."""
        if state.get("num_shards") != self.num_shards:
            raise DataError(f"data state is for {state.get('num_shards')} shards, not {self.num_shards}")
        for s, it in self._iters.items():
            it.set_state(state["shards"][str(s)])


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of several processes' :meth:`ShardedBatches.get_state` (shared shards agree)."""
    merged: dict[str, Any] = {"num_shards": states[0]["num_shards"], "shards": {}}
    for state in states:
        merged["shards"].update(state["shards"])
    return merged
