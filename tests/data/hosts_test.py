import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import hosts


class _Counter:
    """A fake shard: batch k of shard s has rows filled with (s, k, row)."""

    def __init__(self, shard, rows):
        self.shard, self.rows, self.k = shard, rows, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.k += 1
        return {"x": np.array([[self.shard, self.k, r] for r in range(self.rows)])}

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = state["k"]


def _global(num_shards, processes, batch=8, steps=3, state=None):
    its = [
        hosts.ShardedBatches(
            lambda s, n, rows: _Counter(s, rows),
            num_shards=num_shards,
            process_index=p,
            process_count=processes,
            global_batch=batch,
        )
        for p in range(processes)
    ]
    if state is not None:
        for it in its:
            it.set_state(state)
    out = [np.concatenate([next(it)["x"] for it in its]) for _ in range(steps)]
    return out, hosts.merge_states([it.get_state() for it in its])


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_global_batches_do_not_depend_on_the_process_count(processes):
    reference, _ = _global(2, 1)
    got, _ = _global(2, processes)
    for a, b in zip(reference, got):
        np.testing.assert_array_equal(a, b)


def test_state_written_by_two_processes_resumes_on_one_and_on_four():
    _, state = _global(2, 2, steps=2)
    expected, _ = _global(2, 1, steps=5)
    for processes in (1, 4):
        got, _ = _global(2, processes, steps=3, state=state)
        for a, b in zip(expected[2:], got):
            np.testing.assert_array_equal(a, b)


def test_batch_must_divide():
    with pytest.raises(DataError, match="divisible by the 3 processes"):
        hosts.ShardedBatches(
            lambda s, n, r: _Counter(s, r), num_shards=2, process_index=0, process_count=3, global_batch=8
        )
