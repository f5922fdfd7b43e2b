import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, models
from jaxlm.main.generate import init_cache, make_step_fn
from jaxlm.models import config as model_config


def _cfg(**kw):
    cfg = config_lib.validate(config_lib.base_config()).model
    base = dict(vocab_size=40, num_layers=2, num_heads=4, embed_dim=16, mlp_dim=32, max_len=16)
    base.update(kw)
    return dataclasses.replace(cfg, **base)


def _init(cfg, batch=2, length=8):
    model = models.build(cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, cfg.vocab_size)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    return model, params, tokens


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_shapes_and_dtype(position):
    model, params, tokens = _init(_cfg(position=position))
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 8, 40) and logits.dtype == jnp.float32


def test_gpt2_parameter_names():
    # jaxlm.interop.hf maps GPT-2 weights onto exactly these names.
    _, params, _ = _init(_cfg(num_layers=1))
    shapes = jax.tree.map(np.shape, params)
    assert shapes == {
        "token_embed": {"embedding": (40, 16)},
        "pos_embed": {"embedding": (16, 16)},
        "blocks": {
            "layer_0": {
                "attn_norm": {"scale": (16,), "bias": (16,)},
                "attn": {
                    "query": {"kernel": (16, 4, 4), "bias": (4, 4)},
                    "key": {"kernel": (16, 4, 4), "bias": (4, 4)},
                    "value": {"kernel": (16, 4, 4), "bias": (4, 4)},
                    "out": {"kernel": (4, 4, 16), "bias": (16,)},
                },
                "mlp_norm": {"scale": (16,), "bias": (16,)},
                "mlp": {"wi": {"kernel": (16, 32), "bias": (32,)}, "wo": {"kernel": (32, 16), "bias": (16,)}},
            }
        },
        "final_norm": {"scale": (16,), "bias": (16,)},
    }


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "relative"])
def test_causality(position):
    model, params, tokens = _init(_cfg(position=position))
    t = 4
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 3) % 40)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_packed_segments_do_not_attend_across():
    model, params, tokens = _init(_cfg(position="rope"))
    segments = jnp.array([[1] * 3 + [2] * 5, [1] * 8])
    positions = jnp.array([list(range(3)) + list(range(5)), list(range(8))])
    packed = model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)
    alone = model.apply({"params": params}, tokens[:1, 3:])
    np.testing.assert_allclose(packed[0, 3:], alone[0], atol=1e-5)


def test_untied_head_has_its_own_weights():
    _, params, _ = _init(_cfg(tie_embeddings=False))
    assert params["lm_head"]["kernel"].shape == (16, 40)


def test_scanned_equals_unrolled():
    cfg = _cfg()
    model, params, tokens = _init(cfg)
    scanned = models.build(dataclasses.replace(cfg, scan_layers=True, remat="full"))
    layers = [params["blocks"][f"layer_{i}"] for i in range(cfg.num_layers)]
    stacked = dict(params)
    stacked["blocks"] = {"layers": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}}
    np.testing.assert_allclose(
        model.apply({"params": params}, tokens), scanned.apply({"params": stacked}, tokens), atol=1e-5
    )


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi", "relative", "none"])
def test_cached_decoding_matches_full_forward(position):
    cfg = _cfg(num_kv_heads=2, position=position)
    model, params, tokens = _init(cfg, length=12)
    full = model.apply({"params": params}, tokens)
    step = make_step_fn(model, params)
    cache = init_cache(model, 2, cfg.max_len)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = step(cache, tokens[:, :5], pos)  # pre-fill 5 tokens at once
    outs = [logits]
    for i in range(5, 12):
        logits, cache = step(cache, tokens[:, i : i + 1], jnp.full((2, 1), i))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_flops_per_token_by_hand():
    cfg = _cfg(num_kv_heads=2, activation="swiglu")  # L=2, D=16, N=4, K=2, H=4, F=32, V=40
    attention = 16 * 16 * 2 + 16 * 8 * 2  # q, out: D*N*H; k, v: D*K*H
    mlp = 3 * 16 * 32  # gated: wi_0, wi_1, wo
    n = 2 * (attention + mlp) + 16 * 40
    assert n == 5248
    assert model_config.matmul_params(cfg) == n
    assert model_config.flops_per_token(cfg, 8) == 6 * n + 12 * 2 * 8 * 16
    # N is every kernel a token passes through (here the tied embedding is the LM head).
    _, params, _ = _init(cfg)
    kernels = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if p[-1].key == "kernel")
    assert kernels + params["token_embed"]["embedding"].size == n
