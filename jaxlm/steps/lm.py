"""Language-model train and eval steps.

Batches hold ``inputs``, ``targets`` and ``weights`` of shape ``[B, T]`` (optionally
``positions`` and ``segment_ids`` for packed sequences).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm import losses
from jaxlm.train_state import TrainState

Batch = dict[str, jax.Array]


def _model_kwargs(batch: Batch) -> dict[str, Any]:
    return {k: batch[k] for k in ("positions", "segment_ids") if k in batch}


def loss_fn(params: Any, batch: Batch, rng: jax.Array | None, *, model: nn.Module, deterministic: bool) -> tuple:
    """Summed token loss and the summed weight (the mean is their ratio)."""
    rngs = {"dropout": rng} if rng is not None else {}
    logits = model.apply(
        {"params": params}, batch["inputs"], deterministic=deterministic, rngs=rngs, **_model_kwargs(batch)
    )
    return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch; returns the new state and metrics.

    With ``grad_accum_steps > 1`` the batch is split into that many micro-batches whose
    gradient sums are accumulated with ``lax.scan`` before one update, so a large global
    batch fits in memory. The loss is normalized by the total token weight of the whole
    batch, so the result equals the single-pass gradient.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(params: Any, micro_batch: Batch, micro_rng: jax.Array) -> tuple:
        (loss_sum, weight_sum), grads = grad_fn(params, micro_batch, micro_rng, model=model, deterministic=False)
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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(state.params),
        "tokens": weight_sum,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
    """Summed loss and weight of a batch (average over many batches, then exponentiate)."""
    loss_sum, weight_sum = loss_fn(params, batch, None, model=model, deterministic=True)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum}
