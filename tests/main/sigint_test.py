"""Ctrl-C loses nothing: the first SIGINT saves the current step and exits 130; a second one exits at
once and leaves the newest complete checkpoint intact.

The child installs Python's default SIGINT handler first: a background job of a
non-interactive shell inherits SIGINT ignored, and Python would then never see Ctrl-C.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from subprocess_env import subprocess_env

from jaxlm import checkpoint, config_lib
from jaxlm.main import experiment, lock
from jaxlm.main import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# `python -m jaxlm` with SIGINT handled as Python does by default, whatever the parent ignored.
_MAIN = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('jaxlm', run_name='__main__', alter_sys=True)"
)


def _args(workdir, corpus, data_dir, steps, every):
    return [
        sys.executable,
        "-c",
        _MAIN,
        "train",
        "--config",
        os.path.join(REPO, "configs", "gpt.py") + ":size=tiny",
        "--workdir",
        str(workdir),
        "--config.data.source=files",
        f"--config.data.files={corpus}",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.eval_steps=1",
        f"--config.checkpoint.every_steps={every}",
        "--config.train.progress=false",
    ]


def _env():
    return subprocess_env(PYTHONPATH=REPO)


def _start(args):
    return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    steps = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                steps += [record["step"]] if "loss" in record else []
    return steps


def _wait(proc, predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    raise AssertionError(f"condition not reached (exit {proc.returncode}): {err[-3000:]}")


def _restorable(workdir, step):
    cfg = config_lib.validate(workdir_lib.saved_config(str(workdir)))
    exp = experiment.build(cfg, 263)
    manager = checkpoint.make_manager(str(workdir), cfg.checkpoint, read_only=True)
    state, _ = checkpoint.restore(manager, step, exp.abstract_state)
    manager.close()
    return int(state.step)


@pytest.mark.slow
def test_first_ctrl_c_saves_the_current_step_and_exits_130(text_corpus, tmp_path):
    workdir, data_dir = tmp_path / "w", tmp_path / "d"
    proc = _start(_args(workdir, text_corpus, data_dir, 100_000, 100_000))
    _wait(proc, lambda: len(_logged_steps(str(workdir))) >= 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C: finishing this step and saving a checkpoint" in err
    assert "rerun the same command to resume" in err.strip().splitlines()[-1]
    saved = checkpoint.latest_step(str(workdir))
    assert saved is not None and saved >= 2 and saved == max(_logged_steps(str(workdir)))
    assert _restorable(workdir, saved) == saved
    assert not os.path.exists(workdir / lock.LOCK_FILE)
    # Resuming from it is the SIGTERM path (reliability_test.py checks it step for step).


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_and_keeps_the_newest_complete_checkpoint(text_corpus, tmp_path):
    workdir, data_dir = tmp_path / "w", tmp_path / "d"
    proc = _start(_args(workdir, text_corpus, data_dir, 100_000, 2))
    _wait(proc, lambda: (checkpoint.latest_step(str(workdir)) or 0) >= 4)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # the second press lands while the first one's step and save are under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "second Ctrl-C: exiting now" in err
    newest = checkpoint.latest_step(str(workdir))
    assert newest is not None and newest >= 4
    assert _restorable(workdir, newest) == newest
    assert not os.path.exists(workdir / lock.LOCK_FILE)  # removed on the way out


_BLOCKED = """
import signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as if started from a terminal
import numpy as np
from jaxlm.main import preempt
preempt.Preemption(600)
a = np.random.default_rng(0).random((2000, 2000))
print("ready", flush=True)
start = time.time()
while time.time() - start < 120:
    a @ a  # native code: Python runs its handlers only between these calls, once per signal kind
print("finished", flush=True)
"""


def test_second_ctrl_c_exits_even_while_the_main_thread_is_inside_native_code():
    # Two SIGINTs that land during one native call reach Python's handler as one; the watcher
    # thread on the signal wakeup fd counts both as they arrive and exits.
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=100)
    assert proc.returncode == 130, err[-2000:]
    assert "second Ctrl-C: exiting now" in err and "finished" not in out
