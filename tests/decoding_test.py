import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config_lib, decoding, models
from jaxlm.main.generate import init_cache, make_step_fn


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    k2 = decoding.filter_logits(logits, top_k=2)
    assert (
        np.isfinite(np.asarray(k2))[0].tolist() == [True, True, False, False] or (np.asarray(k2)[0, 2:] < -1e30).all()
    )
    kept = lambda p: (np.asarray(decoding.filter_logits(logits, top_p=p))[0] > -1e30).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.75) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]


def test_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    logits = jnp.log(jnp.tile(probs, (20000, 1)))
    draws = np.asarray(decoding.sample(logits, jax.random.key(0), temperature=1.0))
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), probs, atol=0.015)
    assert (np.asarray(decoding.sample(logits[:5], jax.random.key(0), temperature=0.0)) == 0).all()


def test_cached_greedy_equals_uncached_greedy():
    cfg = dataclasses.replace(
        config_lib.validate(config_lib.base_config()).model,
        vocab_size=40,
        num_layers=2,
        num_heads=2,
        embed_dim=32,
        mlp_dim=64,
        max_len=48,
    )
    model = models.build(cfg)
    prompt = jax.random.randint(jax.random.key(3), (3, 6), 0, 40)
    # Jitted: one compile instead of one per initializer op (op-by-op dispatch compiles each).
    params = jax.jit(model.init)(jax.random.key(0), prompt)["params"]
    # Sharpen the output distribution so greedy choices are not decided by rounding.
    params = jax.tree.map(lambda x: x * 3.0, params)
    cached = decoding.generate(
        make_step_fn(model, params),
        init_cache(model, 3, cfg.max_len),
        prompt,
        jax.random.key(0),
        max_new_tokens=20,
        temperature=0.0,
    )
    uncached = decoding.generate_uncached(lambda t: model.apply({"params": params}, t), prompt, max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))


def test_generation_stops_at_eos():
    def step_fn(cache, tokens, positions):
        logits = jax.nn.one_hot(jnp.full(tokens.shape, 2), 5) * 10.0  # always predicts eos (2)
        return logits, cache

    out = decoding.generate(
        step_fn,
        None,
        jnp.ones((2, 3), jnp.int32),
        jax.random.key(0),
        max_new_tokens=4,
        temperature=0.0,
        eos_id=2,
        pad_id=0,
    )
    assert np.asarray(out).tolist() == [[2, 0, 0, 0], [2, 0, 0, 0]]
