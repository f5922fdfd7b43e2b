"""``jaxlm train`` of configs/seqgan.py (tiny): it runs, resumes bitwise, samples with ``jaxlm generate``,
matches single-device training on 8 simulated devices, and survives kill -9 anywhere."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from subprocess_env import subprocess_env

from jaxlm import checkpoint, cli, config_lib, sharding
from jaxlm.main import gan
from jaxlm.main import workdir as workdir_lib
from jaxlm.metric_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQGAN = os.path.join(REPO, "configs", "seqgan.py")


def _config(arg="size=tiny", **overrides):
    c = config_lib.load_config_file(f"{SEQGAN}:{arg}")
    c.train.progress = False
    config_lib.apply_overrides(c, {k: str(v) for k, v in overrides.items()})
    return config_lib.validate(c)


def _final_state(workdir):
    saved = workdir_lib.saved_config(str(workdir))
    saved.mesh.shape.data = -1  # restore onto all devices, whatever mesh wrote it
    cfg = config_lib.validate(saved)
    built = gan.build(cfg, 5000, 0, 0)
    manager = checkpoint.make_manager(str(workdir), cfg.checkpoint)
    step = manager.latest_step()
    state, data = checkpoint.restore(manager, step, built.abstract_state)
    manager.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(state)], data


def test_train_resume_bitwise_then_generate(tmp_path, capsys):
    cfg = _config()
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    last = gan.run(cfg, str(clean))
    assert np.isfinite(last["nll_oracle"]) and np.isfinite(last["nll_test"]) and 0 < last["distinct1"] <= 1
    logged = read_metrics(str(clean))
    assert any("g_mle_loss" in r for r in logged) and any("d_loss" in r for r in logged)
    assert any("g_pg_loss" in r for r in logged)
    gan.run(cfg, str(resumed), stop_at=5)
    assert checkpoint.latest_step(str(resumed)) == 5
    gan.run(cfg, str(resumed))
    step_a, a, data_a = _final_state(clean)
    step_b, b, data_b = _final_state(resumed)
    assert step_a == step_b == 9 and data_a == data_b
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)

    capsys.readouterr()
    assert cli.run(["generate", "--workdir", str(resumed), "--format", "ids", "--num_samples", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 20 for line in lines)
    assert all(0 <= int(t) < 5000 for line in lines for t in line.split())


@pytest.mark.slow
def test_gumbel_wgan_gp_with_transformer_models_trains(tmp_path):
    cfg = _config("size=tiny,mode=gumbel,generator=transformer,discriminator=transformer,loss=wgan_gp")
    last = gan.run(cfg, str(tmp_path / "w"), stream=open(os.devnull, "w"))
    logged = read_metrics(str(tmp_path / "w"))
    assert any("g_adv_loss" in r for r in logged) and np.isfinite(last["nll_oracle"])
    temps = [r["temperature"] for r in logged if "temperature" in r]
    assert temps and all(t >= 1.0 for t in temps)


@pytest.mark.all_devices
@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
    cfg = _config()
    original = sharding.make_mesh
    sharding.make_mesh = lambda c, devs=None: original(c, jax.devices()[:1])
    try:
        gan.run(_config(**{"mesh.shape.data": 1}), str(tmp_path / "one"))
    finally:
        sharding.make_mesh = original
    gan.run(cfg, str(tmp_path / "eight"))
    _, one, _ = _final_state(tmp_path / "one")
    _, eight, _ = _final_state(tmp_path / "eight")
    for x, y in zip(one, eight):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


def _args(workdir):
    return [
        sys.executable,
        "-m",
        "jaxlm",
        "train",
        "--config",
        f"{SEQGAN}:size=tiny",
        "--workdir",
        str(workdir),
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=2",
        "--config.train.progress=false",
    ]


@pytest.mark.slow
def test_sigkill_anywhere_then_restart_is_bitwise_identical(tmp_path):
    env = subprocess_env(8)
    clean = subprocess.run(_args(tmp_path / "clean"), env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    crashed = tmp_path / "crashed"
    # Killed while the async save of step 4 is in flight, then at later points after restarts.
    proc = subprocess.run(
        _args(crashed), env=dict(env, **{checkpoint.KILL_DURING_SAVE_ENV: "4"}), capture_output=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL
    for extra in (1, 2):
        resumed_from = checkpoint.latest_step(str(crashed)) or 0
        proc = subprocess.Popen(_args(crashed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = [r["step"] for r in read_metrics(str(crashed)) if "nonfinite_steps" in r]
            if steps and max(steps) >= resumed_from + extra:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    final = subprocess.run(_args(crashed), env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    _, a, data_a = _final_state(tmp_path / "clean")
    _, b, data_b = _final_state(crashed)
    assert data_a == data_b
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
