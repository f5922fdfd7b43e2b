"""Vocabulary padding (jaxlm/models/vocab.py): padded arrays, real-vocabulary logits, old workdirs.

The model's vocabulary arrays have ``ModelConfig.padded_vocab_size`` rows; its logits, and so
every loss, metric and sampler, cover the real ``vocab_size`` ids only.
"""

import contextlib
import dataclasses
import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import beam_search, config_lib, decoding, losses, models, param_paths, sharding
from jaxlm.common_types import CheckpointError
from jaxlm.main import convert, experiment, generate, info, init_from, restore, train
from jaxlm.main import workdir as workdir_lib
from jaxlm.metric_writer import read_metrics
from jaxlm.models import vocab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BYTES = 263  # the byte tokenizer's ids


def _model_cfg(kind="decoder_only", multiple=1, **kw):
    c = config_lib.base_config()
    c.model.kind = kind
    c.model.num_layers, c.model.num_heads, c.model.embed_dim, c.model.mlp_dim = 1, 2, 16, 32
    c.model.max_len = 16
    c.model.vocab_size = BYTES
    c.model.vocab_multiple = multiple
    c.data.seq_len = 16
    c.data.objective = {"encoder_only": "masked_lm", "encoder_decoder": "span_corruption"}.get(kind, "causal_lm")
    for key, value in kw.items():
        c.model[key] = value
    return config_lib.validate(c).model


def _tiny_config(tmp_path, **model):
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "gpt.py") + ":size=tiny")
    c.data.data_dir = str(tmp_path / "datasets")
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.train.progress = False
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_steps = 1
    c.checkpoint.every_steps = 2
    for key, value in model.items():
        c.model[key] = value
    return c


# ---- The padded size: one property, resolved for the hardware and the mesh.


def test_padded_size_rounds_up_and_one_disables():
    assert _model_cfg(multiple=128).padded_vocab_size == 384
    assert _model_cfg(multiple=8).padded_vocab_size == 264
    assert _model_cfg(multiple=1).padded_vocab_size == BYTES
    with pytest.raises(config_lib.ConfigError, match="vocab_multiple=-1 must be >= 0"):
        _model_cfg(multiple=-1)


@pytest.mark.all_devices
def test_auto_multiple_follows_the_hardware_and_the_vocabulary_mesh_axes():
    c = config_lib.validate(config_lib.base_config())
    assert c.model.vocab_multiple == 0  # auto
    auto = experiment.resolve_vocab_multiple(c, {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1})
    assert auto.model.vocab_multiple in set(experiment.CPU_VOCAB_MULTIPLE.values())  # the tests run on a CPU
    # tensor shards the vocabulary (DEFAULT_RULES): the padded size must be a multiple of it as well.
    one = dataclasses.replace(c, model=dataclasses.replace(c.model, vocab_multiple=1))
    assert (
        experiment.resolve_vocab_multiple(one, {"data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}).model.vocab_multiple
        == 2
    )
    mixed = dataclasses.replace(c, model=dataclasses.replace(c.model, vocab_multiple=12))
    shape = {"data": 1, "fsdp": 1, "tensor": 8, "sequence": 1}
    assert experiment.resolve_vocab_multiple(mixed, shape).model.vocab_multiple == 24  # lcm(12, 8)


def test_config_json_without_the_key_reads_as_unpadded():
    text = config_lib.to_json(config_lib.validate(config_lib.base_config()))
    raw = json.loads(text)
    del raw["model"]["vocab_multiple"]  # as written before vocabulary padding existed
    assert config_lib.from_json(json.dumps(raw)).model.vocab_multiple == 1
    assert config_lib.from_json(text).model.vocab_multiple == 0


# ---- Padded == unpadded: the same real-vocabulary weights give the same loss and zero padding gradients.


def _inputs(kind, rng):
    tokens = jnp.asarray(rng.integers(1, BYTES, size=(2, 16)), jnp.int32)
    return (tokens, tokens[:, ::-1]) if kind == "encoder_decoder" else (tokens,)


def _fill_padding(a, axis, value):
    """``a`` with its padded rows (past the real vocabulary along ``axis``) set to ``value``."""
    if axis is None:
        return a
    a = np.array(a)
    index = [slice(None)] * a.ndim
    index[axis] = slice(BYTES, None)
    a[tuple(index)] = value
    return a


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("decoder_only", {}),
        ("decoder_only", {"tie_embeddings": False}),
        ("encoder_only", {"tie_embeddings": False}),
        ("encoder_decoder", {}),
        ("rnn", {"tie_embeddings": False}),
    ],
)
def test_padded_model_gives_the_unpadded_loss_and_never_trains_padding(kind, extra):
    small, padded = _model_cfg(kind, 1, **extra), _model_cfg(kind, 128, **extra)
    args = _inputs(kind, np.random.default_rng(0))
    p_small = nn.unbox(models.build(small).init(jax.random.key(0), *args))["params"]
    boxed = models.build(padded).init(jax.random.key(1), *args)["params"]
    axes = vocab.vocab_axes(boxed)
    assert "token_embed/embedding" in axes and axes["token_embed/embedding"] == 0
    # The padded model gets the small model's weights in its real rows and large values in its padding.
    p_pad = vocab.resize(jax.device_get(p_small), axes, padded.padded_vocab_size)
    p_pad = param_paths.map_with_path(lambda name, a: _fill_padding(a, axes.get(name), 50.0), p_pad)
    assert jax.tree.map(np.shape, p_pad) == jax.tree.map(np.shape, nn.unbox(boxed))
    targets = args[-1]

    def loss(params, cfg):
        out = models.build(cfg).apply({"params": params}, *args)
        logits = out["mlm_logits"] if kind == "encoder_only" else out
        assert logits.shape[-1] == BYTES  # callers only ever see the real vocabulary
        total, count = losses.weighted_cross_entropy(logits, targets, jnp.ones(targets.shape))
        return total / count

    want = jax.jit(loss, static_argnums=1)(p_small, small)
    got, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(p_pad, padded)
    assert abs(float(got) - float(want)) < 1e-6, (got, want)
    flat = param_paths.flatten(grads)
    for name, axis in axes.items():
        g = np.asarray(flat[name])
        assert not np.any(np.take(g, np.arange(BYTES, g.shape[axis]), axis=axis)), name  # padding: zero gradient
        assert np.any(np.take(g, np.arange(BYTES), axis=axis)), name


# ---- Sampling never emits a padded id.


def _favoring_padding():
    """A decoder whose padded logits would beat every real one by ~16 nats if they were not dropped.

    The final norm outputs its bias (ones) at every position, so the logits are the column sums
    of the untied head: padded columns are 1.0, real ones small noise.
    """
    cfg = _model_cfg("decoder_only", 128, tie_embeddings=False)
    model = models.build(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))["params"]
    d = cfg.embed_dim
    params["final_norm"] = {"scale": jnp.zeros((d,)), "bias": jnp.ones((d,))}
    kernel = 0.02 * np.random.default_rng(0).standard_normal((d, cfg.padded_vocab_size)).astype(np.float32)
    kernel[:, BYTES:] = 1.0
    params["lm_head"]["kernel"] = jnp.asarray(kernel)
    return model, params


def test_sampling_and_beam_search_never_emit_padded_ids():
    model, params = _favoring_padding()
    unsliced = np.ones(model.cfg.embed_dim) @ np.asarray(params["lm_head"]["kernel"])
    assert unsliced.argmax() >= BYTES and unsliced[BYTES:].min() > unsliced[:BYTES].max() + 10
    prompt = jnp.ones((64, 4), jnp.int32)
    cache = generate.init_cache(model, 64, 16)
    step = generate.make_step_fn(model, params)
    for settings in (dict(temperature=1.0), dict(temperature=1.5, top_k=50, top_p=0.95)):
        run = jax.jit(lambda c, p, r, s=settings: decoding.generate(step, c, p, r, max_new_tokens=12, **s))
        tokens = np.asarray(run(cache, prompt, jax.random.key(0)))
        # 768 draws, nearly uniform over the real ids: many distinct ones, never a padded one.
        assert tokens.shape == (64, 12) and tokens.max() < BYTES and len(np.unique(tokens)) > 40, settings
    greedy = np.asarray(
        jax.jit(lambda c, p: decoding.generate(step, c, p, jax.random.key(0), max_new_tokens=4, temperature=0.0))(
            cache, prompt
        )
    )
    assert greedy.max() < BYTES
    found, _ = jax.jit(
        lambda p: beam_search.beam_search(step, generate.cache_fn(model, 16), p, beam_size=4, max_new_tokens=8)
    )(prompt[:2])
    assert np.asarray(found).max() < BYTES


# ---- Training on a mesh whose tensor axis shards the vocabulary.


@contextlib.contextmanager
def _on_devices(devices):
    original = sharding.make_mesh
    sharding.make_mesh = lambda cfg, devs=None: original(cfg, devices)
    try:
        yield
    finally:
        sharding.make_mesh = original


def _losses(config, workdir):
    train.run(config, workdir, stream=io.StringIO())
    return np.array([r["loss"] for r in read_metrics(workdir) if "loss" in r])


@pytest.mark.all_devices
def test_tensor_parallel_default_config_trains_like_one_device(tmp_path, text_corpus):
    # The default vocabulary (263 byte ids) on tensor=2 failed with "dimension 263 ... do not divide".
    c = _tiny_config(tmp_path)
    c.data.source, c.data.files, c.data.document = "files", text_corpus, "line"
    with _on_devices(jax.devices()[:1]):
        one = _losses(config_lib.validate(c), str(tmp_path / "one"))
    c.mesh.shape.data, c.mesh.shape.tensor = 4, 2
    two = _losses(config_lib.validate(c), str(tmp_path / "tensor2"))
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-4)
    saved = workdir_lib.saved_config(str(tmp_path / "tensor2"))
    assert saved.model.vocab_multiple > 0 and saved.model.vocab_multiple % 2 == 0  # resolved, and saved


# ---- A workdir written before padding existed (unpadded arrays, no vocab_multiple in config.json).


def _old_workdir(tmp_path, text_corpus):
    c = _tiny_config(tmp_path, vocab_multiple=1)
    c.data.source, c.data.files = "files", text_corpus
    c.train.num_steps = 2
    old = str(tmp_path / "old")
    train.run(config_lib.validate(c), old, stream=io.StringIO())
    path = os.path.join(old, workdir_lib.CONFIG_FILE)
    with open(path) as f:
        raw = json.load(f)
    del raw["model"]["vocab_multiple"]
    with open(path, "w") as f:
        json.dump(raw, f)
    return c, old


def test_old_unpadded_workdir_resumes_evaluates_and_initializes_a_padded_run(tmp_path, text_corpus):
    c, old = _old_workdir(tmp_path, text_corpus)
    # Resume with today's defaults (auto padding): the saved config wins, the arrays stay unpadded.
    c.model.vocab_multiple = 0
    c.train.num_steps = 4
    train.run(config_lib.validate(c), old, stream=io.StringIO())
    assert workdir_lib.saved_config(old).model.vocab_multiple == 1
    exp, params, _, step = restore.open_trained(config_lib.validate(workdir_lib.saved_config(old)), old)
    assert step == 4 and params["token_embed"]["embedding"].shape[0] == BYTES
    # eval / generate with a config file (auto) on the old workdir also read it unpadded.
    exp2, _, _, _ = restore.open_trained(config_lib.validate(c), old)
    assert exp2.model_cfg.padded_vocab_size == BYTES
    # init_from: the new run's padded table takes the old rows; its padding starts at zero.
    new = _tiny_config(tmp_path, vocab_multiple=128)
    new.data.source, new.data.files = "files", text_corpus
    new.checkpoint.init_from = old
    new.train.num_steps = 1
    train.run(config_lib.validate(new), str(tmp_path / "new"), stream=io.StringIO())
    new_cfg = config_lib.validate(workdir_lib.saved_config(str(tmp_path / "new")))
    assert new_cfg.model.vocab_multiple == 128
    # Step 0's parameters are what init_from loaded; compare the table before training moved it.
    fresh = experiment.build(new_cfg, BYTES)
    state = experiment.init_state(fresh, new_cfg.seed)
    loaded, report = init_from.load(old, state.params, vocab_axes=fresh.vocab_axes, real_vocab=BYTES)
    table = np.asarray(loaded["token_embed"]["embedding"])
    assert table.shape[0] == 384 and "token_embed/embedding" in report.loaded
    np.testing.assert_array_equal(table[:BYTES], np.asarray(params["token_embed"]["embedding"]))
    assert not table[BYTES:].any()
    # Any other difference is still refused, naming the parameter.
    other = experiment.build(config_lib.validate(_tiny_config(tmp_path, vocab_multiple=8, max_len=128)), BYTES)
    state = experiment.init_state(other, 0)
    with pytest.raises(CheckpointError, match="pos_embed/embedding has shape"):
        init_from.load(old, state.params, vocab_axes=other.vocab_axes, real_vocab=BYTES)


# ---- Hugging Face: the real vocabulary outside, the padded one inside.


def test_hf_import_pads_and_export_writes_the_real_vocabulary(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=BYTES)
    original = transformers.GPT2LMHeadModel(hf_cfg).eval()
    original.save_pretrained(str(tmp_path / "hf"))  # no tokenizer.json: imported with the byte tokenizer
    quiet = open(os.devnull, "w")
    workdir = str(tmp_path / "run")
    convert.run_from_hf(str(tmp_path / "hf"), workdir, overrides={"model.vocab_multiple": "128"}, stream=quiet)
    config = config_lib.validate(workdir_lib.saved_config(workdir))
    assert (config.model.vocab_size, config.model.vocab_multiple) == (BYTES, 128)
    exp, params, _, _ = restore.open_trained(config, workdir)
    table = np.asarray(params["token_embed"]["embedding"])
    assert table.shape == (384, 16) and not table[BYTES:].any()  # imported padding is zero
    tokens = np.random.default_rng(0).integers(0, BYTES, size=(2, 12))
    with torch.no_grad():
        want = original(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(exp.model.apply)({"params": jax.device_get(params)}, tokens))
    assert got.shape == want.shape and float(np.max(np.abs(got - want))) < 1e-4
    # Export: Hugging Face's vocab_size and tensors are the real vocabulary's, equal to the original's.
    out = convert.run_to_hf(workdir, str(tmp_path / "export"), stream=quiet)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == BYTES
    exported = transformers.GPT2LMHeadModel.from_pretrained(out).state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(value, exported[key]), key
    # jaxlm info shows both sizes.
    report = io.StringIO()
    info.run(config, stream=report)
    assert "vocabulary: 263 ids, arrays padded to 384" in report.getvalue()
