"""SIGKILL at many points, including mid-way through an async checkpoint write: restarts resume
from the last complete checkpoint and end bitwise identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from subprocess_env import subprocess_env

from jaxlm import checkpoint, config_lib
from jaxlm.checkpoint import KILL_DURING_SAVE_ENV
from jaxlm.main import experiment
from jaxlm.main import workdir as workdir_lib
from jaxlm.metric_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 30


def _args(workdir, corpus, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "jaxlm",
        "train",
        "--config",
        os.path.join(REPO, "configs", "gpt.py") + ":size=tiny",
        "--workdir",
        str(workdir),
        "--config.data.source=files",
        f"--config.data.files={corpus}",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.eval_steps=1",
        "--config.checkpoint.every_steps=3",
        "--config.train.progress=false",
        "--config.model.dropout_rate=0.1",
        *extra,
    ]


def _env(devices):
    return subprocess_env(devices)


def _final_params(workdir):
    saved = workdir_lib.saved_config(str(workdir))
    cfg = config_lib.validate(saved)
    exp = experiment.build(cfg, 263)
    manager = checkpoint.make_manager(str(workdir), cfg.checkpoint)
    state, _ = checkpoint.restore(manager, NUM_STEPS, exp.abstract_state)
    manager.close()
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _kill_when(proc, workdir, min_step):
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
        if steps and max(steps) >= min_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_sigkill_anywhere_then_restart_is_bitwise_identical(devices, text_corpus, tmp_path):
    data_dir = tmp_path / "d"
    extra = ("--config.mesh.shape.data=8",) if devices == 8 else ()
    clean = tmp_path / "clean"
    done = subprocess.run(
        _args(clean, text_corpus, data_dir, *extra), env=_env(devices), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]

    crashed = tmp_path / "crashed"
    kills = 0
    # Killed while the async save of step 6 is being written (fault injection), then at later points.
    env = dict(_env(devices), **{KILL_DURING_SAVE_ENV: "6"})
    proc = subprocess.run(_args(crashed, text_corpus, data_dir, *extra), env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    kills += 1
    # Each restart is killed 2, 3 or 4 steps after it resumed (point % 4 + 1): before, at and after the
    # next checkpoint (every 3 steps), once each on one device.
    kill_points = [5, 10, 15] if devices == 1 else [9, 20]
    for point in kill_points:
        resumed_from = checkpoint.latest_step(str(crashed)) or 0
        proc = subprocess.Popen(
            _args(crashed, text_corpus, data_dir, *extra),
            env=_env(devices),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _kill_when(proc, crashed, resumed_from + point % 4 + 1)
        kills += proc.returncode == -signal.SIGKILL
    final = subprocess.run(
        _args(crashed, text_corpus, data_dir, *extra), env=_env(devices), capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= (4 if devices == 1 else 3)
    for a, b in zip(_final_params(clean), _final_params(crashed)):
        np.testing.assert_array_equal(a, b)
