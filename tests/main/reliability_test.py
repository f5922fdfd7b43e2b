"""Numerics guard, damaged checkpoints and preemption."""

import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_env import subprocess_env

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


@pytest.mark.parametrize("cond_update", [False, True])
def test_nonfinite_step_leaves_the_state_unchanged(tiny_config, cond_update):
    cfg = config_lib.validate(tiny_config)
    exp = experiment.build(cfg, 263)
    state = experiment.init_state(exp, seed=0)
    params = jax.tree.map(lambda x: x, state.params)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    poisoned = state.replace(params=params)
    step = jax.jit(partial(lm.train_step, model=exp.model, tx=exp.tx, cond_update=cond_update))
    new, metrics = step(poisoned, _batch(), jax.random.key(0))
    assert float(metrics["nonfinite"]) == 1.0 and int(new.step) == 1
    for a, b in zip(
        jax.tree.leaves((poisoned.params, poisoned.opt_state)), jax.tree.leaves((new.params, new.opt_state))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    good, metrics = step(state, _batch(), jax.random.key(0))
    assert float(metrics["nonfinite"]) == 0.0


def test_cond_update_and_select_update_give_the_same_state(tiny_config):
    cfg = config_lib.validate(tiny_config)
    exp = experiment.build(cfg, 263)
    state = experiment.init_state(exp, seed=0)
    new = {}
    for cond_update in (False, True):
        step = jax.jit(partial(lm.train_step, model=exp.model, tx=exp.tx, cond_update=cond_update))
        s, _ = step(jax.tree.map(jnp.copy, state), _batch(), jax.random.key(0))
        new[cond_update], _ = step(s, _batch(), jax.random.key(1))
    leaves = [jax.tree.leaves((n.params, n.opt_state)) for n in new.values()]
    moved = [jax.tree.leaves(state.params), jax.tree.leaves(new[True].params)]
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*moved))
    for a, b in zip(*leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_cond_update_auto_is_on_for_cpu_only(tiny_config):
    exp = experiment.build(config_lib.validate(tiny_config), 263)
    assert experiment.train_step_fn(exp).keywords["cond_update"] == (jax.default_backend() == "cpu")
    tiny_config.train.cond_update = "off"
    exp = experiment.build(config_lib.validate(tiny_config), 263)
    assert experiment.train_step_fn(exp).keywords["cond_update"] is False


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


def _truncate_arrays(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(16)


def _remove_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _wrong_shapes(step_dir):
    # Replace the newest checkpoint by one of a wider model: same names, other shapes.
    wide = experiment.build(config_lib.validate(_wide_config()), 263)
    state = experiment.init_state(wide, seed=0)
    shutil.rmtree(step_dir)
    manager = checkpoint.make_manager(os.path.dirname(os.path.dirname(step_dir)), _wide_cfg().checkpoint)
    checkpoint.save(manager, int(os.path.basename(step_dir)), state, {})
    manager.wait_until_finished()
    manager.close()


def _wide_config():
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "gpt.py") + ":size=tiny")
    c.model.embed_dim = 128
    return c


def _wide_cfg():
    return config_lib.validate(_wide_config())


@pytest.mark.parametrize("damage", [_truncate_arrays, _remove_metadata, _wrong_shapes], ids=lambda f: f.__name__)
def test_damaged_latest_checkpoint_is_skipped(damage, tiny_config, text_corpus, tmp_path):
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
    damage(os.path.join(workdir, "checkpoints", "6"))
    exp = experiment.build(cfg, 263)
    manager = checkpoint.make_manager(workdir, cfg.checkpoint)
    messages = []
    step, _, _ = checkpoint.restore_latest_good(manager, exp.abstract_state, log=messages.append)
    manager.close()
    assert step == 3 and "step 6 is damaged" in messages[0]
    # And training resumes from step 3 to the end.
    train.run(cfg, workdir)
    assert checkpoint.latest_step(workdir) == 6


def test_old_checkpoints_are_deleted_only_after_a_newer_one_is_complete(tiny_config, text_corpus, tmp_path):
    c = tiny_config
    c.data.source = "files"
    c.data.files = text_corpus
    c.train.num_steps = 8
    c.checkpoint.every_steps = 2
    c.checkpoint.max_to_keep = 2
    workdir = tmp_path / "w"
    train.run(config_lib.validate(c), str(workdir))
    steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    assert steps == [6, 8]
    for step in steps:
        assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists() or (
            workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA"
        ).exists()


def test_no_load_path_unpickles():
    # Checkpoints are Orbax, metadata and tokenizers JSON, weights safetensors: no pickle anywhere.
    offenders = []
    for root, _, files in os.walk(os.path.join(REPO, "jaxlm")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(root, name)).read()
                if "import pickle" in text or "pickle.load" in text or "weights_only=False" in text:
                    offenders.append(name)
    assert not offenders


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

    env = subprocess_env()
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


def test_default_sentencepiece_vocab_is_capped_with_a_notice_and_an_explicit_one_is_an_error(tmp_path):
    import io

    from jaxlm.common_types import DataError
    from jaxlm.data import sources, tokenizers_sp
    from jaxlm.main import workdir as workdir_lib

    c = config_lib.base_config()
    c.data.tokenizer = "sentencepiece_bpe"
    c.data.seq_len = 16
    texts = sources.ListSource([f"line {i} of a small corpus with few distinct words\n" * 4 for i in range(10)])
    notices = io.StringIO()
    tok = workdir_lib.open_tokenizer(config_lib.validate(c), str(tmp_path), texts, stream=notices)
    lines = notices.getvalue().strip().splitlines()
    assert 7 < tok.vocab_size < tokenizers_sp.DEFAULT_VOCAB_SIZE
    assert len(lines) == 1 and lines[0].startswith("notice: ") and f"using {tok.vocab_size}" in lines[0]
    c.data.tokenizer_vocab_size = 8000  # said explicitly: not capped
    with pytest.raises(
        DataError, match=f"Vocabulary size too high \\(8000\\): the corpus supports at most {tok.vocab_size}"
    ):
        workdir_lib.open_tokenizer(config_lib.validate(c), str(tmp_path), texts)
    c.data.tokenizer_vocab_size = 0
    c.data.seq_len = c.model.max_len = 4096  # one row needs 4097 tokens: more than the corpus holds
    with pytest.raises(DataError, match="fewer than one row of config.data.seq_len \\+ 1 = 4097 tokens"):
        workdir_lib.open_tokenizer(config_lib.validate(c), str(tmp_path), texts)
