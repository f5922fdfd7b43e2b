"""Pure step functions of text-GAN training: MLE for G, D updates, SeqGAN and Gumbel-softmax G updates.

Every step has the shape ``step(state, batch, temperature, *, ...) -> (state, metrics)``: the
state is :class:`GanState` (a pytree of arrays), ``batch`` is ``{"tokens": [B, T]}`` of real
data (every step takes one, so the data position is simply the step count), ``temperature`` is
the Gumbel-softmax inverse temperature for this step (a scalar the program computes from the
schedule). Randomness comes from ``fold_in(state.rng, state.step)``, so a resumed run repeats
an uninterrupted one bitwise. A step whose loss or gradients are not finite leaves the
parameters and optimizer states as they were (``metrics["nonfinite"] == 1``), as in
``steps.lm.train_step``. Losses are sums normalized by their counts (tokens or sequences).

* :func:`mle_step`: teacher-forced maximum likelihood of G (pre-training).
* :func:`d_step`: D on the real batch against fresh G samples (token ids for SeqGAN, relaxed
  one-hots for Gumbel), ``d_epochs`` updates on that pair (SeqGAN's epochs over each set of
  negatives, per batch).
* :func:`seqgan_g_step`: REINFORCE (Yu et al., 2017). Q(prefix, token) = the mean reward of
  ``num_rollouts`` completions by the rollout copy of G (``jaxlm.decoding.rollout``, inside
  jit through the cache), the reward at the last token is D on the sequence itself; then the
  rollout copy moves towards G: ``rollout = rate * rollout + (1 - rate) * G``.
* :func:`gumbel_g_step`: Gumbel-softmax relaxation (RelGAN, Nie et al., 2019): G samples
  ``y = softmax(beta * (logits + g))`` with Gumbel noise g; D scores the relaxed sequence and
  its gradient reaches G through ``y``. The next input is the sampled token (``feed='hard'``,
  RelGAN) or ``y`` itself (``'soft'``).

Losses (``LOSSES``; r = D(real), f = D(fake) logits): ``standard`` = ``nonsaturating`` (D:
``-log s(r) - log(1 - s(f))``; G: ``-log s(f)``, the issue's and RelGAN's "standard"),
``minimax`` (G: ``log(1 - s(f))``, the saturating original), ``hinge`` (D: ``relu(1 - r) +
relu(1 + f)``; G: ``-f``), ``rsgan`` (D: ``-log s(r - f)``; G: ``-log s(f - r)``), ``wgan_gp`` (D:
``f - r + gp_weight * (||grad_x D(x_hat)|| - 1)^2`` on interpolates of one-hot real and fake
inputs; G: ``-f``). SeqGAN's reward is ``s(f)`` for the logistic losses and ``f`` for hinge
and wgan_gp.

Shapes: B batch, T length, V vocab, R rollouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxlm import decoding
from jaxlm.models.gan import Discriminator, Generator

Batch = dict[str, jax.Array]
softplus = jax.nn.softplus


@flax.struct.dataclass
class GanState:
    """Everything a GAN run carries from step to step (all arrays: it jits, shards and checkpoints)."""

    step: jax.Array  # global step over all phases (int32 scalar)
    g_params: Any
    d_params: Any
    rollout_params: Any  # SeqGAN's delayed copy of G
    g_opt_state: Any
    d_opt_state: Any
    rng: jax.Array  # raw key data (uint32[2]); each step folds in ``step``

    @classmethod
    def create(
        cls,
        g_params: Any,
        d_params: Any,
        g_tx: optax.GradientTransformation,
        d_tx: optax.GradientTransformation,
        seed: int,
    ) -> GanState:
        """A fresh state at step 0; the rollout copy starts equal to G."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            g_params=g_params,
            d_params=d_params,
            rollout_params=jax.tree.map(jnp.copy, g_params),
            g_opt_state=g_tx.init(g_params),
            d_opt_state=d_tx.init(d_params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    def step_rng(self) -> jax.Array:
        """The key of this step: the run's key folded with ``step``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


# ---- Losses: name -> (D loss per example, G loss per example) of D logits (r = real, f = fake).

LossPair = tuple[Callable[[jax.Array, jax.Array], jax.Array], Callable[[jax.Array, jax.Array], jax.Array]]


def _logistic_d(r: jax.Array, f: jax.Array) -> jax.Array:
    return softplus(-r) + softplus(f)  # -log s(r) - log(1 - s(f))


LOSSES: dict[str, LossPair] = {
    "standard": (_logistic_d, lambda r, f: softplus(-f)),
    "nonsaturating": (_logistic_d, lambda r, f: softplus(-f)),
    "minimax": (_logistic_d, lambda r, f: -softplus(f)),  # log(1 - s(f)) = -softplus(f)
    "hinge": (lambda r, f: jax.nn.relu(1.0 - r) + jax.nn.relu(1.0 + f), lambda r, f: -f),
    "rsgan": (lambda r, f: softplus(-(r - f)), lambda r, f: softplus(-(f - r))),
    "wgan_gp": (lambda r, f: f - r, lambda r, f: -f),
}
# SeqGAN's reward from D's logit on a sequence.
REWARDS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "standard": jax.nn.sigmoid,
    "nonsaturating": jax.nn.sigmoid,
    "minimax": jax.nn.sigmoid,
    "hinge": lambda f: f,
    "rsgan": jax.nn.sigmoid,
    "wgan_gp": lambda f: f,
}


def gradient_penalty(
    d_fn: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array, eps: jax.Array
) -> jax.Array:
    """WGAN-GP: mean over examples of ``(||grad_x d_fn(x_hat)|| - 1)^2``, ``x_hat = eps real + (1 - eps) fake``.

    ``real``, ``fake``: ``[B, T, V]`` one-hot / relaxed inputs; ``eps [B]``; ``d_fn`` maps ``[B, T, V]`` to
    ``[B]`` logits. The norm is over each example's ``T x V`` entries.
    """
    x_hat = eps[:, None, None] * real + (1.0 - eps[:, None, None]) * fake
    grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(x_hat)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=(1, 2)) + 1e-12)
    return jnp.mean(jnp.square(norms - 1.0))


def policy_gradient_loss(logits: jax.Array, tokens: jax.Array, q_values: jax.Array) -> jax.Array:
    """REINFORCE surrogate ``-sum_t log G(x_t | x_<t) Q_t`` summed over ``[B, T]`` (Q held constant).

    Its gradient, averaged over sequences drawn from G, is the gradient of the expected reward
    (tests/steps/gan_steps_test.py enumerates a tiny vocabulary to check this).
    """
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
    return -jnp.sum(logp * jax.lax.stop_gradient(q_values))


def token_nll(gen: Generator, params: Any, tokens: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """``[B, T]`` negative log-likelihood of each token under G (teacher-forced)."""
    logits = gen.logits(params, gen.inputs(tokens), rng=rng)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]


# ---- Sampling from G.


def sample_tokens(gen: Generator, params: Any, rng: jax.Array, batch: int, temperature: float = 1.0) -> jax.Array:
    """``[B, T]`` token ids sampled from G through its decoding cache."""
    start = jnp.full((batch, 1), gen.start_id, jnp.int32)
    return decoding.generate(
        gen.step_fn(params), gen.init_cache(batch), start, rng, max_new_tokens=gen.seq_len, temperature=temperature
    )


def gumbel_sample(
    gen: Generator, params: Any, rng: jax.Array, batch: int, beta: jax.Array, *, feed: str = "hard"
) -> tuple[jax.Array, jax.Array]:
    """A differentiable sample: ``(relaxed one-hots [B, T, V], tokens [B, T])``.

    ``y_t = softmax(beta * (logits_t + g_t))`` with standard Gumbel noise ``g_t``; the token is
    ``argmax(logits_t + g_t)``, an exact sample from ``softmax(logits_t)``. The next input is the
    token (``feed='hard'``) or ``y_t`` (``'soft'``).
    """
    v = gen.vocab_size
    step = gen.step_fn(params)
    start = jnp.full((batch, 1), gen.start_id, jnp.int32)
    first = start if feed == "hard" else jax.nn.one_hot(start, v)

    def body(carry: tuple, i: jax.Array) -> tuple[tuple, tuple]:
        cache, previous = carry
        logits, cache = step(cache, previous, jnp.full((batch, 1), i, jnp.int32))
        noise = jax.random.gumbel(jax.random.fold_in(rng, i), (batch, v))
        perturbed = logits[:, -1].astype(jnp.float32) + noise
        soft = jax.nn.softmax(beta * perturbed, axis=-1)
        token = jnp.argmax(perturbed, axis=-1).astype(jnp.int32)
        nxt = token[:, None] if feed == "hard" else soft[:, None, :]
        return (cache, nxt), (soft, token)

    _, (soft, tokens) = jax.lax.scan(body, (gen.init_cache(batch), first), jnp.arange(gen.seq_len, dtype=jnp.int32))
    return jnp.swapaxes(soft, 0, 1), tokens.T


# ---- Updates.


def _apply(
    tx: optax.GradientTransformation, grads: Any, params: Any, opt_state: Any, finite: jax.Array
) -> tuple[Any, Any]:
    """One optimizer update, skipped (params and state unchanged) when ``finite`` is False."""

    def update(old: tuple) -> tuple:
        p, s = old
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    return jax.lax.cond(finite, update, lambda old: old, (params, opt_state))


def mle_step(
    state: GanState, batch: Batch, temperature: jax.Array, *, gen: Generator, g_tx: optax.GradientTransformation
) -> tuple[GanState, dict[str, jax.Array]]:
    """One maximum-likelihood update of G on the real batch."""
    del temperature
    tokens = batch["tokens"]
    count = jnp.asarray(tokens.size, jnp.float32)
    loss_sum, grads = jax.value_and_grad(lambda p: jnp.sum(token_nll(gen, p, tokens, state.step_rng())))(state.g_params)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss, norm = loss_sum / count, optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    g_params, g_opt = _apply(g_tx, grads, state.g_params, state.g_opt_state, finite)
    metrics = {"g_mle_loss": loss, "g_grad_norm": norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, g_params=g_params, g_opt_state=g_opt), metrics


def d_step(
    state: GanState,
    batch: Batch,
    temperature: jax.Array,
    *,
    gen: Generator,
    disc: Discriminator,
    d_tx: optax.GradientTransformation,
    mode: str,
    loss: str,
    gp_weight: float = 10.0,
    d_epochs: int = 1,
    feed: str = "hard",
) -> tuple[GanState, dict[str, jax.Array]]:
    """``d_epochs`` updates of D on the real batch against one batch of fresh G samples."""
    real = batch["tokens"]
    b = real.shape[0]
    rng = state.step_rng()
    k_fake, k_train = jax.random.split(rng)
    if mode == "gumbel":
        fake, _ = gumbel_sample(gen, state.g_params, k_fake, b, temperature, feed=feed)
        fake = jax.lax.stop_gradient(fake)
        real_in: jax.Array = jax.nn.one_hot(real, gen.vocab_size)
    else:
        fake = sample_tokens(gen, state.g_params, k_fake, b)
        real_in = real
    d_loss_fn, _ = LOSSES[loss]

    def objective(dp: Any, key: jax.Array) -> tuple[jax.Array, tuple]:
        k_real, k_fake_d, k_eps, k_gp = jax.random.split(key, 4)
        r = disc.apply(dp, real_in, rng=k_real)
        f = disc.apply(dp, fake, rng=k_fake_d)
        total = jnp.sum(d_loss_fn(r, f))
        if loss == "wgan_gp":
            one_hot = lambda x: x if x.ndim == 3 else jax.nn.one_hot(x, gen.vocab_size)  # noqa: E731
            eps = jax.random.uniform(k_eps, (b,))
            penalty = gradient_penalty(lambda x: disc.apply(dp, x, rng=k_gp), one_hot(real_in), one_hot(fake), eps)
            total = total + gp_weight * penalty * b
        return total / b, (jnp.mean(r), jnp.mean(f))

    # Unrolled (d_epochs is small): XLA:CPU ran the convolutions of a loop body far slower.
    d_params, d_opt, nonfinite = state.d_params, state.d_opt_state, jnp.zeros((), jnp.float32)
    for i in range(d_epochs):
        (value, (r, f)), grads = jax.value_and_grad(objective, has_aux=True)(d_params, jax.random.fold_in(k_train, i))
        norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(norm)
        d_params, d_opt = _apply(d_tx, grads, d_params, d_opt, finite)
        nonfinite = jnp.maximum(nonfinite, 1.0 - finite.astype(jnp.float32))
    stats = jnp.stack([r, f, norm])
    metrics = {"d_loss": value, "d_real": stats[0], "d_fake": stats[1], "d_grad_norm": stats[2], "nonfinite": nonfinite}
    return state.replace(step=state.step + 1, d_params=d_params, d_opt_state=d_opt), metrics


def seqgan_q_values(
    gen: Generator,
    disc: Discriminator,
    rollout_params: Any,
    d_params: Any,
    tokens: jax.Array,
    rng: jax.Array,
    *,
    num_rollouts: int,
    reward: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """``[B, T]`` action values: mean reward of rollouts for ``t < T``, D's reward of the sequence at ``T``."""
    b, t = tokens.shape
    rows = (t - 1) * num_rollouts * b
    start = jnp.full((b,), gen.start_id, jnp.int32)
    completions = decoding.rollout(
        gen.step_fn(rollout_params), gen.init_cache(rows), tokens, start, rng, num_rollouts=num_rollouts
    )
    scores = reward(disc.apply(d_params, completions.reshape(rows, t))).reshape(t - 1, num_rollouts, b)
    last = reward(disc.apply(d_params, tokens))
    return jnp.concatenate([jnp.mean(scores, axis=1).T, last[:, None]], axis=1)


def seqgan_g_step(
    state: GanState,
    batch: Batch,
    temperature: jax.Array,
    *,
    gen: Generator,
    disc: Discriminator,
    g_tx: optax.GradientTransformation,
    loss: str,
    num_rollouts: int = 16,
    rollout_update_rate: float = 0.8,
) -> tuple[GanState, dict[str, jax.Array]]:
    """One SeqGAN policy-gradient update of G on a batch of its own samples, then the rollout update."""
    del temperature
    b = batch["tokens"].shape[0]  # the real batch only sets the batch size
    k_sample, k_roll = jax.random.split(state.step_rng())
    tokens = sample_tokens(gen, state.g_params, k_sample, b)
    q = seqgan_q_values(
        gen, disc, state.rollout_params, state.d_params, tokens, k_roll, num_rollouts=num_rollouts, reward=REWARDS[loss]
    )
    count = jnp.asarray(tokens.size, jnp.float32)
    value, grads = jax.value_and_grad(
        lambda p: policy_gradient_loss(gen.logits(p, gen.inputs(tokens)), tokens, q) / count
    )(state.g_params)
    norm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(norm)
    g_params, g_opt = _apply(g_tx, grads, state.g_params, state.g_opt_state, finite)
    rate = rollout_update_rate
    rollout_params = jax.tree.map(lambda r, g: rate * r + (1.0 - rate) * g, state.rollout_params, g_params)
    metrics = {
        "g_pg_loss": value,
        "g_reward": jnp.mean(q[:, -1]),
        "g_adv_grad_norm": norm,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    new = state.replace(step=state.step + 1, g_params=g_params, g_opt_state=g_opt, rollout_params=rollout_params)
    return new, metrics


def gumbel_g_step(
    state: GanState,
    batch: Batch,
    temperature: jax.Array,
    *,
    gen: Generator,
    disc: Discriminator,
    g_tx: optax.GradientTransformation,
    loss: str,
    feed: str = "hard",
) -> tuple[GanState, dict[str, jax.Array]]:
    """One Gumbel-softmax update of G: D's gradient reaches G through the relaxed samples."""
    real = batch["tokens"]
    b = real.shape[0]
    k_sample, k_real, k_fake = jax.random.split(state.step_rng(), 3)
    _, g_loss_fn = LOSSES[loss]
    r = disc.apply(state.d_params, jax.nn.one_hot(real, gen.vocab_size), rng=k_real)

    def objective(p: Any) -> jax.Array:
        soft, _ = gumbel_sample(gen, p, k_sample, b, temperature, feed=feed)
        return jnp.mean(g_loss_fn(jax.lax.stop_gradient(r), disc.apply(state.d_params, soft, rng=k_fake)))

    value, grads = jax.value_and_grad(objective)(state.g_params)
    norm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(norm)
    g_params, g_opt = _apply(g_tx, grads, state.g_params, state.g_opt_state, finite)
    metrics = {
        "g_adv_loss": value,
        "temperature": jnp.asarray(temperature, jnp.float32),
        "g_adv_grad_norm": norm,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    return state.replace(step=state.step + 1, g_params=g_params, g_opt_state=g_opt), metrics


def nll_sums(params: Any, batch: Batch, *, gen: Generator) -> dict[str, jax.Array]:
    """G's summed token NLL and token count on a batch (NLL_test = their ratio over batches)."""
    nll = token_nll(gen, params, batch["tokens"])
    return {"nll_sum": jnp.sum(nll), "count": jnp.asarray(nll.size, jnp.float32)}


def temperature_at(schedule: str, max_temperature: float, i: int, n: int) -> float:
    """RelGAN's inverse temperature after ``i`` of ``n`` adversarial rounds: 1 -> ``max_temperature``."""
    if schedule == "none" or n <= 0:
        return 1.0
    frac = min(max(i / n, 0.0), 1.0)
    if schedule == "exp":
        return float(max_temperature**frac)
    if schedule == "linear":
        return float(1.0 + (max_temperature - 1.0) * frac)
    raise ValueError(f"unknown temperature schedule {schedule!r}; valid: exp, linear, none")
