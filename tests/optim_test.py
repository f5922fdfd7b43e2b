"""The optimizer pieces checked directly: the weight-decay mask, warmup + cosine schedule, clipping; T5 FLOPs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import config_lib, optim
from jaxlm.models import config as model_config


def _optim(**kw):
    return dataclasses.replace(config_lib.validate(config_lib.base_config()).optim, **kw)


def test_weight_decay_applies_to_every_matrix_and_embedding_not_to_biases_or_norms():
    params = {
        "token_embed": {"embedding": jnp.ones((10, 4))},
        "pos_embed": {"embedding": jnp.ones((8, 4))},
        "blocks": {"layer_0": {"attn": {"query": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))}}}},
        "final_norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
    }
    mask = optim.weight_decay_mask(params)
    assert mask["token_embed"]["embedding"] and mask["pos_embed"]["embedding"]
    assert mask["blocks"]["layer_0"]["attn"]["query"]["kernel"]
    assert not mask["blocks"]["layer_0"]["attn"]["query"]["bias"]  # 2-D, but a bias
    assert not mask["final_norm"]["scale"] and not mask["final_norm"]["bias"]
    assert all(jax.tree.leaves(optim.weight_decay_mask(params, decay_norms_and_biases=True)))


def test_decay_changes_only_masked_leaves():
    cfg = _optim(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0.0)
    tx = optim.make_optimizer(cfg, 10)
    params = {"w": {"kernel": jnp.ones((2, 2))}, "n": {"scale": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["n"]["scale"], np.zeros(2))


def test_warmup_then_cosine_to_the_floor():
    cfg = _optim(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    sched = optim.learning_rate_schedule(cfg, 110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    for k in (30, 60, 90):  # cosine from 1 to 0.1 over the 100 decay steps
        want = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (k - 10) / 100))
        np.testing.assert_allclose(float(sched(k)), want, rtol=1e-5)
    np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 5.0])
def test_clipping_scales_the_global_norm_to_clip_norm_only_when_above(scale):
    cfg = _optim(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=1.0, b1=0.0, b2=0.0)
    grads = {"a": jnp.full((3,), scale / np.sqrt(3.0))}  # global norm == scale
    clip = optax.clip_by_global_norm(cfg.clip_norm)
    clipped, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), min(scale, 1.0), rtol=1e-6)
    tx = optim.make_optimizer(cfg, 10)
    assert len(tx.init(grads)) == 2  # clipping comes first, then AdamW


def test_encoder_decoder_flops_per_example_counts_inputs_and_targets_separately():
    c = config_lib.base_config()
    c.model.kind, c.data.objective = "encoder_decoder", "span_corruption"
    c.model.num_layers, c.model.embed_dim, c.model.mlp_dim, c.model.num_heads = 2, 64, 256, 4
    c.model.vocab_size, c.model.use_bias = 100, False
    m = config_lib.validate(c).model
    t, u, d, v, f = 128, 30, 64, 100, 256
    attn, mlp = 4 * d * d, 2 * d * f
    enc = 6 * 2 * (attn + mlp) + 12 * 2 * t * d
    dec = 6 * (2 * (2 * attn + mlp) + d * v) + 12 * 2 * (u + t) * d
    assert model_config.flops_per_example(m, t, u) == pytest.approx(t * enc + u * dec)
    # Per-token accounting (one input per target) overstates a span-corruption example.
    assert t * model_config.flops_per_token(m, t) > 1.5 * model_config.flops_per_example(m, t, u)
