"""One matmul for every layer: ``dtype`` operands, float32 accumulation, and a backward that stays in ``dtype``.

``einsum(spec, x, y, dtype)`` computes ``jnp.einsum(spec, x.astype(dtype), y.astype(dtype),
preferred_element_type=float32)``. Its gradient is written by hand because autodiff of that
expression pairs the float32 output gradient with the (upcast) ``dtype`` operand, so with
``dtype=bfloat16`` both backward matmuls, two thirds of a step's FLOPs, would run as float32 x
float32. Here the output gradient is cast to ``dtype`` first and both backward matmuls again take
``dtype`` operands with float32 accumulation, which is what mixed-precision training does on every
accelerator (PyTorch autocast, MaxText). Gradients come back in each operand's own dtype (float32
for float32 parameters). With ``dtype=float32`` the result equals autodiff's up to summation order.

The residuals are the ``dtype`` copies of the operands, so a bf16 model also keeps half the
activation memory for its backward pass.

Operand dtype by CPU (``model.matmul_dtype``, :func:`set_operand_setting`): ``auto`` (the
default) keeps a bfloat16 request where the hardware multiplies bf16 natively (GPU, TPU, CPUs
with ``avx512_bf16`` or AMX) and turns it into float32 operands on CPUs without bf16 dot
instructions (AVX2, plain AVX-512), where XLA:CPU's bf16 matmuls run at ~0.7x its float32 ones
(bench/README.md); activations stay bf16 between the matmuls. ``compute`` always uses the
requested dtype, ``float32`` always float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import hardware

F32 = jnp.float32
OPERAND_SETTINGS = ("auto", "compute", "float32")


def _parse(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    for operand in (a, b):
        # Each operand index must reach the output or the other operand, or its gradient would
        # need a broadcast this rule does not write.
        missing = set(operand) - set(out) - set(a if operand is b else b)
        if missing or len(set(operand)) != len(operand):
            raise ValueError(f"einsum spec {spec!r} is not supported by jaxlm.nn.matmul.einsum")
    return a, b, out


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum(spec: str, x: jnp.ndarray, y: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=F32)


def _einsum_fwd(spec: str, x: jnp.ndarray, y: jnp.ndarray, dtype: Any):
    xc, yc = x.astype(dtype), y.astype(dtype)
    out = jnp.einsum(spec, xc, yc, preferred_element_type=F32)
    # The original dtypes travel as zero-size arrays: custom_vjp residuals must be JAX types.
    return out, (xc, yc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), y.dtype))


def _einsum_bwd(spec: str, dtype: Any, residuals, g: jnp.ndarray):
    xc, yc, x_like, y_like = residuals
    a, b, out = _parse(spec)
    gc = g.astype(dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", gc, yc, preferred_element_type=F32)
    # XLA:CPU's matmul wants the contracted axes of its first operand innermost, so the first
    # operand of a weight gradient (contracted over batch and length) is copied transposed. In
    # float32, put the smaller of the two first: for an MLP's output layer that transposes the
    # [B*T, D] gradient instead of the 4x larger [B*T, F] activation (baby GPT: 858 -> 819 ms
    # per step). The barrier keeps XLA from folding the final transpose back into the matmul. bf16
    # copies are half as large, and there the reordering measured 3-5% slower, so it is left out.
    batched = any(i in a and i in b for i in out)
    if gc.dtype == F32 and gc.size < xc.size and not batched:
        free = "".join(i for i in out if i in b)
        rest = "".join(i for i in b if i not in free)
        dy_t = jnp.einsum(f"{out},{a}->{free}{rest}", gc, xc, preferred_element_type=F32)
        dy_t = jax.lax.optimization_barrier(dy_t)
        dy = jnp.einsum(f"{free}{rest}->{b}", dy_t)
    else:
        dy = jnp.einsum(f"{a},{out}->{b}", xc, gc, preferred_element_type=F32)
    return dx.astype(x_like.dtype), dy.astype(y_like.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, x: jnp.ndarray, y: jnp.ndarray, dtype: Any = F32) -> jnp.ndarray:
    """Two-operand einsum with ``dtype`` operands; returns float32 (see the module docstring).

    ``spec`` is explicit (``"btd,dh->bth"``), every index appears once per operand, and each
    operand's indices appear in the output or in the other operand.
    """
    _parse(spec)
    return _einsum(spec, x, y, hardware.matmul_operand_dtype(_operand_setting, dtype))


# ``model.matmul_dtype``: which operand dtype a ``dtype`` request becomes (hardware.matmul_operand_dtype).
# One setting per process, like the compiled programs it shapes: the entry point sets it from the
# config (jaxlm.main.experiment.build) before anything is traced; ``operand_setting`` scopes it.
_operand_setting = "auto"


def set_operand_setting(setting: str) -> None:
    """Set ``model.matmul_dtype`` (``auto``, ``compute`` or ``float32``) for the matmuls traced from now on."""
    global _operand_setting
    if setting not in OPERAND_SETTINGS:
        raise ValueError(f"matmul operand setting {setting!r} is not one of: {', '.join(OPERAND_SETTINGS)}")
    _operand_setting = setting


@contextlib.contextmanager
def operand_setting(setting: str) -> Iterator[None]:
    """Trace the matmuls inside the ``with`` block under ``setting`` (see :func:`set_operand_setting`)."""
    previous = _operand_setting
    set_operand_setting(setting)
    try:
        yield
    finally:
        set_operand_setting(previous)
