"""BERT-style encoder: outputs, bidirectionality, padding invariance, heads, parameter names."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, models
from jaxlm.models import config as model_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 1, 40)


def _cfg(**kw):
    cfg = config_lib.validate(config_lib.base_config()).model
    base = dict(
        kind="encoder_only",
        vocab_size=40,
        num_layers=2,
        num_heads=4,
        embed_dim=16,
        mlp_dim=32,
        max_len=16,
        pre_norm=False,
        activation="gelu_exact",
        norm_eps=1e-12,
    )
    base.update(kw)
    return dataclasses.replace(cfg, **base)


def _init(cfg, tokens=TOKENS):
    model = models.build(cfg)
    return model, nn.unbox(model.init(jax.random.key(0), tokens)["params"])


def test_outputs():
    model, params = _init(_cfg())
    out = model.apply({"params": params}, TOKENS)
    assert {k: v.shape for k, v in out.items()} == {
        "mlm_logits": (2, 8, 40),
        "nsp_logits": (2, 2),
        "pooled": (2, 16),
        "hidden": (2, 8, 16),
    }
    assert out["mlm_logits"].dtype == out["nsp_logits"].dtype == jnp.float32
    # The pooler reads the first token; token types change the encoding.
    pooler = params["pooler"]
    np.testing.assert_allclose(
        out["pooled"], jnp.tanh(out["hidden"][:, 0] @ pooler["kernel"] + pooler["bias"]), atol=1e-5
    )
    changed = model.apply({"params": params}, TOKENS, token_types=jnp.zeros_like(TOKENS).at[:, 4:].set(1))
    assert not np.allclose(changed["hidden"], out["hidden"])


def test_bert_parameter_names():
    _, params = _init(_cfg(num_layers=1))
    assert jax.tree.map(np.shape, params) == {
        "token_embed": {"embedding": (40, 16)},
        "pos_embed": {"embedding": (16, 16)},
        "type_embed": {"embedding": (2, 16)},
        "embed_norm": {"scale": (16,), "bias": (16,)},
        "blocks": {
            "layer_0": {
                "attn": {
                    "query": {"kernel": (16, 4, 4), "bias": (4, 4)},
                    "key": {"kernel": (16, 4, 4), "bias": (4, 4)},
                    "value": {"kernel": (16, 4, 4), "bias": (4, 4)},
                    "out": {"kernel": (4, 4, 16), "bias": (16,)},
                },
                "attn_norm": {"scale": (16,), "bias": (16,)},
                "mlp": {"wi": {"kernel": (16, 32), "bias": (32,)}, "wo": {"kernel": (32, 16), "bias": (16,)}},
                "mlp_norm": {"scale": (16,), "bias": (16,)},
            }
        },
        "pooler": {"kernel": (16, 16), "bias": (16,)},
        "mlm": {
            "transform": {"kernel": (16, 16), "bias": (16,)},
            "transform_norm": {"scale": (16,), "bias": (16,)},
            "bias": (40,),
        },
        "nsp": {"kernel": (16, 2), "bias": (2,)},
    }


def test_variants_change_the_tree():
    _, params = _init(_cfg(pre_norm=True, type_vocab_size=0, tie_embeddings=False, position="relative"))
    assert "embed_norm" not in params and "final_norm" in params and "type_embed" not in params
    assert "pos_embed" not in params and "relative_bias" in params["blocks"]
    assert params["mlm"]["decoder"]["kernel"].shape == (16, 40)


def test_mlm_head_is_tied_with_a_bias():
    model, params = _init(_cfg())
    params["mlm"]["bias"] = jnp.arange(40.0)
    out = model.apply({"params": params}, TOKENS, capture_intermediates=True)
    out, inter = out[0], out[1]["intermediates"]
    h = inter["mlm"]["transform_norm"]["__call__"][0]
    want = h @ params["token_embed"]["embedding"].T + jnp.arange(40.0)
    np.testing.assert_allclose(out["mlm_logits"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_bidirectional(position):
    model, params = _init(_cfg(position=position))
    changed = TOKENS.at[:, -1].set(TOKENS[:, -1] % 39 + 1)
    a = model.apply({"params": params}, TOKENS)["hidden"]
    b = model.apply({"params": params}, changed)["hidden"]
    assert not np.allclose(a[:, 0], b[:, 0])  # the first token sees the last


@pytest.mark.parametrize("position", ["learned", "relative"])
def test_padding_invariance(position):
    model, params = _init(_cfg(position=position))
    # Pad id 0: a padded sequence encodes its tokens as the unpadded sequence does.
    padded = TOKENS.at[:, 5:].set(0)
    a = model.apply({"params": params}, padded)
    b = model.apply({"params": params}, TOKENS[:, :5])
    np.testing.assert_allclose(a["hidden"][:, :5], b["hidden"], atol=1e-5)
    np.testing.assert_allclose(a["nsp_logits"], b["nsp_logits"], atol=1e-5)
    # Explicit segment ids: whatever the padded positions hold does not matter.
    segments = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
    c = model.apply({"params": params}, TOKENS, segment_ids=segments)["hidden"]
    noise = TOKENS.at[0, 5:].set(jnp.array([7, 8, 9]))
    d = model.apply({"params": params}, noise, segment_ids=segments)["hidden"]
    np.testing.assert_allclose(c[0, :5], d[0, :5], atol=1e-6)
    np.testing.assert_allclose(c[0, :5], b["hidden"][0], atol=1e-5)


def test_flops_per_token_by_hand():
    cfg = _cfg()  # L=2, D=16, F=32, V=40
    n = 2 * (4 * 16 * 16 + 2 * 16 * 32) + 16 * 16 + 16 * 40  # blocks, MLM transform, MLM decoder (tied)
    assert n == 4992
    assert model_config.matmul_params(cfg) == n
    assert model_config.flops_per_token(cfg, 8) == 6 * n + 12 * 2 * 8 * 16 > 0


def test_bert_config_builds():
    for size in ("tiny", "small", "base"):
        c = config_lib.load_config_file(os.path.join(REPO, "configs", "bert.py") + f":size={size}")
        cfg = config_lib.validate(c).model
        assert cfg.kind == "encoder_only" and c.data.objective == "masked_lm"
        if size == "tiny":
            model = models.build(cfg, vocab_size=40)
            shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), TOKENS))
            assert shapes["params"]["type_embed"]["embedding"].value.shape == (2, 64)
    assert (cfg.num_layers, cfg.num_heads, cfg.embed_dim, cfg.mlp_dim, cfg.max_len) == (12, 12, 768, 3072, 512)


def test_matches_hugging_face_bert():
    # The parameter mapping in jaxlm/models/encoder_only.py's docstring, checked end to end.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, n, h = 16, 4, 4
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=d,
        num_hidden_layers=2,
        num_attention_heads=n,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(config).eval()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

    def dense(name, shape=None, bias_shape=None):
        kernel, bias = sd[name + ".weight"].T, sd[name + ".bias"]
        return {"kernel": kernel.reshape(shape or kernel.shape), "bias": bias.reshape(bias_shape or bias.shape)}

    def norm(name):
        return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}

    def layer(pre):
        attn = {k: dense(pre + "attention.self." + k, (d, n, h), (n, h)) for k in ("query", "key", "value")}
        attn["out"] = dense(pre + "attention.output.dense", (n, h, d))
        return {
            "attn": attn,
            "attn_norm": norm(pre + "attention.output.LayerNorm"),
            "mlp": {"wi": dense(pre + "intermediate.dense"), "wo": dense(pre + "output.dense")},
            "mlp_norm": norm(pre + "output.LayerNorm"),
        }

    params = {
        "token_embed": {"embedding": sd["bert.embeddings.word_embeddings.weight"]},
        "pos_embed": {"embedding": sd["bert.embeddings.position_embeddings.weight"]},
        "type_embed": {"embedding": sd["bert.embeddings.token_type_embeddings.weight"]},
        "embed_norm": norm("bert.embeddings.LayerNorm"),
        "blocks": {f"layer_{i}": layer(f"bert.encoder.layer.{i}.") for i in range(2)},
        "pooler": dense("bert.pooler.dense"),
        "mlm": {
            "transform": dense("cls.predictions.transform.dense"),
            "transform_norm": norm("cls.predictions.transform.LayerNorm"),
            "bias": sd["cls.predictions.bias"],
        },
        "nsp": dense("cls.seq_relationship"),
    }
    tokens = np.array([[2, 5, 7, 9, 11, 3, 0, 0], [2, 8, 6, 4, 3, 12, 13, 3]])
    types = np.array([[0] * 8, [0] * 5 + [1] * 3])
    ours = models.build(_cfg()).apply({"params": params}, tokens, token_types=types)
    with torch.no_grad():
        want = hf(
            input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(tokens != 0)
        )
    np.testing.assert_allclose(ours["mlm_logits"], want.prediction_logits.numpy(), atol=2e-5)
    np.testing.assert_allclose(ours["nsp_logits"], want.seq_relationship_logits.numpy(), atol=2e-5)
