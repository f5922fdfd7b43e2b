"""The training state: a plain pytree of arrays (no functions), so it jits, shards and saves."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters and optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> TrainState:
        """A fresh state at step 0."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
