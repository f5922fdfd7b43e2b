"""Text-GAN steps against closed forms: REINFORCE == the exact gradient of the expected reward on an
enumerable vocabulary, Monte-Carlo rollouts == exact action values, Gumbel-softmax frequencies ==
softmax, the WGAN-GP penalty == a hand computation, the losses == their formulas."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.models import gan as gan_models
from jaxlm.models.gan.generators import LstmGenerator
from jaxlm.steps import gan as gs

V, T = 3, 3


def _generator():
    gen = gan_models.Generator(LstmGenerator(V, 4, 4), V, T, start_id=0)
    params = nn.unbox(gen.init(jax.random.key(0)))
    # Larger weights than SeqGAN's N(0, 0.1), so the policy is far from uniform and the test is sharp.
    params = jax.tree.map(lambda p: p * 8.0, params)
    return gen, params


def _all_sequences():
    return np.array(list(itertools.product(range(V), repeat=T)), np.int32)  # [V**T, T]


def _seq_log_probs(gen, params, seqs):
    return -jnp.sum(gs.token_nll(gen, params, jnp.asarray(seqs)), axis=1)


def _exact_q(probs, rewards, seqs):
    """Q_t(x) = E[R | x_<=t] under the policy, for t = 1..T (T: R itself)."""
    q = np.zeros(seqs.shape, np.float64)
    for t in range(1, T + 1):
        for i, s in enumerate(seqs):
            same = np.all(seqs[:, :t] == s[:t], axis=1)
            q[i, t - 1] = np.sum(probs[same] * rewards[same]) / np.sum(probs[same])
    return q


def test_reinforce_gradient_equals_the_gradient_of_the_expected_reward():
    gen, params = _generator()
    seqs = _all_sequences()
    rewards = np.random.default_rng(0).normal(size=len(seqs))

    def expected_reward(p):
        return jnp.sum(jnp.exp(_seq_log_probs(gen, p, seqs)) * rewards)

    exact = jax.grad(expected_reward)(params)
    probs = np.exp(np.asarray(_seq_log_probs(gen, params, seqs), np.float64))
    assert abs(probs.sum() - 1.0) < 1e-5
    q = _exact_q(probs, rewards, seqs)

    def surrogate(p):  # E_x[-policy_gradient_loss(x, Q(x))], the expectation enumerated
        logits = gen.logits(p, gen.inputs(jnp.asarray(seqs)))
        per_seq = jax.vmap(gs.policy_gradient_loss)(
            logits[:, None], jnp.asarray(seqs)[:, None], jnp.asarray(q)[:, None]
        )
        return -jnp.sum(jnp.asarray(probs) * per_seq)

    estimate = jax.grad(surrogate)(params)
    for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(estimate)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)
    # The gradient is not trivially zero.
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(exact)) > 1e-2


class _TableD(nn.Module):
    """A 'discriminator' whose logit is a fixed table entry per sequence."""

    table: tuple

    def __call__(self, x, *, deterministic=True):
        index = jnp.sum(x * (V ** jnp.arange(T - 1, -1, -1)), axis=1)
        return jnp.asarray(self.table)[index]


def test_monte_carlo_rollouts_estimate_the_exact_action_values():
    gen, params = _generator()
    seqs = _all_sequences()
    rewards = np.random.default_rng(1).uniform(size=len(seqs))
    disc = gan_models.Discriminator(_TableD(tuple(float(r) for r in rewards)), T)
    probs = np.exp(np.asarray(_seq_log_probs(gen, params, seqs), np.float64))
    q_exact = _exact_q(probs, rewards, seqs)
    rollouts = 3000
    q = gs.seqgan_q_values(
        gen, disc, params, {}, jnp.asarray(seqs), jax.random.key(3), num_rollouts=rollouts, reward=lambda f: f
    )
    q = np.asarray(q)
    np.testing.assert_allclose(q[:, -1], rewards, rtol=1e-6)  # the last token: D on the sequence itself
    # Rewards lie in [0, 1], so the standard error of a mean of 3000 draws is <= 0.5 / sqrt(3000) ~ 0.009.
    np.testing.assert_allclose(q[:, :-1], q_exact[:, :-1], atol=0.04)


def test_rollout_keeps_each_prefix_and_samples_the_rest():
    gen, params = _generator()
    tokens = jnp.asarray([[2, 1, 0], [1, 1, 2]], jnp.int32)
    rows = (T - 1) * 4 * 2
    out = gan_models_decoding_rollout(gen, params, tokens, rows)
    assert out.shape == (T - 1, 4, 2, T)
    for t in range(1, T):
        np.testing.assert_array_equal(
            np.asarray(out[t - 1, :, :, :t]), np.broadcast_to(np.asarray(tokens)[:, :t], (4, 2, t))
        )


def gan_models_decoding_rollout(gen, params, tokens, rows):
    from jaxlm import decoding

    start = jnp.zeros((tokens.shape[0],), jnp.int32)
    return decoding.rollout(gen.step_fn(params), gen.init_cache(rows), tokens, start, jax.random.key(0), num_rollouts=4)


@pytest.mark.parametrize("feed", ["hard", "soft"])
def test_gumbel_softmax_sample_frequencies_match_the_softmax(feed):
    gen, params = _generator()
    n = 20_000
    soft, tokens = jax.jit(functools.partial(gs.gumbel_sample, gen, feed=feed), static_argnums=(2,))(
        params, jax.random.key(5), n, jnp.float32(1.0)
    )
    first = np.asarray(tokens[:, 0])
    probs = np.asarray(jax.nn.softmax(gen.logits(params, jnp.zeros((1, 1), jnp.int32))[0, 0]))
    freq = np.bincount(first, minlength=V) / n
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(probs * (1 - probs) / n).max() + 1e-3)
    # The relaxed one-hot peaks at the sampled token and sums to one.
    np.testing.assert_array_equal(np.argmax(np.asarray(soft), -1), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(soft).sum(-1), 1.0, rtol=1e-5)


def test_gumbel_relaxation_sharpens_with_the_inverse_temperature():
    gen, params = _generator()
    sample = jax.jit(functools.partial(gs.gumbel_sample, gen), static_argnums=(2,))
    soft_1, _ = sample(params, jax.random.key(6), 256, jnp.float32(1.0))
    soft_100, _ = sample(params, jax.random.key(6), 256, jnp.float32(100.0))
    assert float(jnp.mean(jnp.max(soft_100, -1))) > 0.95 > float(jnp.mean(jnp.max(soft_1, -1)))


def test_wgan_gp_penalty_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    b, t, v = 4, 5, 6
    real = np.eye(v, dtype=np.float32)[rng.integers(0, v, (b, t))]
    fake = rng.dirichlet(np.ones(v), size=(b, t)).astype(np.float32)
    eps = rng.uniform(size=b).astype(np.float32)
    w = rng.normal(size=(t, v)).astype(np.float32)
    # Linear critic: the gradient is w everywhere.
    linear = gs.gradient_penalty(lambda x: jnp.sum(x * w, axis=(1, 2)), real, fake, jnp.asarray(eps))
    np.testing.assert_allclose(float(linear), (np.linalg.norm(w) - 1.0) ** 2, rtol=1e-5)
    # Quadratic critic sum((x w)^2): the gradient 2 w^2 x_hat depends on the interpolate.
    quad = gs.gradient_penalty(lambda x: jnp.sum((x * w) ** 2, axis=(1, 2)), real, fake, jnp.asarray(eps))
    x_hat = eps[:, None, None] * real + (1 - eps[:, None, None]) * fake
    norms = np.sqrt(np.sum((2 * w**2 * x_hat) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(float(quad), np.mean((norms - 1.0) ** 2), rtol=1e-5)


def test_losses_match_their_formulas():
    r, f = np.array([1.5, -0.3]), np.array([-2.0, 0.7])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = {
        "standard": (-np.log(sig(r)) - np.log(1 - sig(f)), -np.log(sig(f))),
        "nonsaturating": (-np.log(sig(r)) - np.log(1 - sig(f)), -np.log(sig(f))),
        "minimax": (-np.log(sig(r)) - np.log(1 - sig(f)), np.log(1 - sig(f))),
        "hinge": (np.maximum(0, 1 - r) + np.maximum(0, 1 + f), -f),
        "rsgan": (-np.log(sig(r - f)), -np.log(sig(f - r))),
        "wgan_gp": (f - r, -f),
    }
    assert set(expected) == set(gs.LOSSES) == set(gs.REWARDS)
    for name, (d_want, g_want) in expected.items():
        d_fn, g_fn = gs.LOSSES[name]
        np.testing.assert_allclose(np.asarray(d_fn(jnp.asarray(r), jnp.asarray(f))), d_want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g_fn(jnp.asarray(r), jnp.asarray(f))), g_want, rtol=1e-5)


def test_temperature_schedules():
    assert gs.temperature_at("none", 100.0, 5, 10) == 1.0
    assert gs.temperature_at("exp", 100.0, 0, 10) == 1.0
    assert gs.temperature_at("exp", 100.0, 5, 10) == pytest.approx(10.0)
    assert gs.temperature_at("exp", 100.0, 10, 10) == pytest.approx(100.0)
    assert gs.temperature_at("linear", 101.0, 5, 10) == pytest.approx(51.0)


def test_a_nonfinite_step_leaves_the_state_unchanged():
    gen, params = _generator()
    tx = optax.adam(1e-2)
    state = gs.GanState.create(params, {}, tx, tx, 0)
    poisoned = state.replace(g_params=jax.tree.map(lambda p: p.at[..., 0].set(jnp.nan), state.g_params))
    new, metrics = gs.mle_step(poisoned, {"tokens": jnp.zeros((2, T), jnp.int32)}, jnp.float32(1), gen=gen, g_tx=tx)
    assert float(metrics["nonfinite"]) == 1.0 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.g_opt_state), jax.tree.leaves(poisoned.g_opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
