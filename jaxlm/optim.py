"""The optimizer: AdamW with warmup + decay, global-norm clipping and masked weight decay."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import param_paths
from jaxlm.config_lib import OptimConfig

# Weight decay applies to every parameter of two or more dimensions: the dense kernels and the
# token, position and token-type embedding tables alike (as nanoGPT and GPT-2 do). Biases and
# norm scales (leaves named below, or any 1-D leaf) are not decayed unless
# config.optim.decay_norms_and_biases is set.
NO_DECAY_NAMES = ("bias", "scale", "magnitude")  # magnitude: DoRA's column norms (jaxlm/peft.py)


DECAYS = ("cosine", "linear", "constant")

# The optimizer's numbers that a compiled train step takes as inputs instead of constants
# (:func:`hyperparameters`): changing them (an lr sweep, more steps, another warmup or clip) leaves
# the program unchanged, so the persistent compilation cache serves it. The Adam betas and eps
# stay compile-time constants: optax computes ``1 - b1`` inside the step, which in float32 would
# round differently from the Python-double constant every run used so far.
Hyper = dict[str, Any]
HYPER_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "decay_steps", "weight_decay", "clip_norm")


def hyperparameters(cfg: OptimConfig, num_steps: int) -> dict[str, np.float32]:
    """The numbers of ``cfg`` a train step takes as inputs, as float32 scalars (see ``HYPER_KEYS``).

    ``warmup_steps`` is capped below ``num_steps``; ``decay_steps`` is what follows it (at least 1).
    """
    warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
    values = {
        "lr": cfg.lr,
        "min_lr_ratio": cfg.min_lr_ratio,
        "warmup_steps": warmup,
        "decay_steps": max(num_steps - warmup, 1),
        "weight_decay": cfg.weight_decay,
        "clip_norm": cfg.clip_norm,
    }
    return {k: np.float32(values[k]) for k in HYPER_KEYS}


def learning_rate_schedule(cfg: OptimConfig, num_steps: int, hyper: Hyper | None = None) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio``, or constant.

    ``hyper`` (:func:`hyperparameters`, possibly traced) gives the numbers; by default those of
    ``cfg`` and ``num_steps``, as constants. Written with ``jnp`` rather than optax's schedules,
    whose step counts must be Python numbers; the formulas are optax's ``linear_schedule``,
    ``cosine_decay_schedule`` and ``join_schedules``.
    """
    if cfg.schedule not in DECAYS:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(DECAYS)}")
    h = hyperparameters(cfg, num_steps) if hyper is None else hyper
    lr, ratio, warmup, decay_steps = h["lr"], h["min_lr_ratio"], h["warmup_steps"], h["decay_steps"]

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warm = lr * count / jnp.maximum(warmup, 1.0)
        if cfg.schedule == "constant":
            decayed = lr * jnp.ones_like(count)
        else:
            t = jnp.clip(count - warmup, 0.0, decay_steps) / decay_steps
            fraction = 0.5 * (1.0 + jnp.cos(jnp.pi * t)) if cfg.schedule == "cosine" else 1.0 - t
            decayed = lr * ((1.0 - ratio) * fraction + ratio)
        return jnp.where(count < warmup, warm, decayed)

    return schedule


def weight_decay_mask(params: Any, decay_norms_and_biases: bool = False) -> Any:
    """True for the parameters weight decay applies to: every leaf of >= 2 dims (kernels and embedding tables).

    Biases and norm scales are left out unless ``decay_norms_and_biases``.
    """

    def decide(path: str, leaf: Any) -> bool:
        if decay_norms_and_biases:
            return True
        return path.rsplit("/", 1)[-1] not in NO_DECAY_NAMES and getattr(leaf, "ndim", 0) >= 2

    return param_paths.map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig, num_steps: int, hyper: Hyper | None = None) -> optax.GradientTransformation:
    """AdamW as configured, with clipping first (on the raw global gradient).

    ``hyper`` (:func:`hyperparameters`, traced inside a train step) gives the learning-rate
    schedule, weight decay and clipping norm; by default ``cfg``'s, as constants. Whether there is
    clipping or weight decay at all follows ``cfg`` (it shapes the optimizer state or the program).
    """
    h = hyperparameters(cfg, num_steps) if hyper is None else hyper
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(h["clip_norm"]))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg, num_steps, h),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=h["weight_decay"] if cfg.weight_decay else 0.0,
            mask=lambda p: weight_decay_mask(p, cfg.decay_norms_and_biases),
        )
    )
    return optax.chain(*parts)
