"""A fusion barrier for backward passes: the gradient of the residual stream is materialised once.

Through a pre-norm stack the residual-stream gradient is a chain of additions,
``g_l = g_{l+1} + (gradient through block l)``. XLA:CPU fuses cheap elementwise producers into
every consumer, duplicating them; here it recomputes each ``g_l`` from all the later blocks'
terms inside each of its consumers (fusions with 100+ operands), so the backward pass reads
memory quadratically in depth: a fifth of a 6-layer step at 384 wide.
``jax.lax.optimization_barrier`` does not help (XLA:CPU expands it before fusion).

:func:`materialize_grad` is the identity forward; backward it passes the gradient through a
``lax.cond`` that is the identity for every gradient whose first element is not NaN. A
conditional is never fused, so its output is a buffer that every consumer reads, which bounds
the recomputation to one block. ``model.grad_barrier`` selects it: ``auto`` (the default) is
on for the CPU backend only: the recomputation was found and measured on XLA:CPU, on an H100 it
changed nothing beyond noise (bench/README.md), and a GPU conditional can cost a device-to-host
copy of its predicate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def materialize_grad(x: jnp.ndarray) -> jnp.ndarray:
    """Identity; its gradient is computed once into a buffer instead of fused into consumers."""
    return x


def _fwd(x: jnp.ndarray) -> tuple[jnp.ndarray, None]:
    return x, None


def _bwd(_: None, g: jnp.ndarray) -> tuple[jnp.ndarray]:
    # The predicate is false only when g's first element is NaN (XLA cannot fold x == x); the
    # second branch then returns all NaN, so a non-finite gradient stays non-finite (the train
    # step's guard sees it). Identical branches would be simplified away.
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda v: v, lambda v: jnp.full_like(v, jnp.nan), g),)


materialize_grad.defvjp(_fwd, _bwd)
