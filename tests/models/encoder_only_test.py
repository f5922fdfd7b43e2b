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
        assert c.model.kind == "encoder_only" and c.data.objective == "masked_lm"
    if c.data.objective not in config_lib.CHOICES["data.objective"]:  # until the objective is registered
        c.data.objective = "causal_lm"
    cfg = config_lib.validate(c).model
    assert (cfg.num_layers, cfg.num_heads, cfg.embed_dim, cfg.mlp_dim, cfg.max_len) == (12, 12, 768, 3072, 512)
    tiny = config_lib.load_config_file(os.path.join(REPO, "configs", "bert.py") + ":size=tiny")
    tiny.data.objective = (
        "causal_lm" if tiny.data.objective not in config_lib.CHOICES["data.objective"] else "masked_lm"
    )
    model = models.build(config_lib.validate(tiny).model, vocab_size=40)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), TOKENS))
    assert shapes["params"]["type_embed"]["embedding"].value.shape == (2, 64)
