"""The data position of every process, saved with each checkpoint as one JSON object.

Each process reads some of the run's data shards (``jaxlm.data.hosts``); a checkpoint holds
the state of every shard, gathered from all processes, so any process count can resume it.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from jaxlm.data import hosts


def gather(state: dict[str, Any]) -> dict[str, Any]:
    """Merge every process's shard states (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return hosts.merge_states([json.loads(bytes(rows[i, : lengths[i]]).decode()) for i in range(len(lengths))])


def num_shards(saved: dict[str, Any] | None, configured: int) -> int:
    """Shards of this run: the checkpoint's, else ``config.data.num_shards``, else one per process."""
    if saved and "num_shards" in saved:
        return int(saved["num_shards"])
    return configured or jax.process_count()
