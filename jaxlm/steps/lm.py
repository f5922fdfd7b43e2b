"""Train and eval steps for every objective; the loss and eval functions come from ``steps.objectives``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.steps import objectives
from jaxlm.train_state import TrainState

Batch = dict[str, jax.Array]
# (frozen base, trainable tree, rng) -> the full parameters the model is applied with (jaxlm.peft).
Assemble = Callable[[Any, Any, jax.Array], Any]


def loss_fn(
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    *,
    model: nn.Module,
    deterministic: bool,
    objective: objectives.LossFn = objectives.causal_lm,
) -> tuple:
    """Summed token loss and the summed weight (the mean is their ratio)."""
    return objective(model, params, batch, rng, deterministic)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    frozen: Any = None,
    hyper: Any = None,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    make_tx: Callable[[Any], optax.GradientTransformation] | None = None,
    grad_accum_steps: int = 1,
    objective: objectives.LossFn = objectives.causal_lm,
    cond_update: bool = False,
    assemble: Assemble | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch; returns the new state and metrics.

    Lightweight fine-tuning (``jaxlm.peft``): ``state.params`` is then only the trainable tree,
    ``frozen`` the frozen base parameters, and the model is applied to
    ``assemble(frozen, state.params, rng)``; only the trainable tree is differentiated, so the
    base has neither gradients nor optimizer state.

    With ``grad_accum_steps > 1`` the batch is split into that many micro-batches whose
    gradient sums are accumulated with ``lax.scan`` before one update, so a large global
    batch fits in memory. The loss is normalized by the total token weight of the whole
    batch, so the result equals the single-pass gradient.

    A step whose loss or gradient norm is not finite leaves params and optimizer state as they
    were. ``cond_update`` (``config.train.cond_update``) decides how: ``True`` runs the
    optimizer update inside a ``lax.cond`` on that flag; ``False`` computes it always and
    selects element-wise between new and old. Both give the same state. On XLA:CPU the
    conditional is faster and smaller: the element-wise select made XLA recompute the Adam
    moments inside the parameter update and copy the donated optimizer state first (200 copies
    per step at ``baby``); on a GPU a conditional sends its predicate to the host.

    ``hyper`` (``jaxlm.optim.hyperparameters``: learning-rate schedule, weight decay, clipping
    norm), when given, is passed to ``make_tx`` to build the optimizer inside the step, so those
    numbers are inputs of the compiled program rather than constants in it; ``tx`` is used otherwise.
    """
    if hyper is not None:
        if make_tx is None:
            raise ValueError("train_step was given hyper but no make_tx to build the optimizer from it")
        tx = make_tx(hyper)
    step_rng = jax.random.fold_in(rng, state.step)
    if assemble is None:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    else:

        def peft_loss(trainable: Any, micro_batch: Batch, micro_rng: jax.Array, **kw: Any) -> tuple:
            # A separate stream for the PEFT transform's own randomness (LoRA dropout).
            full = assemble(frozen, trainable, jax.random.fold_in(micro_rng, 0x5EF7))
            return loss_fn(full, micro_batch, micro_rng, **kw)

        grad_fn = jax.value_and_grad(peft_loss, has_aux=True)

    def micro(params: Any, micro_batch: Batch, micro_rng: jax.Array) -> tuple:
        (loss_sum, weight_sum), grads = grad_fn(
            params, micro_batch, micro_rng, model=model, deterministic=False, objective=objective
        )
        return loss_sum, weight_sum, grads

    if grad_accum_steps == 1:
        loss_sum, weight_sum, grads = micro(state.params, batch, step_rng)
    else:
        micro_batches = jax.tree.map(
            lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]), batch
        )
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry: tuple, xs: tuple) -> tuple:
            loss_acc, weight_acc, grad_acc = carry
            mb, i = xs
            loss_sum, weight_sum, grads = micro(state.params, mb, jax.random.fold_in(step_rng, i))
            return (loss_acc + loss_sum, weight_acc + weight_sum, jax.tree.map(jnp.add, grad_acc, grads)), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, weight_sum, grads), _ = jax.lax.scan(body, init, (micro_batches, jnp.arange(grad_accum_steps)))

    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(old: tuple) -> tuple:
        params, opt_state = old
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Numerics guard: a non-finite loss or gradient leaves params and optimizer state as they
    # were (the step counter still advances, so data and dropout move on); the program decides
    # from the `nonfinite` metric whether to carry on or stop.
    old = (state.params, state.opt_state)
    if cond_update:
        params, opt_state = jax.lax.cond(finite, update, lambda o: o, old)
    else:
        keep = lambda new, prev: jnp.where(finite, new, prev)  # noqa: E731
        params, opt_state = jax.tree.map(keep, update(old), old)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        "tokens": weight_sum,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(
    params: Any, batch: Batch, *, model: nn.Module, evaluate: objectives.EvalFn, **options: Any
) -> tuple[dict[str, tuple[jax.Array, jax.Array]], dict[str, jax.Array]]:
    """The objective's evaluation of one batch: named ``(sum, count)`` pairs and per-row outputs.

    ``evaluate`` is ``objectives.OBJECTIVES[name].evaluate``; ``options`` are its keyword options
    (e.g. ``num_tokens`` for seq2seq generation). Pairs are summed over batches and divided once
    (:func:`jaxlm.evaluation.reduce`); outputs go to the host-side metrics.
    """
    return evaluate(model, params, batch, **options)
