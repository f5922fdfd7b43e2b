"""A LoRA fine-tuning run killed with SIGKILL (also mid-way through an async checkpoint write)
resumes bitwise: its trainable tree ends identical to an uninterrupted run's. Resuming it onto a
base whose hash differs is a one-line error from the CLI (exit 2).

Reuses the LM crash test's command line and kill helper (``tests/main/crash_test.py``).
"""

import os
import signal
import subprocess

import jax
import numpy as np
import pytest
from crash_test import NUM_STEPS, _args, _env, _kill_when

from jaxlm import checkpoint, config_lib, param_paths
from jaxlm.checkpoint import KILL_DURING_SAVE_ENV
from jaxlm.main import merge
from jaxlm.main import workdir as workdir_lib


def _peft_args(workdir, corpus, data_dir, base):
    return _args(
        workdir,
        corpus,
        data_dir,
        "--config.peft.method=lora",
        "--config.peft.rank=2",
        "--config.peft.dropout=0.1",  # LoRA dropout draws from the step's rng too
        "--config.peft.targets=attn/(query|value),mlp/wo",
        "--config.optim.lr=1e-2",
        f"--config.checkpoint.init_from={base}",
    )


def _trainable(workdir):
    config = config_lib.validate(workdir_lib.saved_config(str(workdir)))
    _, _, state, _, step = merge.open_peft(config, str(workdir))
    return step, param_paths.flatten(jax.tree.map(np.asarray, jax.device_get(state.params)))


def _run(args, **kw):
    return subprocess.run(args, env=kw.pop("env", _env(1)), capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_lora_run_killed_anywhere_resumes_bitwise_and_refuses_another_base(text_corpus, tmp_path):
    data_dir, base = tmp_path / "d", tmp_path / "base"
    done = _run(_args(base, text_corpus, data_dir, "--config.train.num_steps=3"))
    assert done.returncode == 0, done.stderr[-2000:]

    clean = tmp_path / "clean"
    done = _run(_peft_args(clean, text_corpus, data_dir, base))
    assert done.returncode == 0, done.stderr[-2000:]

    crashed = tmp_path / "crashed"
    # Killed while the async save of step 6 is in flight (fault injection), then twice more mid-run.
    proc = _run(_peft_args(crashed, text_corpus, data_dir, base), env=dict(_env(1), **{KILL_DURING_SAVE_ENV: "6"}))
    assert proc.returncode == -signal.SIGKILL
    kills = 1
    for point in (5, 11):
        resumed_from = checkpoint.latest_step(str(crashed)) or 0
        proc = subprocess.Popen(
            _peft_args(crashed, text_corpus, data_dir, base),
            env=_env(1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _kill_when(proc, crashed, resumed_from + point % 4 + 1)
        kills += proc.returncode == -signal.SIGKILL
    done = _run(_peft_args(crashed, text_corpus, data_dir, base))
    assert done.returncode == 0, done.stderr[-2000:]
    assert kills >= 2

    step, resumed = _trainable(crashed)
    _, once = _trainable(clean)
    assert step == NUM_STEPS and resumed.keys() == once.keys()
    assert any(k.startswith("delta/") for k in once)
    for path in once:
        np.testing.assert_array_equal(resumed[path], once[path], err_msg=path)
    assert np.abs(once["delta/blocks/layer_0/attn/query/kernel/lora_b"]).max() > 1e-4  # the adapters trained

    # The same run resumed onto another base (the seed's initialization instead of base): one line, exit 2.
    args = [a for a in _peft_args(crashed, text_corpus, data_dir, base) if "init_from" not in a]
    args[args.index(f"--config.train.num_steps={NUM_STEPS}")] = f"--config.train.num_steps={NUM_STEPS + 2}"
    refused = _run(args)
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "were trained on base" in lines[0] and "use a new workdir" in lines[0], lines
    assert checkpoint.latest_step(str(crashed)) == NUM_STEPS and os.path.isdir(crashed)
