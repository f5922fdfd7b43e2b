import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, models
from jaxlm.main.generate import init_cache, make_step_fn


def _cfg(**kw):
    cfg = config_lib.validate(config_lib.base_config()).model
    base = dict(vocab_size=50, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=32)
    base.update(kw)
    return dataclasses.replace(cfg, **base)


def _init(cfg, batch=2, length=16):
    model = models.build(cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, cfg.vocab_size)
    params = jax.jit(lambda: model.init(jax.random.key(0), tokens))()["params"]
    return model, params, tokens


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_shapes_and_dtype(position):
    model, params, tokens = _init(_cfg(position=position))
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 16, 50) and logits.dtype == jnp.float32


def test_causality():
    model, params, tokens = _init(_cfg())
    t = 7
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 3) % 50)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_untied_head_has_its_own_weights():
    _, params, _ = _init(_cfg(tie_embeddings=False))
    assert "lm_head" in params


def test_scanned_equals_unrolled():
    cfg = _cfg()
    model, params, tokens = _init(cfg)
    scanned = models.build(dataclasses.replace(cfg, scan_layers=True, remat="full"))
    layers = [params["blocks"][f"layer_{i}"] for i in range(cfg.num_layers)]
    stacked = dict(params)
    stacked["blocks"] = {"layers": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}}
    stacked = jax.tree.map(lambda x: getattr(x, "value", x), stacked, is_leaf=lambda x: hasattr(x, "value"))
    np.testing.assert_allclose(
        model.apply({"params": params}, tokens), scanned.apply({"params": stacked}, tokens), atol=1e-5
    )


def test_cached_decoding_matches_full_forward():
    cfg = _cfg(num_kv_heads=2)
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
