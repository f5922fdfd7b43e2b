"""Numerics guard, damaged checkpoints and preemption."""

import os
import signal
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, config_lib
from jaxlm.main import experiment, train
from jaxlm.metric_writer import read_metrics
from jaxlm.steps import lm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batch():
    rng = np.random.default_rng(0)
    return {
        "inputs": rng.integers(3, 200, (8, 16)).astype(np.int32),
        "targets": rng.integers(3, 200, (8, 16)).astype(np.int32),
        "weights": np.ones((8, 16), np.float32),
    }


def test_nonfinite_step_leaves_the_state_unchanged(tiny_config):
    cfg = config_lib.validate(tiny_config)
    exp = experiment.build(cfg, 263)
    state = experiment.init_state(exp, seed=0)
    params = jax.tree.map(lambda x: x, state.params)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    poisoned = state.replace(params=params)
    step = jax.jit(partial(lm.train_step, model=exp.model, tx=exp.tx))
    new, metrics = step(poisoned, _batch(), jax.random.key(0))
    assert float(metrics["nonfinite"]) == 1.0 and int(new.step) == 1
    for a, b in zip(
        jax.tree.leaves((poisoned.params, poisoned.opt_state)), jax.tree.leaves((new.params, new.opt_state))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    good, metrics = step(state, _batch(), jax.random.key(0))
    assert float(metrics["nonfinite"]) == 0.0


def test_diverging_run_stops_with_a_clear_error_and_finite_checkpoints(tiny_config, text_corpus, tmp_path):
    c = tiny_config
    c.data.source = "files"
    c.data.files = text_corpus
    c.optim.lr = 1e30  # guaranteed to blow up
    c.optim.clip_norm = 0.0
    c.optim.warmup_steps = 0
    c.train.num_steps = 40
    c.train.log_every = 2
    c.train.max_nonfinite_steps = 3
    c.checkpoint.every_steps = 1
    workdir = str(tmp_path / "w")
    with pytest.raises(train.NonFiniteError, match=r"non-finite loss or gradients in 3 step\(s\) in a row"):
        train.run(config_lib.validate(c), workdir)
    cfg = config_lib.validate(c)
    exp = experiment.build(cfg, 263)
    manager = checkpoint.make_manager(workdir, cfg.checkpoint)
    for step in manager.all_steps():
        state, _ = checkpoint.restore(manager, step, exp.abstract_state)
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
    manager.close()


def test_damaged_latest_checkpoint_is_skipped(tiny_config, text_corpus, tmp_path):
    c = tiny_config
    c.data.source = "files"
    c.data.files = text_corpus
    c.train.num_steps = 6
    c.train.log_every = 1
    c.checkpoint.every_steps = 3
    c.checkpoint.max_to_keep = 5
    cfg = config_lib.validate(c)
    workdir = str(tmp_path / "w")
    train.run(cfg, workdir)
    latest = os.path.join(workdir, "checkpoints", "6", "state")
    # Truncate every array file of the newest checkpoint.
    for root, _, files in os.walk(latest):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(16)
    exp = experiment.build(cfg, 263)
    manager = checkpoint.make_manager(workdir, cfg.checkpoint)
    messages = []
    step, _, _ = checkpoint.restore_latest_good(manager, exp.abstract_state, log=messages.append)
    manager.close()
    assert step == 3 and "step 6 is damaged" in messages[0]


def test_sigterm_saves_the_current_step_and_exits_zero_then_resumes_exactly(text_corpus, tmp_path):
    def args(workdir):
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
            f"--config.data.files={text_corpus}",
            f"--config.data.data_dir={tmp_path / 'd'}",
            "--config.train.num_steps=400",
            "--config.train.log_every=1",
            "--config.train.eval_every=0",
            "--config.train.eval_steps=1",
            "--config.checkpoint.every_steps=1000",
            "--config.train.progress=false",
            "--config.optim.schedule=constant",
            "--config.optim.warmup_steps=0",
        ]

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    workdir = tmp_path / "w"
    proc = subprocess.Popen(args(workdir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any("loss" in r for r in read_metrics(str(workdir))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted: saved step" in out
    saved = checkpoint.latest_step(str(workdir))
    assert saved is not None and 0 < saved < 400
    # With a constant learning rate the schedule does not depend on num_steps, so resuming with a
    # smaller num_steps must reproduce an uninterrupted run of that length step for step.
    end = saved + 4
    resumed = subprocess.run(
        args(workdir) + [f"--config.train.num_steps={end}"], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    fresh = subprocess.run(
        args(tmp_path / "fresh") + [f"--config.train.num_steps={end}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    losses = lambda w: {r["step"]: r["loss"] for r in read_metrics(str(w)) if "loss" in r}  # noqa: E731
    a, b = losses(workdir), losses(tmp_path / "fresh")
    assert [a[s] for s in range(saved + 1, end + 1)] == [b[s] for s in range(saved + 1, end + 1)]
