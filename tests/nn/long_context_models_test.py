"""Memory-linear attention, sliding windows and RoPE scaling inside the models.

Every model family must give the same logits and parameter gradients with
``model.attention=blockwise`` (vector-form masks and biases, evaluated per tile) as with the
reference ``xla`` path (dense masks), with packed segments and ALiBi / T5 biases; per-layer
sliding windows must agree across implementations, scanned and unrolled; cached decoding with a
rolling window cache must equal the full forward; and a blockwise training step's compiled
temporaries must grow linearly with length.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import config_lib, models
from jaxlm.main.generate import init_cache, make_step_fn

TOL = dict(rtol=2e-5, atol=2e-5)


def _cfg(**kw):
    cfg = config_lib.validate(config_lib.base_config()).model
    base = dict(vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=16, mlp_dim=32, max_len=24)
    base.update(kw)
    return dataclasses.replace(cfg, **base)


SEG = jnp.asarray([[1] * 6 + [2] * 5 + [0], [1] * 12])
POS = jnp.asarray([list(range(6)) + list(range(5)) + [0], list(range(12))])


def _call(model, params, tokens, kind):
    if kind == "decoder_only":
        return model.apply({"params": params}, tokens, positions=POS, segment_ids=SEG)
    if kind == "encoder_only":
        return model.apply({"params": params}, tokens, positions=POS, segment_ids=SEG)["mlm_logits"]
    return model.apply(
        {"params": params},
        tokens,
        tokens,
        inputs_positions=POS,
        targets_positions=POS,
        inputs_segment_ids=SEG,
        targets_segment_ids=SEG,
    )


def _logits_and_grads(cfg, params, tokens):
    model = models.build(cfg)

    @jax.jit
    def run(params):
        def loss(params):
            out = _call(model, params, tokens, cfg.kind)
            return jnp.sum(jnp.sin(out)), out

        return jax.grad(loss, has_aux=True)(params)

    grads, out = run(params)
    return out, grads


@pytest.mark.parametrize(
    "kind,position",
    [
        ("decoder_only", "alibi"),
        pytest.param("encoder_only", "learned", marks=pytest.mark.slow),
        pytest.param("encoder_decoder", "relative", marks=pytest.mark.slow),
    ],
)
def test_blockwise_models_equal_xla(kind, position):
    cfg = _cfg(kind=kind, position=position, attention_window=(0, 4) if kind == "decoder_only" else (0,))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 1, cfg.vocab_size)
    model = models.build(cfg)
    args = (tokens,) if kind != "encoder_decoder" else (tokens, tokens)
    params = nn.unbox(model.init(jax.random.key(0), *args)["params"])
    ref_out, ref_grads = _logits_and_grads(cfg, params, tokens)
    out, grads = _logits_and_grads(dataclasses.replace(cfg, attention="blockwise"), params, tokens)
    np.testing.assert_allclose(out, ref_out, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, ref_grads)


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_mixed_windows_scanned_equal_unrolled_and_differ_from_full(attention):
    cfg = _cfg(attention=attention, position="alibi", attention_window=(3, 0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 1, cfg.vocab_size)
    model = models.build(cfg)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    out = model.apply({"params": params}, tokens)
    layers = [params["blocks"][f"layer_{i}"] for i in range(cfg.num_layers)]
    stacked = dict(params)
    stacked["blocks"] = {"layers": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}}
    scanned = models.build(dataclasses.replace(cfg, scan_layers=True))
    np.testing.assert_allclose(scanned.apply({"params": stacked}, tokens), out, **TOL)
    full = models.build(dataclasses.replace(cfg, attention_window=(0,))).apply({"params": params}, tokens)
    np.testing.assert_allclose(full[:, :3], out[:, :3], **TOL)  # the first 3 tokens see all they can
    assert not np.allclose(full[:, 3:], out[:, 3:], atol=1e-4)


@pytest.mark.parametrize("attention,position", [("xla", "alibi"), ("blockwise", "rope")])
def test_rolling_cache_decoding_matches_windowed_forward(attention, position):
    cfg = _cfg(attention=attention, position=position, attention_window=(4, 0))
    model = models.build(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    full = model.apply({"params": params}, tokens)
    step = jax.jit(make_step_fn(model, params))
    cache = init_cache(model, 2, cfg.max_len)
    assert cache["blocks"]["layer_0"]["attn"]["cached_key"].shape[1] == 4  # O(window)
    assert cache["blocks"]["layer_1"]["attn"]["cached_key"].shape[1] == cfg.max_len
    logits, cache = step(cache, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)))
    outs = [logits]
    for i in range(5, 12):
        logits, cache = step(cache, tokens[:, i : i + 1], jnp.full((2, 1), i))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def _train_step_temp_bytes(attention: str, length: int) -> int:
    cfg = _cfg(attention=attention, position="alibi", num_layers=1, max_len=length, vocab_size=64)
    model = models.build(cfg)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))))
    tx = optax.adamw(1e-3)

    def step(params, opt_state, tokens):
        def loss(p):
            logits = model.apply(p, tokens, segment_ids=jnp.ones_like(tokens))
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step).lower(params, opt_state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blockwise_training_step_memory_is_linear_with_packing_and_alibi():
    small, large = (_train_step_temp_bytes("blockwise", n) for n in (2048, 4096))
    assert large < 2.2 * small, (small, large)
    xla_small, xla_large = (_train_step_temp_bytes("xla", n) for n in (1024, 2048))
    assert xla_large > 3 * xla_small  # the reference really is quadratic: the test can tell them apart


def test_rope_scaling_config_reaches_attention():
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 40)
    outs = {}
    for scaling, factor, scale in [("none", 1.0, 1.0), ("linear", 2.0, 1.0), ("none", 1.0, 2.0), ("yarn", 2.0, 1.0)]:
        cfg = _cfg(position="rope", rope_scaling=scaling, rope_scaling_factor=factor, rope_scale=scale, max_len=16)
        model = models.build(cfg)
        params = model.init(jax.random.key(0), tokens)["params"]
        outs[(scaling, scale)] = np.asarray(model.apply({"params": params}, tokens))
    # rope_scale=2 (the old key) is linear scaling by 2.
    np.testing.assert_allclose(outs[("linear", 1.0)], outs[("none", 2.0)], rtol=1e-5, atol=1e-5)
    assert np.abs(outs[("none", 1.0)] - outs[("linear", 1.0)]).max() > 1e-6
    assert np.abs(outs[("yarn", 1.0)] - outs[("linear", 1.0)]).max() > 1e-6


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model.attention_window": "-1"}, "attention_window=.* must be integers >= 0"),
        ({"model.attention_window": "512"}, "exceeds config.data.seq_len"),
        ({"model.attention_window": "0,8,0,8,0"}, "5 entries but the model has 4 layers"),
        ({"model.position": "rope", "model.rope_scale": "2", "model.rope_scaling": "yarn"}, "both rescale RoPE"),
        ({"model.position": "rope", "model.rope_scaling": "yarn", "model.rope_scaling_factor": "0"}, "must be > 0"),
        ({"model.rope_scaling": "ntk-aware"}, "is not one of: none, linear, ntk, dynamic, yarn, llama3"),
    ],
)
def test_bad_long_context_config_is_one_line(overrides, message):
    c = config_lib.base_config()
    config_lib.apply_overrides(c, {"model.num_layers": "4", "data.seq_len": "256", **overrides})
    with pytest.raises(config_lib.ConfigError, match=message) as info:
        config_lib.validate(c)
    assert "\n" not in str(info.value)
