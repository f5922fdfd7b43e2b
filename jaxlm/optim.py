"""The optimizer: AdamW with warmup + decay, global-norm clipping and masked weight decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from jaxlm import param_paths
from jaxlm.config_lib import OptimConfig

# Weight decay applies to every parameter of two or more dimensions: the dense kernels and the
# token, position and token-type embedding tables alike (as nanoGPT and GPT-2 do). Biases and
# norm scales (leaves named below, or any 1-D leaf) are not decayed unless
# config.optim.decay_norms_and_biases is set.
NO_DECAY_NAMES = ("bias", "scale", "magnitude")  # magnitude: DoRA's column norms (jaxlm/peft.py)


DECAYS: dict[str, Callable[[float, float, int], optax.Schedule]] = {
    "cosine": lambda lr, ratio, steps: optax.cosine_decay_schedule(lr, steps, alpha=ratio),
    "linear": lambda lr, ratio, steps: optax.linear_schedule(lr, lr * ratio, steps),
    "constant": lambda lr, ratio, steps: optax.constant_schedule(lr),
}


def learning_rate_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio``, or constant."""
    if cfg.schedule not in DECAYS:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(DECAYS)}")
    warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
    decay = DECAYS[cfg.schedule](cfg.lr, cfg.min_lr_ratio, max(num_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def weight_decay_mask(params: Any, decay_norms_and_biases: bool = False) -> Any:
    """True for the parameters weight decay applies to: every leaf of >= 2 dims (kernels and embedding tables).

    Biases and norm scales are left out unless ``decay_norms_and_biases``.
    """

    def decide(path: str, leaf: Any) -> bool:
        if decay_norms_and_biases:
            return True
        return path.rsplit("/", 1)[-1] not in NO_DECAY_NAMES and getattr(leaf, "ndim", 0) >= 2

    return param_paths.map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    """AdamW as configured, with clipping first (on the raw global gradient)."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg, num_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: weight_decay_mask(p, cfg.decay_norms_and_biases),
        )
    )
    return optax.chain(*parts)
