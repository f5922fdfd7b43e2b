"""Activations with a hand-written derivative, computed in float32 whatever the input dtype.

Each function here is ``f(x)`` evaluated in float32 and rounded once to ``x``'s dtype, with a
``custom_vjp`` whose backward is ``g * f'(x)`` from the saved input alone, in one expression.
Autodiff of ``flax.linen.gelu`` on bfloat16 differentiates every intermediate of the tanh
formula in bfloat16; XLA:CPU then recomputed the tanh and its converts inside each consumer of
the MLP's hidden gradient (the two backward matmuls and the bias gradient). With these, the MLP's
element-wise work in a bf16 ``baby`` step went from ~89 ms to ~35 ms of op time and the step
from ~440 to ~405 ms; float32 is unchanged within noise (bench/README.md). Values agree with
``flax.linen`` to float32 rounding (tests/nn/activations_test.py).

Only reverse mode is defined (``jax.custom_vjp``): ``jax.jvp`` through these is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Fn = Callable[[jnp.ndarray], jnp.ndarray]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


def with_derivative(value: Fn, derivative: Fn, name: str) -> Fn:
    """The activation ``value`` with backward ``g * derivative(x)``, both evaluated in float32."""

    @jax.custom_vjp
    def act(x: jnp.ndarray) -> jnp.ndarray:
        return value(x.astype(jnp.float32)).astype(x.dtype)

    def fwd(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return act(x), x

    def bwd(x: jnp.ndarray, g: jnp.ndarray) -> tuple[jnp.ndarray]:
        return ((g.astype(jnp.float32) * derivative(x.astype(jnp.float32))).astype(x.dtype),)

    act.defvjp(fwd, bwd)
    act.__name__ = act.__qualname__ = name
    return act


def _tanh_arg(x: jnp.ndarray) -> jnp.ndarray:
    return _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)


def _gelu_tanh(x: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * x * (1.0 + jnp.tanh(_tanh_arg(x)))


def _gelu_tanh_grad(x: jnp.ndarray) -> jnp.ndarray:
    t = jnp.tanh(_tanh_arg(x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)


def _gelu_exact(x: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT_2))


def _gelu_exact_grad(x: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * (1.0 + jax.lax.erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


def _silu(x: jnp.ndarray) -> jnp.ndarray:
    return x * jax.nn.sigmoid(x)


def _silu_grad(x: jnp.ndarray) -> jnp.ndarray:
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


gelu_tanh: Fn = with_derivative(_gelu_tanh, _gelu_tanh_grad, "gelu_tanh")
gelu_tanh.__doc__ = "GELU, tanh approximation (GPT-2's ``gelu_new``, T5 v1.1's gated-gelu)."
gelu_exact: Fn = with_derivative(_gelu_exact, _gelu_exact_grad, "gelu_exact")
gelu_exact.__doc__ = "GELU with the exact erf (BERT's ``gelu``)."
silu: Fn = with_derivative(_silu, _silu_grad, "silu")
silu.__doc__ = "SiLU / swish, ``x * sigmoid(x)`` (the gate of SwiGLU)."
