import io
import json
import os

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, config_lib, hardware
from jaxlm.main import experiment, train
from jaxlm.metric_writer import read_metrics


def _markov_corpus(tmp_path, vocab=6, length=300_000, seed=0):
    """A first-order Markov text written by this test, with its closed-form entropy rate."""
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(vocab, 0.5), size=vocab)
    evals, evecs = np.linalg.eig(transition.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi /= pi.sum()
    entropy = float(-(pi[:, None] * transition * np.log(transition)).sum())
    states = np.empty(length, dtype=np.int64)
    s = rng.choice(vocab, p=pi)
    cumulative = np.cumsum(transition, axis=1)
    for i, u in enumerate(rng.random(length)):
        states[i] = s
        s = min(int(np.searchsorted(cumulative[s], u, side="right")), vocab - 1)
    path = tmp_path / "markov.txt"
    path.write_text("".join("abcdefghij"[k] for k in states))
    return str(path), entropy


def test_tiny_model_learns_a_markov_source_to_its_entropy_in_float32_and_bfloat16(tiny_config, tmp_path):
    path, entropy = _markov_corpus(tmp_path)
    c = tiny_config
    c.data.source = "files"
    c.data.files = path
    # 150 steps reach 1.0036x the entropy rate in both dtypes (300: 1.0004x) [AMX Xeon].
    c.train.num_steps = 150
    c.train.eval_every = 0
    c.train.eval_steps = 20
    c.optim.warmup_steps = 20
    c.data.batch_size = 16
    eval_loss = {}
    for dtype in ("float32", "bfloat16"):  # bf16 operands, f32 accumulation, f32 params
        c.model.dtype = dtype
        eval_loss[dtype] = train.run(config_lib.validate(c), str(tmp_path / dtype))["eval_loss"]
        assert eval_loss[dtype] < 1.05 * entropy, (dtype, eval_loss, entropy)
        assert eval_loss[dtype] > 0.97 * entropy  # cannot beat the source's entropy by much
    print(f"entropy rate {entropy:.4f}; eval loss {eval_loss}")
    assert abs(eval_loss["bfloat16"] - eval_loss["float32"]) < 0.02 * eval_loss["float32"], eval_loss


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_stop_and_resume_reproduces_the_uninterrupted_losses(tiny_config, text_corpus, tmp_path):
    c = tiny_config
    c.data.source = "files"
    c.data.files = text_corpus
    c.data.document = "line"
    c.model.dropout_rate = 0.1
    c.train.num_steps = 12
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_steps = 2
    c.checkpoint.every_steps = 3
    cfg = config_lib.validate(c)
    full = str(tmp_path / "full")
    train.run(cfg, full)
    part = str(tmp_path / "part")
    train.run(cfg, part, stop_at=5)
    assert checkpoint.latest_step(part) == 5
    train.run(cfg, part)
    a, b = _losses(full), _losses(part)
    assert sorted(a) == list(range(1, 13)) and sorted(b) == list(range(1, 13))
    assert [a[s] for s in range(6, 13)] == [b[s] for s in range(6, 13)]  # exact, not approximate
    with open(os.path.join(part, "config.json")) as f:
        assert json.load(f)["model"]["dropout_rate"] == 0.1


def test_a_run_resumed_with_packing_auto_keeps_the_packing_it_was_written_with(tiny_config, text_corpus, tmp_path):
    # A workdir written before packing='auto' says 'concat' and holds that pipeline's data state.
    c = tiny_config
    c.data.source, c.data.files, c.data.packing = "files", text_corpus, "concat"
    c.train.num_steps, c.train.log_every, c.train.eval_every, c.train.eval_steps = 6, 1, 0, 1
    c.checkpoint.every_steps = 3
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.run(config_lib.validate(c), full, stream=io.StringIO())
    train.run(config_lib.validate(c), part, stop_at=3, stream=io.StringIO())
    c.data.packing = "auto"  # today's default: windows for local files
    out = io.StringIO()
    train.run(config_lib.validate(c), part, stream=out)
    assert "(concat rows)" in out.getvalue()
    a, b = _losses(full), _losses(part)
    assert [a[s] for s in range(4, 7)] == [b[s] for s in range(4, 7)]
    with open(os.path.join(part, "config.json")) as f:
        assert json.load(f)["data"]["packing"] == "concat"


def test_orbax_round_trip_is_exact(tiny_config, tmp_path):
    cfg = config_lib.validate(tiny_config)
    exp = experiment.build(cfg, 263)
    state = experiment.init_state(exp, seed=3)
    manager = checkpoint.make_manager(str(tmp_path), cfg.checkpoint)
    checkpoint.save(manager, 7, state, {"next_index": 5})
    manager.wait_until_finished()
    restored, data_state = checkpoint.restore(manager, 7, exp.abstract_state)
    manager.close()
    assert data_state == {"next_index": 5}
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding == y.sharding


@pytest.mark.all_devices
def test_state_is_created_sharded_on_the_mesh(tiny_config):
    c = tiny_config
    c.mesh.shape.data = 2
    c.mesh.shape.fsdp = 4
    cfg = config_lib.validate(c)
    exp = experiment.build(cfg, 263)
    state = experiment.init_state(exp, seed=0)
    kernel = state.params["blocks"]["layer_0"]["mlp"]["wi"]["kernel"]  # [embed, mlp]: embed over fsdp
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 4, kernel.shape[1])
    mu = state.opt_state[1][0].mu["blocks"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert mu.sharding == kernel.sharding


@pytest.mark.parametrize("accum", [1, 2])
def test_grad_accumulation_matches_one_pass(tiny_config, accum):
    from functools import partial

    from jaxlm.steps import lm

    cfg = config_lib.validate(tiny_config)
    exp = experiment.build(cfg, 263)
    state = experiment.init_state(exp, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(3, 263, (8, 16)).astype(np.int32),
        "targets": rng.integers(3, 263, (8, 16)).astype(np.int32),
        "weights": (rng.random((8, 16)) > 0.2).astype(np.float32),
    }
    one = jax.jit(partial(lm.train_step, model=exp.model, tx=exp.tx))(state, batch, jax.random.key(0))
    acc = jax.jit(partial(lm.train_step, model=exp.model, tx=exp.tx, grad_accum_steps=accum))(
        state, batch, jax.random.key(0)
    )
    np.testing.assert_allclose(one[1]["loss"], acc[1]["loss"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(acc[0].params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_mfu_is_logged_against_the_device_peak_and_left_out_for_an_unknown_device(
    tiny_config, text_corpus, tmp_path, monkeypatch
):
    c = tiny_config
    c.data.source = "files"
    c.data.files = text_corpus
    c.train.num_steps = 2
    c.train.log_every = 2
    c.train.eval_every = 0
    c.train.eval_steps = 1
    cfg = config_lib.validate(c)
    out = io.StringIO()
    metrics = train.run(cfg, str(tmp_path / "known"), stream=out)
    expected = hardware.peak_flops(0.0, jax.devices()[0].device_kind, cfg.model.dtype)
    assert f"MFU vs {expected:.3g} FLOP/s per device" in out.getvalue()
    # The first line names what the auto switches chose on this machine and why.
    first = out.getvalue().splitlines()[0]
    assert first.startswith(f"jaxlm train on CPU {hardware.cpu_info().isa}: grad_barrier "), first
    assert "fuse_qkv" in first and "cond_update" in first and "matmul operands float32" in first
    assert 0 < metrics["mfu"] < 1
    monkeypatch.setattr(hardware, "DEVICE_KINDS", ())  # as on a device the table does not know
    out = io.StringIO()
    metrics = train.run(cfg, str(tmp_path / "unknown"), stream=out)
    kind = jax.devices()[0].device_kind
    assert f"no MFU (unknown device kind {kind!r}: set config.train.peak_flops)" in out.getvalue()
    assert "mfu" not in metrics and metrics["tokens_per_s"] > 0
