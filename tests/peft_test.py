"""jaxlm.peft: LoRA / DoRA / IA3 / BitFit transforms against NumPy references, the trainable tree, config errors."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, param_paths, peft, sharding
from jaxlm.common_types import ConfigError
from jaxlm.main import experiment
from jaxlm.train_state import TrainState


def _config(tiny_config, **peft_overrides):
    for key, value in peft_overrides.items():
        setattr(tiny_config.peft, key, value)
    return config_lib.validate(tiny_config)


def _randomize(trainable, seed=1):
    """Non-zero values everywhere (LoRA B starts at zero, which would hide a wrong merge)."""
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _base_and_trainable(cfg, vocab=263):
    exp = experiment.build(cfg, vocab)
    base = experiment.init_params(exp, 0)
    trainable = _randomize(peft.init(jax.random.key(3), base, cfg.peft))
    return exp, base, trainable


def test_lora_dora_ia3_kernels_match_numpy_references(tiny_config):
    cfg = _config(tiny_config, method="dora,ia3", targets="attn/(query|out),mlp/wo", rank=4, alpha=8.0)
    _, base, trainable = _base_and_trainable(cfg)
    merged = param_paths.flatten(peft.merge(base, trainable, cfg.peft))
    flat_base = param_paths.flatten(base)
    delta = param_paths.flatten(trainable["delta"])
    for path, (n_in, n_out) in {
        "blocks/layer_0/attn/query/kernel": (64, 64),  # [D, N, H]: one input axis
        "blocks/layer_1/attn/out/kernel": (64, 64),  # [N, H, D]: two input axes
        "blocks/layer_0/mlp/wo/kernel": (256, 64),  # IA3 scales the inputs of the MLP output
    }.items():
        w = np.asarray(flat_base[path], np.float64).reshape(n_in, n_out)
        a, b = (np.asarray(delta[f"{path}/{n}"], np.float64) for n in ("lora_a", "lora_b"))
        v = w + (8.0 / 4) * a @ b
        v = np.asarray(delta[f"{path}/magnitude"]) * v / np.linalg.norm(v, axis=0, keepdims=True)
        s = np.asarray(delta[f"{path}/scale"], np.float64)
        v = v * (s[:, None] if "mlp/wo" in path else s[None, :])
        got = np.asarray(merged[path]).reshape(n_in, n_out)
        np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6, err_msg=path)
    # IA3 on outputs scales the bias too; on the MLP's inputs the bias stays.
    q_scale = np.asarray(delta["blocks/layer_0/attn/query/kernel/scale"]).reshape(4, 16)
    np.testing.assert_allclose(
        merged["blocks/layer_0/attn/query/bias"], np.asarray(flat_base["blocks/layer_0/attn/query/bias"]) * q_scale
    )
    np.testing.assert_array_equal(merged["blocks/layer_0/mlp/wo/bias"], flat_base["blocks/layer_0/mlp/wo/bias"])
    # Untargeted parameters are the base's.
    np.testing.assert_array_equal(merged["blocks/layer_0/attn/key/kernel"], flat_base["blocks/layer_0/attn/key/kernel"])


def test_unmerged_lora_forward_equals_the_merged_kernel(tiny_config):
    """x W' == x W + s (x A) B, the form LoRA is usually written in (non-zero B)."""
    cfg = _config(tiny_config, method="lora", rank=2, alpha=4.0)
    _, base, trainable = _base_and_trainable(cfg)
    path = "blocks/layer_1/attn/value/kernel"
    w = np.asarray(param_paths.flatten(base)[path]).reshape(64, 64)
    d = param_paths.flatten(trainable["delta"])
    a, b = np.asarray(d[f"{path}/lora_a"]), np.asarray(d[f"{path}/lora_b"])
    x = np.random.default_rng(0).normal(size=(5, 64))
    merged = np.asarray(param_paths.flatten(peft.merge(base, trainable, cfg.peft))[path]).reshape(64, 64)
    np.testing.assert_allclose(x @ merged, x @ w + 2.0 * (x @ a) @ b, rtol=1e-5, atol=1e-5)


def test_fresh_lora_is_the_base_and_trainable_tree_is_small(tiny_config):
    cfg = _config(tiny_config, method="lora,bitfit", rank=4)
    exp = experiment.build(cfg, 263)
    base = experiment.init_params(exp, 0)
    trainable = peft.init(jax.random.key(0), base, cfg.peft)
    for got, want in zip(jax.tree.leaves(peft.merge(base, trainable, cfg.peft)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(got, want)
    # 2 layers x (query, value) x (64 x 4 + 4 x 64) LoRA + every bias.
    biases = sum(x.size for p, x in param_paths.flatten(base).items() if p.endswith("/bias"))
    assert peft.count(trainable) == 2 * 2 * (64 * 4 + 4 * 64) + biases
    assert peft.count(exp.abstract_state.params) == peft.count(trainable)


def test_frozen_parameters_have_no_optimizer_state(tiny_config):
    cfg = _config(tiny_config, method="lora")
    exp = experiment.build(cfg, 263)
    trainable = peft.count(exp.abstract_state.params)
    opt_scalars = peft.count(exp.abstract_state.opt_state)
    # Adam's two moments of the trainable tree, plus scalar counters; nothing of the base.
    assert 2 * trainable <= opt_scalars <= 2 * trainable + 8
    assert peft.count(exp.abstract_base) > 10 * trainable
    paths = param_paths.flatten(exp.abstract_state.opt_state)
    assert not any("attn/key" in p or "token_embed" in p for p in paths), sorted(paths)[:5]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(**{"model.scan_layers": True, "model.fuse_qkv": "on", "model.dtype": "bfloat16"}),
    ],
    ids=["unrolled", "scan_fused_bf16"],
)
def test_a_step_changes_only_the_trainable_tree_and_the_loss_falls(tiny_config, overrides):
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(tiny_config, section), name, value)
    tiny_config.optim.warmup_steps = 0
    tiny_config.optim.lr = 1e-2
    cfg = _config(tiny_config, method="lora,ia3,bitfit", targets="attn/(query|value),mlp/wo")
    exp = experiment.build(cfg, 263)
    base = experiment.init_params(exp, 0)
    base_before = [np.asarray(x) for x in jax.tree.leaves(base)]
    state = experiment.init_peft_state(exp, base, 0)
    before = param_paths.flatten(jax.tree.map(np.asarray, state.params))
    step = jax.jit(experiment.train_step_fn(exp))
    tokens = jax.random.randint(jax.random.key(5), (8, 33), 0, 263)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((8, 32), jnp.float32)}
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch, jax.random.key(0), base)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    after = param_paths.flatten(state.params)
    changed = [p for p in before if not np.array_equal(before[p], np.asarray(after[p]))]
    assert any(p.endswith("lora_b") for p in changed) and any(p.endswith("bias") for p in changed)
    for got, want in zip(jax.tree.leaves(base), base_before):  # the base is untouched (not donated)
        np.testing.assert_array_equal(got, want)
    assert isinstance(state, TrainState) and int(state.step) == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(method="lora,foo"), "'foo' is not one of: none, lora"),
        (dict(method="lora,dora"), "dora already includes lora"),
        (dict(method="lora", targets="attn/("), "is not a regular expression"),
        (dict(rank=0), "config.peft.rank=0 must be > 0"),
    ],
)
def test_config_errors_are_one_line(tiny_config, overrides, message):
    for key, value in overrides.items():
        setattr(tiny_config.peft, key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        config_lib.validate(tiny_config)
    assert "\n" not in str(e.value)


def test_a_target_matching_nothing_lists_the_kernels(tiny_config):
    cfg = _config(tiny_config, method="lora", targets="attn/q_proj")
    with pytest.raises(ConfigError, match=r"matches no kernel.*blocks/layer_\*/attn/query/kernel") as e:
        experiment.build(cfg, 263)
    assert "\n" not in str(e.value)


def test_content_hash_sees_values_and_paths():
    a = {"x": jnp.ones((2, 3)), "y": jnp.zeros(4)}
    assert peft.content_hash(a) == peft.content_hash(jax.tree.map(jnp.copy, a))
    assert peft.content_hash(a) != peft.content_hash({"x": a["x"], "y": a["y"].at[0].set(1e-7)})
    assert peft.content_hash(a, ["x"]) == peft.content_hash({"x": a["x"], "y": a["y"] + 1}, ["x"])


def test_dataclass_methods_property():
    p = config_lib.validate(config_lib.base_config()).peft
    assert p.methods == () and not peft.enabled(p)
    assert dataclasses.replace(p, method="lora, bitfit").methods == ("lora", "bitfit")


def _peft_steps(cfg, steps=2):
    exp = experiment.build(cfg, 263)
    base = experiment.init_params(exp, 0)
    state = experiment.init_peft_state(exp, base, 0)
    tokens = jax.random.randint(jax.random.key(5), (8, 33), 0, 263)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((8, 32), jnp.float32)}
    with jax.set_mesh(exp.mesh):
        step = jax.jit(
            experiment.train_step_fn(exp),
            in_shardings=(exp.state_shardings, None, None, exp.base_shardings),
            out_shardings=(exp.state_shardings, None),
        )
        for _ in range(steps):
            state, _ = step(state, batch, jax.random.key(0), base)
    return exp, base, param_paths.flatten(jax.tree.map(np.asarray, state.params))


@pytest.mark.all_devices
def test_fsdp_over_eight_devices_equals_one_device(tiny_config):
    """The frozen base sharded over fsdp (and the trainable head / biases with it) trains as on one device."""
    tiny_config.optim.lr = 1e-2
    cfg8 = config_lib.validate(_fsdp(tiny_config, 8, method="lora,bitfit"))
    exp8, base8, got = _peft_steps(cfg8)
    assert base8["blocks"]["layer_0"]["attn"]["query"]["kernel"].sharding.spec[0] == "fsdp"
    assert len(base8["token_embed"]["embedding"].sharding.device_set) == 8
    original = sharding.make_mesh
    sharding.make_mesh = lambda cfg, devs=None: original(cfg, jax.devices()[:1])
    try:
        _, _, want = _peft_steps(config_lib.validate(_fsdp(tiny_config, 1, method="lora,bitfit")))
    finally:
        sharding.make_mesh = original
    assert got.keys() == want.keys()
    for path in want:
        # Adam divides by sqrt(v): near-zero gradients (biases) amplify reduction-order noise to ~1e-6.
        np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=path)


def _fsdp(c, n, **peft_overrides):
    c.mesh.shape.data, c.mesh.shape.fsdp = 1, n
    for key, value in peft_overrides.items():
        setattr(c.peft, key, value)
    return c


@pytest.mark.parametrize("spec", ["t5.py:size=tiny", "rnn.py", "bert.py:size=tiny"])
def test_lora_ia3_on_other_model_families(spec, tmp_path):
    """T5 (no biases), the RNN's dense and recurrent kernels, BERT with scan_layers: shapes and the merge."""
    c = config_lib.load_config_file(
        os.path.join(os.path.dirname(__file__), "..", "configs", spec.split(":")[0])
        + (":" + spec.split(":")[1] if ":" in spec else "")
    )
    c.data.data_dir = str(tmp_path)
    c.peft.method = "lora,ia3"
    c.peft.targets = "kernel" if spec == "rnn.py" else "attn/(query|value),mlp/wo"
    c.model.scan_layers = spec.startswith("bert")
    cfg = config_lib.validate(c)
    exp = experiment.build(cfg, 263)
    base = experiment.init_params(exp, 0)
    trainable = _randomize(peft.init(jax.random.key(0), base, cfg.peft))
    merged = peft.merge(base, trainable, cfg.peft)
    changed = [
        p
        for p, (a, b) in zip(param_paths.flatten(base), zip(jax.tree.leaves(base), jax.tree.leaves(merged)))
        if not np.array_equal(a, b)
    ]
    assert changed and all(p.endswith(("kernel", "bias")) for p in changed), changed
    if spec == "rnn.py":
        assert any(p.endswith("recurrent_kernel") for p in changed)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), merged) == jax.tree.map(lambda x: (x.shape, x.dtype), base)
