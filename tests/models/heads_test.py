"""Task heads on the decoder-only and encoder-only models: outputs, pooling, parameter trees, run modes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, logical_axes, models
from jaxlm.common_types import ConfigError
from jaxlm.models import heads
from jaxlm.models.heads import HeadConfig

B, T, D, V = 3, 8, 16, 40
TOKENS = jax.random.randint(jax.random.key(1), (B, T), 1, V)
# Row 0 is full, row 1 right-padded after 5 tokens, row 2 left-padded (3 pads, then 5 tokens).
SEGMENTS = jnp.array([[1] * 8, [1] * 5 + [0] * 3, [0] * 3 + [1] * 5], jnp.int32)
LAST = np.array([7, 4, 7])
ALL_KINDS = ("classification", "regression", "token_classification", "qa")


def _cfg(kind, **kw):
    cfg = config_lib.validate(config_lib.base_config()).model
    base = dict(kind=kind, vocab_size=V, num_layers=2, num_heads=4, embed_dim=D, mlp_dim=32, max_len=16)
    if kind == "encoder_only":
        base.update(pre_norm=False, activation="gelu_exact", norm_eps=1e-12)
    base.update(kw)
    return dataclasses.replace(cfg, **base)


def _init(cfg, head):
    model = models.build(cfg, head=head)
    params = nn.unbox(model.init(jax.random.key(0), TOKENS, segment_ids=SEGMENTS)["params"])
    return model, params


def _hidden(model, params, tokens=TOKENS, segment_ids=SEGMENTS):
    """The output and the hidden states the head reads (final_norm output, or the blocks' for post-norm)."""
    name = "final_norm" if model.cfg.pre_norm else "blocks"
    out, state = model.apply(
        {"params": params},
        tokens,
        segment_ids=segment_ids,
        capture_intermediates=lambda mdl, method: mdl.name == name and method == "__call__",
    )
    return out, np.asarray(state["intermediates"][name]["__call__"][0])


def _shapes(tree):
    return jax.tree.map(np.shape, tree)


@pytest.mark.parametrize("kind", ["decoder_only", "encoder_only"])
@pytest.mark.parametrize("head_kind", ALL_KINDS)
def test_output_shapes_and_no_lm_heads(kind, head_kind):
    model, params = _init(
        _cfg(kind, tie_embeddings=False), HeadConfig(head_kind, 1 if head_kind == "regression" else 5)
    )
    out = model.apply({"params": params}, TOKENS, segment_ids=SEGMENTS)
    want = {
        "classification": {"logits": (B, 5)},
        "regression": {"logits": (B, 1)},
        "token_classification": {"logits": (B, T, 5)},
        "qa": {"start_logits": (B, T), "end_logits": (B, T)},
    }[head_kind]
    assert _shapes(out) == want
    assert all(v.dtype == jnp.float32 for v in out.values())
    # No language-model heads: the untied lm_head, the MLM and NSP heads are not created.
    assert not {"lm_head", "mlm", "nsp"} & set(params)
    expected_pooler = kind == "encoder_only" and head_kind in ("classification", "regression")
    assert ("pooler" in params) == expected_pooler


def test_parameter_paths():
    encoder, decoder = _cfg("encoder_only"), _cfg("decoder_only")
    cases = [
        (encoder, "classification", {"classifier": {"kernel": (D, 5), "bias": (5,)}}),
        (encoder, "regression", {"classifier": {"kernel": (D, 1), "bias": (1,)}}),
        (encoder, "token_classification", {"classifier": {"kernel": (D, 5), "bias": (5,)}}),
        (encoder, "qa", {"qa_outputs": {"kernel": (D, 2), "bias": (2,)}}),
        (decoder, "classification", {"score": {"kernel": (D, 5)}}),
        (decoder, "regression", {"score": {"kernel": (D, 1)}}),
        (decoder, "token_classification", {"classifier": {"kernel": (D, 5), "bias": (5,)}}),
        (decoder, "qa", {"qa_outputs": {"kernel": (D, 2), "bias": (2,)}}),
    ]
    for cfg, head_kind, want in cases:
        _, params = _init(cfg, HeadConfig(head_kind, 1 if head_kind == "regression" else 5))
        assert _shapes(params["head"]) == want, (cfg.kind, head_kind)
    _, params = _init(encoder, HeadConfig("classification", 5))
    assert _shapes(params["pooler"]) == {"kernel": (D, D), "bias": (D,)}  # BERT's pooler, same path as pre-training


def test_head_kernels_carry_logical_axes():
    model = models.build(_cfg("encoder_only"), head=HeadConfig("classification", 3))
    boxed = model.init(jax.random.key(0), TOKENS)["params"]
    assert boxed["head"]["classifier"]["kernel"].names == (logical_axes.EMBED, None)


def test_decoder_auto_pooling_reads_the_last_real_token():
    model, params = _init(_cfg("decoder_only"), HeadConfig("classification", 4))
    out, hidden = _hidden(model, params)
    picked = hidden[np.arange(B), LAST]
    np.testing.assert_allclose(out["logits"], picked @ np.asarray(params["head"]["score"]["kernel"]), atol=1e-5)
    # Changing padding tokens changes nothing.
    noisy = jnp.where(SEGMENTS == 0, (TOKENS + 7) % V, TOKENS)
    np.testing.assert_allclose(model.apply({"params": params}, noisy, segment_ids=SEGMENTS)["logits"], out["logits"])
    # Without segment ids, token 0 is padding.
    padded = jnp.where(SEGMENTS == 0, 0, TOKENS)
    no_seg = model.apply({"params": params}, padded)["logits"]
    np.testing.assert_allclose(no_seg[:2], out["logits"][:2], atol=1e-5)  # right padding: same causal context


def test_last_token_index():
    np.testing.assert_array_equal(heads.last_token_index(TOKENS, SEGMENTS), LAST)
    tokens = jnp.array([[5, 6, 0, 0], [0, 0, 0, 0], [0, 3, 4, 0]])
    np.testing.assert_array_equal(heads.last_token_index(tokens, None), [1, 0, 2])


@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
@pytest.mark.parametrize("kind", ["decoder_only", "encoder_only"])
def test_explicit_pooling(kind, pooling):
    model, params = _init(_cfg(kind), HeadConfig("classification", 4, pooling))
    assert "pooler" not in params
    out, hidden = _hidden(model, params)
    real = np.asarray(SEGMENTS, np.float32)
    pooled = {
        "cls": hidden[:, 0],
        "last": hidden[np.arange(B), LAST],
        "mean": (hidden * real[..., None]).sum(1) / real.sum(1, keepdims=True),
    }[pooling]
    layer = params["head"]["score" if kind == "decoder_only" else "classifier"]
    want = pooled @ np.asarray(layer["kernel"]) + np.asarray(layer.get("bias", 0.0))
    np.testing.assert_allclose(out["logits"], want, atol=1e-5)


def test_encoder_auto_pooling_is_the_bert_pooler():
    model, params = _init(_cfg("encoder_only"), HeadConfig("classification", 4))
    out, hidden = _hidden(model, params)
    pooler, clf = params["pooler"], params["head"]["classifier"]
    pooled = np.tanh(hidden[:, 0] @ np.asarray(pooler["kernel"]) + np.asarray(pooler["bias"]))
    np.testing.assert_allclose(out["logits"], pooled @ np.asarray(clf["kernel"]) + np.asarray(clf["bias"]), atol=1e-5)


def test_token_and_qa_heads_are_per_position():
    model, params = _init(_cfg("encoder_only"), HeadConfig("qa", 0))
    out, hidden = _hidden(model, params)
    qa = params["head"]["qa_outputs"]
    logits = hidden @ np.asarray(qa["kernel"]) + np.asarray(qa["bias"])
    np.testing.assert_allclose(out["start_logits"], logits[..., 0], atol=1e-5)
    np.testing.assert_allclose(out["end_logits"], logits[..., 1], atol=1e-5)


def test_dropout_only_before_classifier_as_hugging_face():
    """BERT's and GPT-2's classifier layers see dropout in training; GPT-2's score and every qa_outputs do not."""
    cfg = _cfg("encoder_only", dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(4), (B, T, D))
    cases = [(HeadConfig("token_classification", 3), False, True), (HeadConfig("classification", 3), False, True)]
    cases += [(HeadConfig("classification", 3), True, False), (HeadConfig("qa", 0), False, False)]
    for head, decoder, drops in cases:
        layer = heads.TaskHead(cfg, head, decoder=decoder)
        inputs = x if head.kind in ("token_classification", "qa") else x[:, 0]
        variables = layer.init(jax.random.key(0), inputs)
        ev = layer.apply(variables, inputs)
        tr = layer.apply(variables, inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
        for key in ev:
            assert np.allclose(ev[key], tr[key]) != drops, (head, decoder)


@pytest.mark.parametrize("kind, head_kind", [("decoder_only", "classification"), ("encoder_only", "qa")])
def test_scan_layers_bf16_fused_qkv(kind, head_kind):
    cfg = _cfg(kind, scan_layers=True, dtype="bfloat16", fuse_qkv="on")
    model, params = _init(cfg, HeadConfig(head_kind, 3))
    assert "layers" in params["blocks"]
    out = jax.jit(lambda p: model.apply({"params": p}, TOKENS, segment_ids=SEGMENTS))(params)
    assert all(v.dtype == jnp.float32 and np.isfinite(v).all() for v in out.values())


def test_sharded_equals_single_device():
    cfg = _cfg("decoder_only", num_heads=2)
    model = models.build(cfg, head=HeadConfig("classification", 4))
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2, 1)
    mesh = jax.sharding.Mesh(devices, logical_axes.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    tokens = jax.random.randint(jax.random.key(2), (4, T), 1, V)
    segments = jnp.ones_like(tokens).at[1, 5:].set(0)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    rules = logical_axes.DEFAULT_RULES
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    expected = model.apply({"params": params}, tokens, segment_ids=segments)["logits"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.device_put(params, shardings)
        got = jax.jit(lambda p: model.apply({"params": p}, tokens, segment_ids=segments)["logits"])(sharded)
    assert sharded["head"]["score"]["kernel"].sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_head_configs_are_config_errors():
    with pytest.raises(ConfigError, match="config.task.head='tagging' is not one of"):
        HeadConfig("tagging", 2)
    with pytest.raises(ConfigError, match="config.task.pooling='max'"):
        HeadConfig("classification", 2, "max")
    with pytest.raises(ConfigError, match="regression head: it has one output"):
        HeadConfig("regression", 3)
    with pytest.raises(ConfigError, match="needs >= 1 label"):
        HeadConfig("token_classification", 0)
    with pytest.raises(ConfigError, match="attaches to decoder_only or encoder_only"):
        models.build(_cfg("encoder_decoder"), head=HeadConfig("classification", 2))
    model = models.build(_cfg("decoder_only"), head=HeadConfig("classification", 2))
    with pytest.raises(ConfigError, match="no decode mode; use jaxlm predict"):
        model.init(jax.random.key(0), TOKENS, decode=True)


def test_from_config():
    raw = config_lib.base_config()
    assert heads.from_config(config_lib.validate(raw)) is None  # causal_lm: no task head
    raw.data.objective = "classification"
    raw.task.labels = "neg,pos"
    assert heads.from_config(config_lib.validate(raw)) == HeadConfig("classification", 2, "auto")
    raw.task.labels = ""
    raw.task.num_labels = 1
    assert heads.from_config(config_lib.validate(raw)) == HeadConfig("regression", 1, "auto")
    raw.data.objective, raw.task.num_labels, raw.task.pooling = "qa", 0, "mean"
    assert heads.from_config(config_lib.validate(raw), num_labels=7) == HeadConfig("qa", 7, "mean")
