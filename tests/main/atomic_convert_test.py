"""kill -9 during `jaxlm convert --from hf` leaves no workdir that eval, generate or train could take
for a finished import; the next convert clears the leftover and completes."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from subprocess_env import subprocess_env

from jaxlm import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=300)
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(d))
    return str(d)


def _convert(hf_dir, workdir):
    env = subprocess_env(PYTHONPATH=REPO)
    args = [sys.executable, "-m", "jaxlm", "convert", "--from", "hf", hf_dir, "--workdir", str(workdir)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staging(workdir):
    return glob.glob(os.path.join(os.path.dirname(workdir), f".{os.path.basename(workdir)}.converting-*"))


@pytest.mark.slow
def test_kill_9_during_convert_leaves_no_workdir_and_the_next_convert_completes(gpt2_dir, tmp_path):
    workdir = str(tmp_path / "imported")
    killed_mid_write = False
    for _ in range(3):  # the write takes a moment; catch it under way
        proc = _convert(gpt2_dir, workdir)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not _staging(workdir):
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            killed_mid_write = not os.path.exists(workdir)
            if not killed_mid_write:  # the rename won the race: what is there is complete
                assert checkpoint.latest_step(workdir) == 0
            break
    assert killed_mid_write
    assert _staging(workdir)  # the half-written import stays out of the way
    done = _convert(gpt2_dir, workdir)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    assert checkpoint.latest_step(workdir) == 0 and os.path.isfile(os.path.join(workdir, "config.json"))
    assert not _staging(workdir)  # the dead convert's leftover was cleared
