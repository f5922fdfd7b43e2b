"""The trainer's step takes the optimizer's numbers as inputs: runs that differ only in them share one program."""

import contextlib
import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, optim
from jaxlm.main import gan, train

MISS = "/jax/compilation_cache/cache_misses"


@contextlib.contextmanager
def _cache_misses() -> Iterator[list[str]]:
    """The persistent compilation cache's misses (one per program compiled anew) inside the block."""
    misses: list[str] = []
    listener = lambda event, **kw: misses.append(event) if event == MISS else None  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        yield misses
    finally:
        jax.monitoring.unregister_event_listener(listener)


def _optim(**kw):
    return dataclasses.replace(config_lib.validate(config_lib.base_config()).optim, **kw)


def test_runs_differing_in_lr_steps_warmup_decay_and_clip_compile_nothing_new(tiny_config, text_corpus, tmp_path):
    c = tiny_config
    c.data.source, c.data.files = "files", text_corpus
    c.train.num_steps, c.train.log_every, c.train.eval_every, c.train.eval_steps = 4, 2, 0, 1
    first = config_lib.validate(c)
    c.train.num_steps, c.train.log_every = 6, 3
    c.optim.lr, c.optim.warmup_steps, c.optim.min_lr_ratio = 1e-3, 1, 0.2
    c.optim.weight_decay, c.optim.clip_norm = 0.05, 0.5
    second = config_lib.validate(c)
    train.run(first, str(tmp_path / "first"))

    with _cache_misses() as misses:
        metrics = train.run(second, str(tmp_path / "second"))
    # Every program of the second run (init, train step, eval, logged schedule) came from the
    # persistent cache that the first run filled: the new numbers are inputs, not constants.
    assert misses == []
    # ... and they are the ones used: the logged lr is the second config's at its last step.
    lr = optim.learning_rate_schedule(second.optim, second.train.num_steps)(5)
    np.testing.assert_allclose(metrics["lr"], float(lr), rtol=1e-6)
    assert metrics["lr"] != pytest.approx(float(optim.learning_rate_schedule(first.optim, 6)(5)))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_inputs_and_constants_give_the_same_updates(schedule):
    cfg = _optim(lr=0.1, warmup_steps=3, schedule=schedule, min_lr_ratio=0.1, weight_decay=0.3, clip_norm=0.5)
    params = {"w": {"kernel": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}, "n": {"scale": jnp.ones(3)}}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)  # global norm > clip_norm: clipping acts
    constant = optim.make_optimizer(cfg, 10)

    @jax.jit
    def with_inputs(hyper, opt_state):
        return optim.make_optimizer(cfg, 10, hyper).update(grads, opt_state, params)

    state_c = state_i = constant.init(params)
    for _ in range(6):  # through warmup into the decay
        updates_c, state_c = jax.jit(constant.update)(grads, state_c, params)
        updates_i, state_i = with_inputs(optim.hyperparameters(cfg, 10), state_i)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), updates_c, updates_i)
    # Another lr given as an input (same compiled program) scales the update accordingly.
    hyper = optim.hyperparameters(cfg, 10) | {"lr": np.float32(0.2), "weight_decay": np.float32(0.0)}
    doubled, _ = with_inputs(hyper, state_c)
    hyper["lr"] = np.float32(0.1)
    single, _ = with_inputs(hyper, state_c)
    np.testing.assert_allclose(doubled["w"]["kernel"], 2 * single["w"]["kernel"], rtol=1e-6)
    assert with_inputs._cache_size() == 1


def test_schedule_with_traced_numbers_matches_the_formula():
    cfg = _optim(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    lr_at = jax.jit(lambda i, h: optim.learning_rate_schedule(cfg, 0, h)(i))
    hyper = optim.hyperparameters(cfg, 110)
    assert float(lr_at(0, hyper)) == 0.0
    np.testing.assert_allclose(float(lr_at(5, hyper)), 0.5, rtol=1e-6)
    for k in (10, 30, 60, 110, 200):
        want = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(k - 10, 100) / 100))
        np.testing.assert_allclose(float(lr_at(k, hyper)), want, rtol=1e-5)
    # No warmup: the decay starts at step 0 (warmup is capped below num_steps).
    hyper = optim.hyperparameters(dataclasses.replace(cfg, warmup_steps=0), 100)
    np.testing.assert_allclose(float(lr_at(0, hyper)), 1.0, rtol=1e-6)
    assert optim.hyperparameters(cfg, 5)["warmup_steps"] == 4


def test_gan_runs_differing_in_learning_rates_decay_and_clip_compile_nothing_new(tmp_path):
    def config(**overrides):
        c = config_lib.load_config_file("configs/seqgan.py:size=tiny")
        c.train.progress = False
        config_lib.apply_overrides(c, {k: str(v) for k, v in overrides.items()})
        return config_lib.validate(c)

    first = gan.run(config(), str(tmp_path / "first"))
    other = config(**{"gan.g_lr": 0.02, "gan.adv_g_lr": 0.003, "gan.d_lr": 3e-4, "gan.clip_norm": 1.0})
    assert gan.hyperparameters(other, 3)["d_lr"] == np.float32(3e-4)
    with _cache_misses() as misses:
        second = gan.run(other, str(tmp_path / "second"))
    assert misses == []  # the MLE, D and G updates, init, sampling and evaluation all came from the cache
    assert second["nll_oracle"] != first["nll_oracle"]  # the new numbers trained G differently
