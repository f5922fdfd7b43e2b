"""Text-GAN models: the CNN discriminator against a NumPy forward, soft inputs == token ids, cached
decoding == the full forward, spectral normalization against an SVD, registries == config choices."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib
from jaxlm.models import gan as gan_models
from jaxlm.models.gan.discriminators import SEQGAN_FILTER_SIZES, SEQGAN_NUM_FILTERS, CnnDiscriminator
from jaxlm.nn import spectral_norm

V, T, B = 30, 7, 3


def _cfg(**gan):
    c = config_lib.base_config()
    c.gan.mode = "seqgan"
    c.gan.adv_rounds = 1
    c.gan.d_filter_sizes = (1, 2, 3, 9)
    c.gan.d_num_filters = (3, 4, 5, 6)
    c.gan.d_embed_dim = 8
    c.gan.d_hidden_dim = 8
    c.gan.d_num_heads = 2
    c.model.num_layers = 1
    c.model.embed_dim = 16
    c.model.mlp_dim = 32
    c.model.num_heads = 2
    for k, v in gan.items():
        setattr(c.gan, k, v)
    return config_lib.validate(c)


def test_registries_match_the_config_choices():
    assert tuple(gan_models.GENERATORS) == config_lib.CHOICES["gan.generator"]
    assert tuple(gan_models.DISCRIMINATORS) == config_lib.CHOICES["gan.discriminator"]
    assert (SEQGAN_FILTER_SIZES, SEQGAN_NUM_FILTERS) == (
        config_lib.base_config().gan.d_filter_sizes,
        config_lib.base_config().gan.d_num_filters,
    )


def _numpy_cnn(p, tokens, sizes):
    x = p["embedding"][tokens]  # [B, T, E]
    pooled = []
    for w in sizes:
        if w > x.shape[1]:
            continue
        k, bias = p[f"conv{w}_kernel"], p[f"conv{w}_bias"]
        windows = np.stack([x[:, i : i + w] for i in range(x.shape[1] - w + 1)], axis=1)  # [B, P, w, E]
        y = np.einsum("bpwe,wef->bpf", windows, k) + bias
        pooled.append(np.maximum(y, 0).max(axis=1))
    h = np.concatenate(pooled, -1)
    gate = 1 / (1 + np.exp(-(h @ p["highway_gate_kernel"] + p["highway_gate_bias"])))
    h = gate * np.maximum(h @ p["highway_kernel"] + p["highway_bias"], 0) + (1 - gate) * h
    return (h @ p["out_kernel"] + p["out_bias"])[:, 0]


def test_cnn_discriminator_matches_a_numpy_forward():
    sizes, counts = (1, 2, 3, 9), (3, 4, 5, 6)  # width 9 > T is skipped
    module = CnnDiscriminator(V, 8, sizes, counts, dropout_rate=0.25)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    params = nn.unbox(module.init(jax.random.key(0), tokens)["params"])
    assert "conv9_kernel" not in params
    got = module.apply({"params": params}, tokens)
    want = _numpy_cnn(jax.tree.map(np.asarray, params), np.asarray(tokens), sizes)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "transformer", "lstm"])
@pytest.mark.parametrize("sn", [False, True])
def test_discriminators_take_one_hots_like_ids(name, sn):
    cfg = _cfg(discriminator=name, spectral_norm=sn)
    disc = gan_models.build_discriminator(cfg.gan, cfg.model, V, T)
    params = nn.unbox(disc.init(jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    a, b = disc.apply(params, tokens), disc.apply(params, jax.nn.one_hot(tokens, V))
    assert a.shape == (B,)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # Dropout is on only with an rng (the transformer's and cnn's/lstm's d_dropout = 0.25).
    c = disc.apply(params, tokens, rng=jax.random.key(2))
    assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_generators_take_one_hots_and_decode_like_the_full_forward(name):
    cfg = _cfg(generator=name)
    gen = gan_models.build_generator(cfg.gan, cfg.model, V, T, start_id=0)
    params = nn.unbox(gen.init(jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    inputs = gen.inputs(tokens)
    full = gen.logits(params, inputs)
    np.testing.assert_allclose(np.asarray(gen.logits(params, jax.nn.one_hot(inputs, V))), np.asarray(full), atol=1e-5)
    cache, step, outs = gen.init_cache(B), gen.step_fn(params), []
    for t in range(T):
        logits, cache = step(cache, inputs[:, t : t + 1], jnp.full((B, 1), t, jnp.int32))
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)


def test_transformer_generator_has_the_decoder_only_parameter_tree():
    from jaxlm.models.decoder_only import DecoderOnly

    cfg = _cfg(generator="transformer")
    gen = gan_models.build_generator(cfg.gan, cfg.model, V, T, start_id=0)
    lm = DecoderOnly(dataclasses.replace(cfg.model, vocab_size=V))
    ours = jax.eval_shape(gen.init, jax.random.key(0))
    theirs = jax.eval_shape(lambda k: lm.init(k, jnp.zeros((1, T), jnp.int32))["params"], jax.random.key(0))
    assert jax.tree.structure(nn.unbox(ours)) == jax.tree.structure(nn.unbox(theirs))


def test_spectral_normalization_against_svd():
    w = np.random.default_rng(0).normal(size=(12, 7)).astype(np.float32)
    sigma = np.linalg.svd(w, compute_uv=False)[0]
    np.testing.assert_allclose(float(spectral_norm.spectral_norm_estimate(jnp.asarray(w), 300)), sigma, rtol=1e-4)
    normalized = np.asarray(spectral_norm.spectral_normalize(jnp.asarray(w), 300))
    np.testing.assert_allclose(np.linalg.svd(normalized, compute_uv=False)[0], 1.0, rtol=1e-4)
    # Few iterations from the fixed start never overestimate sigma (the normalized norm is >= 1).
    assert float(spectral_norm.spectral_norm_estimate(jnp.asarray(w), 1)) <= sigma * (1 + 1e-5)
    # A convolution kernel [width, E, F] is the matrix [width*E, F]; attention query [D, N, H] is [D, N*H].
    k = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    tree = spectral_norm.normalize_tree({"conv": k, "attn": {"query": {"kernel": k}}, "bias": np.ones(5)}, 30)
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(tree["conv"]).reshape(12, 5), compute_uv=False)[0], 1, rtol=1e-3
    )
    q = np.asarray(tree["attn"]["query"]["kernel"]).reshape(3, 20)
    np.testing.assert_allclose(np.linalg.svd(q, compute_uv=False)[0], 1, rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(tree["bias"]), np.ones(5))
