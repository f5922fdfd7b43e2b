"""Meshes from config, state created sharded, sharded training == single-device training.

The equivalence runs use the tiny GPT with 8 heads and the vocabulary padded from the byte
tokenizer's 263 to 264, so that every mesh axis of size 8 divides what it shards.
"""

import contextlib
import io
import math
import os
import re
import types

import jax
import numpy as np
import pytest

from jaxlm import config_lib, sharding
from jaxlm.common_types import ConfigError
from jaxlm.main import experiment, train
from jaxlm.metric_writer import read_metrics

pytestmark = pytest.mark.all_devices  # every mesh here spans the simulated devices (conftest.py)

AXES = ("data", "fsdp", "tensor", "sequence")
MESHES = {
    "data=8": {"data": 8},
    "fsdp=8": {"fsdp": 8},
    "tensor=8": {"tensor": 8},
    "data=2,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _mesh_cfg(shape, dcn=None):
    full = {a: 1 for a in AXES}
    full.update(shape)
    return config_lib.MeshConfig(shape=full, dcn_shape={a: (dcn or {}).get(a, 1) for a in AXES})


def _set_mesh(c, mesh):
    for axis in AXES:
        c.mesh.shape[axis] = mesh.get(axis, 1)
    return c


def _eight_heads(c):
    c.model.num_heads = 8
    c.model.vocab_size = 264
    c.model.position = "rope"  # learned positions have no heads/mlp/vocab axis: tensor leaves them replicated
    # The equivalence runs' length: the fsdp=8 init program below is then the one they compile (one
    # compilation for the session's cache instead of two).
    c.data.seq_len = 32
    return c


@contextlib.contextmanager
def _on_devices(devices):
    """Build every mesh over ``devices`` only (the single-device baseline)."""
    original = sharding.make_mesh
    sharding.make_mesh = lambda cfg, devs=None: original(cfg, devices)
    try:
        yield
    finally:
        sharding.make_mesh = original


# ---- Mesh shapes.


@pytest.mark.parametrize(
    "shape, expected",
    [
        ({"data": -1}, {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}),
        ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}),
        ({"tensor": -1, "sequence": 2}, {"data": 1, "fsdp": 1, "tensor": 4, "sequence": 2}),
        ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}),
    ],
)
def test_mesh_shape_fills_one_minus_one(shape, expected):
    assert sharding.resolve_mesh_shape(_mesh_cfg(shape), 8) == expected


def test_mesh_shape_per_slice_with_dcn():
    # 16 devices in 2 slices: the -1 is filled from the 8 devices of a slice.
    assert sharding.resolve_mesh_shape(_mesh_cfg({"fsdp": -1}, {"data": 2}), 16)["fsdp"] == 8


@pytest.mark.parametrize(
    "shape, dcn, message",
    [
        (
            {"data": 3},
            None,
            "config.mesh.shape data=3,fsdp=1,tensor=1,sequence=1 multiplies to 3 but there are 8 devices",
        ),
        ({"data": 2, "fsdp": 2}, None, "multiplies to 4 but there are 8 devices"),
        ({"data": 3, "fsdp": -1}, None, "the fixed sizes multiply to 3, which does not divide the 8 devices"),
        ({"data": -1}, {"data": 3}, "asks for 3 slices, which does not divide the 8 devices"),
        ({"data": 8}, {"fsdp": 2}, "multiplies to 8 but there are 4 devices per slice (2 slices)"),
    ],
)
def test_mesh_that_does_not_fit_the_devices_names_the_numbers(shape, dcn, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        sharding.resolve_mesh_shape(_mesh_cfg(shape, dcn), 8)


def test_at_most_one_axis_is_filled_automatically(tiny_config):
    c = _set_mesh(tiny_config, {"data": -1, "fsdp": -1})
    with pytest.raises(ConfigError, match="at most one -1"):
        config_lib.validate(c)


def test_make_mesh_uses_every_device_with_auto_axes():
    mesh = sharding.make_mesh(_mesh_cfg({"data": 2, "fsdp": -1}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_make_mesh_over_given_devices():
    mesh = sharding.make_mesh(_mesh_cfg({"data": -1}), jax.devices()[:1])
    assert mesh.size == 1 and mesh.devices.flat[0] == jax.devices()[0]


def _fake_devices(slices, per_slice, *, slice_attr=True):
    out = []
    for s in range(slices):
        for i in range(per_slice):
            d = types.SimpleNamespace(id=s * per_slice + i, process_index=s, platform="cpu", device_kind="fake")
            if slice_attr:
                d.slice_index = s
            out.append(d)
    return out


@pytest.mark.parametrize("slice_attr", [True, False], ids=["tpu-slices", "hosts-as-slices"])
def test_dcn_axes_are_the_outer_part_of_each_axis(slice_attr):
    # 2 slices x 4 devices: data is split across slices (dcn), fsdp inside them (ici).
    devices = _fake_devices(2, 4, slice_attr=slice_attr)
    grid = sharding.device_grid(_mesh_cfg({"fsdp": -1}, {"data": 2}), devices)
    assert grid.shape == (2, 4, 1, 1)
    assert {d.process_index for d in grid[0].flat} == {0} and {d.process_index for d in grid[1].flat} == {1}
    # dcn on fsdp: the fsdp axis (size 2 x 2) has slice 0 in its first half.
    grid = sharding.device_grid(_mesh_cfg({"data": 2, "fsdp": 2}, {"fsdp": 2}), devices)
    assert grid.shape == (2, 4, 1, 1)
    assert {d.process_index for d in grid[:, :2].flat} == {0} and {d.process_index for d in grid[:, 2:].flat} == {1}


def test_dcn_without_as_many_slices_is_a_config_error():
    with pytest.raises(ConfigError, match=r"asks for 2 slices but the 8 devices have no slice indices and 1 process"):
        sharding.make_mesh(_mesh_cfg({"data": -1}, {"data": 2}))


# ---- State created sharded; bytes per device.


def test_fsdp_state_is_never_whole_on_one_device(tiny_config, monkeypatch):
    cfg = config_lib.validate(_set_mesh(_eight_heads(tiny_config), {"fsdp": 8}))
    exp = experiment.build(cfg, 263)
    jitted = []
    real_jit = jax.jit

    def spy_jit(fun, **kwargs):
        jitted.append(real_jit(fun, **kwargs))
        return jitted[-1]

    monkeypatch.setattr(jax, "jit", spy_jit)
    state = experiment.init_state(exp, seed=0)
    monkeypatch.setattr(jax, "jit", real_jit)

    total = sum(x.nbytes for x in jax.tree.leaves(state))
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = leaf.sharding.spec
        if "fsdp" not in spec:
            continue
        dim = list(spec).index("fsdp")
        expected = leaf.shape[:dim] + (leaf.shape[dim] // 8,) + leaf.shape[dim + 1 :]
        shapes = {s.data.shape for s in leaf.addressable_shards}
        assert shapes == {expected}, (jax.tree_util.keystr(path), shapes)
        assert len(leaf.addressable_shards) == 8
    # The init program itself never builds a whole weight: no full kernel/embedding shape in its
    # per-device HLO, and its peak per-device memory is a fraction of the state.
    (init,) = jitted
    import flax.linen as nn

    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        compiled = init.lower(jax.random.key(0)).compile()
    hlo = compiled.as_text()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        if leaf.ndim >= 2 and "fsdp" in leaf.sharding.spec:
            assert "[" + ",".join(map(str, leaf.shape)) + "]" not in hlo, jax.tree_util.keystr(path)
    memory = compiled.memory_analysis()
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < total / 4


def _abstract_bytes_per_device(abstract_state):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


@pytest.mark.parametrize("name", list(MESHES))
def test_state_bytes_per_device_shrink_by_fsdp_times_tensor(tiny_config, name):
    mesh = MESHES[name]
    c = _eight_heads(tiny_config)
    with _on_devices(jax.devices()[:1]):
        one = _abstract_bytes_per_device(experiment.build(config_lib.validate(c), 263).abstract_state)
    exp = experiment.build(config_lib.validate(_set_mesh(c, mesh)), 263)
    per_device = _abstract_bytes_per_device(exp.abstract_state)
    factor = mesh.get("fsdp", 1) * mesh.get("tensor", 1)
    assert one / per_device == pytest.approx(factor, rel=0.1), (one, per_device)


def test_bytes_per_device_counts_real_shards(tiny_config):
    exp = experiment.build(config_lib.validate(_set_mesh(_eight_heads(tiny_config), {"fsdp": 8})), 263)
    state = experiment.init_state(exp, seed=0)
    measured = sharding.bytes_per_device(state)
    assert len(measured) == 8 and set(measured.values()) == {_abstract_bytes_per_device(exp.abstract_state)}


# ---- Errors instead of hangs or tracebacks.


def test_mesh_that_does_not_match_the_devices_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match=r"multiplies to 6 but there are 8 devices"):
        experiment.build(config_lib.validate(_set_mesh(tiny_config, {"data": 3, "tensor": 2})), 263)


def test_axis_that_does_not_divide_heads_is_a_config_error(tiny_config):
    assert tiny_config.model.num_heads == 4
    c = _set_mesh(tiny_config, {"tensor": 8})
    c.model.vocab_size = 264
    with pytest.raises(ConfigError, match=r"dimension of 4 that mesh axes tensor \(size 8\) do not divide"):
        experiment.build(config_lib.validate(c), 263)


def test_batch_that_the_mesh_does_not_divide_is_a_config_error(tiny_config, text_corpus):
    c = _set_mesh(tiny_config, {"data": 8})
    c.data.source = "files"
    c.data.files = text_corpus
    c.data.batch_size = 4
    with pytest.raises(ConfigError, match=r"batch_size=4 must be divisible by the 8 batch shards"):
        train.run(config_lib.validate(c), str(tiny_config.data.data_dir) + "-w")


def test_mesh_that_makes_processes_share_batch_rows_is_a_config_error(monkeypatch):
    # With 2 processes each reading its own half of the batch, a batch replicated over all devices
    # (tensor=8) would need the same rows on both: refused instead of mixing different data.
    mesh = sharding.make_mesh(_mesh_cfg({"tensor": 8}))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    rules = config_lib.validate(config_lib.base_config()).sharding.as_tuples()
    batch = {"inputs": np.zeros((4, 16), np.int32)}
    with pytest.raises(
        ConfigError, match=r"gives process 0 of 2 8 of the 8 batch rows, but each process reads its own 4"
    ):
        sharding.host_to_global(batch, mesh, rules)


# ---- Sharded training == single-device training.


def _train_losses(config, workdir):
    train.run(config, workdir, stream=io.StringIO())
    return np.array([r["loss"] for r in read_metrics(workdir) if "loss" in r])


def _equivalence_config(c, text_corpus):
    c = _eight_heads(c)
    c.data.source = "files"
    c.data.files = text_corpus
    c.data.document = "line"
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.train.num_steps = 20
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_steps = 1
    c.checkpoint.every_steps = 20
    return c


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-device")
    corpus = tmp / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over the lazy dog and runs away into the forest".split()
    rng = np.random.default_rng(0)
    for i in range(6):
        lines = [" ".join(rng.choice(words, size=int(rng.integers(4, 14)))) for _ in range(50)]
        (corpus / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    c = config_lib.load_config_file(str(_repo_file("configs/gpt.py")) + ":size=tiny")
    c.data.data_dir = str(tmp / "datasets")
    c.train.progress = False
    c = _equivalence_config(c, str(corpus / "*.txt"))
    with _on_devices(jax.devices()[:1]):
        losses = _train_losses(config_lib.validate(c), str(tmp / "w"))
    assert len(losses) == 20
    return c, losses


def _repo_file(path):
    import pathlib

    return pathlib.Path(__file__).resolve().parent.parent / path


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_training_matches_one_device(single_device_losses, tmp_path, name):
    c, one = single_device_losses
    c = config_lib.from_json(config_lib.to_json(c))
    losses = _train_losses(config_lib.validate(_set_mesh(c, MESHES[name])), str(tmp_path / "w"))
    rel = np.max(np.abs(losses - one) / np.abs(one))
    print(f"{name}: max relative loss difference over 20 steps {rel:.2e}")
    assert rel < 1e-4, (losses, one)


@pytest.mark.parametrize("config_name", ["bert", "t5", "rnn"])
def test_every_model_family_trains_on_a_2x2x2_mesh_like_on_one_device(config_name, tmp_path, text_corpus):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    losses = []
    for mesh in ({"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        c = config_lib.load_config_file(os.path.join(repo, "configs", f"{config_name}.py") + ":size=tiny")
        c.data.source = "files"
        c.data.files = text_corpus
        c.data.data_dir = str(tmp_path / "d")
        # One layer per stack: each family's own modules (T5's relative bias and cross-attention,
        # BERT's MLM head, the LSTM) are all in it, at about half the compilation of two; the GPT
        # runs above check stacked layers on every mesh. Only the final eval and checkpoint: what
        # is compared is the training loss.
        c.model.num_layers = c.model.num_decoder_layers = 1
        c.train.num_steps = 3
        c.train.log_every = 1
        c.train.eval_every = 0
        c.train.eval_steps = 1
        c.checkpoint.every_steps = 3
        c.train.progress = False
        c.model.vocab_size = 384  # divisible by the tensor axis (263 byte ids + 100 T5 sentinels fit)
        for axis in ("data", "fsdp", "tensor", "sequence"):
            c.mesh.shape[axis] = mesh.get(axis, 1)
        workdir = tmp_path / "_".join(f"{k}{v}" for k, v in mesh.items())
        train.run(config_lib.validate(c), str(workdir))
        losses.append([r["loss"] for r in read_metrics(str(workdir)) if "loss" in r])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
