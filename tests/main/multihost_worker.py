"""One process of a multi-process test run on localhost (started by multihost_test.py).

    python multihost_worker.py train PROCESS_ID NUM_PROCESSES PORT CONFIG_JSON WORKDIR RECORD_PREFIX
    python multihost_worker.py join PROCESS_ID NUM_PROCESSES PORT TIMEOUT_S

``train`` joins the others with ``jaxlm.distributed.initialize``, trains with
``jaxlm.main.train.run`` and writes, to ``RECORD_PREFIX.<process>.npz``, what its training data
pipeline was asked for (shard index and count) and every host batch it produced, with the
iterator state after each. ``join`` only joins, and reports a ``UserError`` the way the CLI
does: one line on stderr and exit status 2.
"""

import os
import sys

# 4 devices at the optimization level of tests/conftest.py (compiles faster).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jaxlm import config_lib, distributed  # noqa: E402
from jaxlm.common_types import UserError  # noqa: E402


class _Recorder:
    """Wraps the training dataset to keep every batch, and the state after it, of each iterator."""

    def __init__(self) -> None:
        self.shard = None
        self.iterators = []

    def wrap_lm_dataset(self, original):
        recorder = self

        def lm_dataset(source, tokenizer, **kwargs):
            ds = original(source, tokenizer, **kwargs)
            if not kwargs.get("shuffle"):  # evaluation data: not recorded
                return ds
            recorder.shard = (kwargs["shard_index"], kwargs["shard_count"])
            return _RecordingDataset(ds, recorder)

        return lm_dataset

    def training_iterator(self):
        # train.run may also peek at a batch through a second iterator; training reads the most.
        return max(self.iterators, key=lambda it: len(it.inputs))


class _RecordingDataset:
    def __init__(self, ds, recorder):
        self._ds, self._recorder = ds, recorder

    def __iter__(self):
        it = _RecordingIterator(iter(self._ds))
        self._recorder.iterators.append(it)
        return it


class _RecordingIterator:
    def __init__(self, it):
        self._it = it
        self.inputs = []
        self.states = []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self.inputs.append(np.asarray(batch["inputs"]))
        self.states.append(json.dumps(self._it.get_state()))
        return batch

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def train(process_id: int, num_processes: int, port: int, config_json: str, workdir: str, record: str) -> None:
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60)
    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    from jaxlm.data import pipeline
    from jaxlm.main import train as train_lib

    recorder = _Recorder()
    pipeline.lm_dataset = recorder.wrap_lm_dataset(pipeline.lm_dataset)
    if hasattr(pipeline, "OBJECTIVES"):  # train.run looks the builder up by config.data.objective
        pipeline.OBJECTIVES["causal_lm"] = pipeline.lm_dataset
    with open(config_json) as f:
        config = config_lib.validate(config_lib.from_json(f.read()))
    train_lib.run(config, workdir)
    it = recorder.training_iterator()
    np.savez(
        f"{record}.{process_id}.npz",
        shard=np.asarray(recorder.shard),
        inputs=np.stack(it.inputs),
        states=np.asarray(it.states),
    )
    jax.distributed.shutdown()  # a barrier: neither process leaves while the other still needs it


def join(process_id: int, num_processes: int, port: int, timeout_s: float) -> None:
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=timeout_s)
    print(f"joined: process {jax.process_index()} of {jax.process_count()}", flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    try:
        if mode == "train":
            train(int(args[0]), int(args[1]), int(args[2]), args[3], args[4], args[5])
        else:
            join(int(args[0]), int(args[1]), int(args[2]), float(args[3]))
        status = 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # as the CLI does: no teardown, so a stuck join cannot abort the process later
