"""Encoder-decoder (Transformer / T5): masks, shift-right, cached decoding, parameter names."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, models
from jaxlm.models import config as model_config
from jaxlm.models.encoder_decoder import shift_right

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUTS = jax.random.randint(jax.random.key(1), (2, 8), 1, 40)
TARGETS = jax.random.randint(jax.random.key(2), (2, 8), 1, 40)


def _cfg(**kw):
    cfg = config_lib.validate(config_lib.base_config()).model
    base = dict(
        kind="encoder_decoder",
        vocab_size=40,
        num_layers=2,
        num_heads=4,
        embed_dim=16,
        mlp_dim=32,
        max_len=16,
        position="relative",
        norm="rmsnorm",
        norm_eps=1e-6,
        use_bias=False,
        activation="relu",
    )
    base.update(kw)
    return dataclasses.replace(cfg, **base)


def _init(cfg):
    model = models.build(cfg)
    return model, nn.unbox(model.init(jax.random.key(0), INPUTS, shift_right(TARGETS))["params"])


def test_shift_right():
    y = jnp.array([[5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(shift_right(y, 0), [[0, 5, 6, 7, 8]])
    np.testing.assert_array_equal(shift_right(y, 3, segment_ids=jnp.array([[1, 1, 2, 2, 2]])), [[3, 5, 3, 7, 8]])


def test_t5_parameter_names():
    _, params = _init(_cfg(num_layers=1))
    attn = {n: {"kernel": (16, 4, 4)} for n in ("query", "key", "value")} | {"out": {"kernel": (4, 4, 16)}}
    mlp = {"wi": {"kernel": (16, 32)}, "wo": {"kernel": (32, 16)}}
    assert jax.tree.map(np.shape, params) == {
        "token_embed": {"embedding": (40, 16)},
        "encoder": {
            "blocks": {
                "relative_bias": {"rel_embedding": (32, 4)},
                "layer_0": {"attn_norm": {"scale": (16,)}, "attn": attn, "mlp_norm": {"scale": (16,)}, "mlp": mlp},
            },
            "final_norm": {"scale": (16,)},
        },
        "decoder": {
            "blocks": {
                "relative_bias": {"rel_embedding": (32, 4)},
                "layer_0": {
                    "attn_norm": {"scale": (16,)},
                    "attn": attn,
                    "cross_attn_norm": {"scale": (16,)},
                    "cross_attn": attn,
                    "mlp_norm": {"scale": (16,)},
                    "mlp": mlp,
                },
            },
            "final_norm": {"scale": (16,)},
        },
    }


def test_decoder_depth_and_untied_head():
    _, params = _init(_cfg(num_decoder_layers=3, tie_embeddings=False, position="learned"))
    assert sorted(k for k in params["decoder"]["blocks"]) == ["layer_0", "layer_1", "layer_2"]
    assert sorted(params["encoder"]["blocks"]) == ["layer_0", "layer_1"]
    assert params["lm_head"]["kernel"].shape == (16, 40)
    assert "pos_embed" in params["encoder"] and "pos_embed" in params["decoder"]


def test_tied_t5_rescales_the_output():
    model, params = _init(_cfg())
    logits, state = model.apply(
        {"params": params}, INPUTS, shift_right(TARGETS), capture_intermediates=lambda m, _: m.name == "decoder"
    )
    hidden = state["intermediates"]["decoder"]["__call__"][0]
    want = (hidden * 16**-0.5) @ params["token_embed"]["embedding"].T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_decoder_is_causal_and_reads_the_encoder():
    model, params = _init(_cfg())
    t_in = shift_right(TARGETS)
    a = model.apply({"params": params}, INPUTS, t_in)
    assert a.shape == (2, 8, 40) and a.dtype == jnp.float32
    b = model.apply({"params": params}, INPUTS, t_in.at[:, 5:].set(3))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])
    c = model.apply({"params": params}, INPUTS.at[:, -1].set(INPUTS[:, -1] % 39 + 1), t_in)
    assert not np.allclose(a[:, 0], c[:, 0])  # every target position sees every input


@pytest.mark.parametrize("position", ["relative", "learned"])
def test_cross_attention_respects_the_input_padding(position):
    model, params = _init(_cfg(position=position))
    t_in = shift_right(TARGETS)
    padded = model.apply({"params": params}, INPUTS.at[:, 5:].set(0), t_in)
    short = model.apply({"params": params}, INPUTS[:, :5], t_in)
    np.testing.assert_allclose(padded, short, atol=1e-5)
    # Packed: segment 0 of the inputs is padding whatever tokens it holds.
    seg_in = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
    seg_t = jnp.ones_like(TARGETS)
    kw = dict(inputs_segment_ids=seg_in, targets_segment_ids=seg_t)
    a = model.apply({"params": params}, INPUTS, t_in, **kw)
    b = model.apply({"params": params}, INPUTS.at[0, 5:].set(jnp.array([1, 2, 3])), t_in, **kw)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a[0], short[0], atol=1e-5)


@pytest.mark.parametrize("position", ["relative", "rope", "sinusoidal"])
def test_cached_decoding_matches_full_forward(position):
    cfg = _cfg(position=position, num_decoder_layers=3, num_kv_heads=2)
    model, params = _init(cfg)
    inputs = INPUTS.at[1, 6:].set(0)
    t_in = shift_right(TARGETS)
    full = model.apply({"params": params}, inputs, t_in)
    encoded = model.apply({"params": params}, inputs, method="encode")  # once
    cache = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, jnp.zeros((2, 16), jnp.int32), decode=True))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache["cache"])

    def step(cache, tokens, positions):
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            encoded,
            inputs,
            tokens,
            targets_positions=positions,
            decode=True,
            method="decode",
            mutable=["cache"],
        )
        return logits, mutated["cache"]

    logits, cache = step(cache, t_in[:, :3], jnp.broadcast_to(jnp.arange(3), (2, 3)))
    outs = [logits]
    for i in range(3, 8):
        logits, cache = step(cache, t_in[:, i : i + 1], jnp.full((2, 1), i))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_flops_per_token_by_hand():
    cfg = _cfg(num_decoder_layers=3)  # L_enc=2, L_dec=3, D=16, F=32, V=40
    attention, mlp = 4 * 16 * 16, 2 * 16 * 32
    n = 2 * (attention + mlp) + 3 * (2 * attention + mlp) + 16 * 40
    assert n == 13952
    assert model_config.matmul_params(cfg) == n
    assert model_config.flops_per_token(cfg, 8) == 6 * n + 12 * (2 + 2 * 3) * 8 * 16 > 0


def test_t5_config_builds():
    for size in ("tiny", "small", "base"):
        c = config_lib.load_config_file(os.path.join(REPO, "configs", "t5.py") + f":size={size}")
        assert c.model.kind == "encoder_decoder" and c.data.objective == "span_corruption"
        cfg = config_lib.validate(c).model
    assert (cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads, cfg.embed_dim, cfg.mlp_dim) == (6, 6, 8, 512, 2048)
    assert (cfg.position, cfg.norm, cfg.use_bias, cfg.activation) == ("relative", "rmsnorm", False, "relu")
    model = models.build(cfg, vocab_size=32128)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), INPUTS, INPUTS))["params"]
    assert sum(x.value.size for x in jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "value"))) == 60_506_624


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_matches_hugging_face_t5(version):
    # The parameter mapping in jaxlm/models/encoder_decoder.py's docstring, checked end to end.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, n, h, v11 = 16, 4, 4, version == "v1.1"
    config = transformers.T5Config(
        vocab_size=40,
        d_model=d,
        d_kv=h,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=n,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if v11 else "relu",
        tie_word_embeddings=not v11,
        decoder_start_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

    def kernel(name, shape, scale=1.0):
        return {"kernel": (sd[name + ".weight"].T * scale).reshape(shape)}

    def attention(pre):  # T5 does not scale logits by H**-0.5; jaxlm does: fold sqrt(H) into q
        out = {k: kernel(f"{pre}.{k[0]}", (d, n, h)) for k in ("key", "value")}
        return out | {"query": kernel(pre + ".q", (d, n, h), h**0.5), "out": kernel(pre + ".o", (n, h, d))}

    def mlp(pre):
        names = ("wi_0", "wi_1", "wo") if v11 else ("wi", "wo")
        return {k: kernel(f"{pre}.DenseReluDense.{k}", sd[f"{pre}.DenseReluDense.{k}.weight"].T.shape) for k in names}

    def stack(side, layers):
        rel = sd[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        blocks = {"relative_bias": {"rel_embedding": rel}}
        for i in range(layers):
            pre = f"{side}.block.{i}.layer."
            sub = ["attn", "cross_attn", "mlp"] if side == "decoder" else ["attn", "mlp"]
            blk = {f"{s}_norm": {"scale": sd[f"{pre}{j}.layer_norm.weight"]} for j, s in enumerate(sub)}
            blk["attn"] = attention(pre + "0.SelfAttention")
            if side == "decoder":
                blk["cross_attn"] = attention(pre + "1.EncDecAttention")
            blk["mlp"] = mlp(f"{pre}{len(sub) - 1}")
            blocks[f"layer_{i}"] = blk
        return {"blocks": blocks, "final_norm": {"scale": sd[f"{side}.final_layer_norm.weight"]}}

    params = {"token_embed": {"embedding": sd["shared.weight"]}, "encoder": stack("encoder", 2)}
    params["decoder"] = stack("decoder", 3)
    if v11:
        params["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    cfg = _cfg(num_decoder_layers=3, activation="geglu" if v11 else "relu", tie_embeddings=not v11)
    inputs = np.array([[5, 7, 9, 11, 3, 1, 0, 0], [8, 6, 4, 3, 12, 13, 9, 1]])
    targets = np.array([[4, 5, 6, 7, 1, 0], [9, 8, 7, 6, 5, 1]])
    ours = models.build(cfg).apply({"params": params}, inputs, shift_right(jnp.asarray(targets)))
    with torch.no_grad():
        want = hf(
            input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0), labels=torch.tensor(targets)
        )
    np.testing.assert_allclose(ours, want.logits.numpy(), atol=5e-5)
