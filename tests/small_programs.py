"""Tests compile their small programs (eager ops, jnp helpers) without XLA:CPU's MLIR fusion emitters.

Test code calls models and references outside ``jit``: every primitive it dispatches is its own
program (``jit(multiply)``, ``jit(_einsum)``...), some 6,000 per suite, each ~25-30 ms to compile
whatever the array size. XLA:CPU's older elemental emitters compile such a program about 1.5x
faster (300 shapes x 4 eager ops, 2-core AMX Xeon: 41.8 s with the fusion emitters, 27.4 s
without) and compute the same bits (``tests/small_programs_test.py`` checks it on elementwise math,
reductions, matmuls, random draws and scans, float32 and bfloat16). Large programs (train steps)
keep XLA's default, since the fusion emitters compile those faster and they are what users run;
:data:`MAX_OPS` separates the two. Optimization level 0, which would compile small programs
faster still (17.0 s above), is not used: it changes results (denormals, GELU's tails).

Installed by ``tests/conftest.py`` in every test process (not in the ``jaxlm`` subprocesses tests
start: those run the library as users do). It wraps JAX's private ``pxla.create_compile_options``;
if a JAX release renames it, nothing is wrapped and the tests compile as before, only slower.
"""

from __future__ import annotations

from typing import Any

# At most this many operations (nested regions included) make a program small. An eager op is
# 1-5 (the op, converts, return); jnp helpers such as einsum, where or take up to ~25; tests'
# jitted losses of one attention layer a few hundred; a tiny GPT's eval step ~1,200, its train step ~4,400.
MAX_OPS = 1000

CHEAP_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def count_ops(module: Any, limit: int = MAX_OPS) -> int:
    """The number of operations in an MLIR module, counting into nested regions; stops above ``limit``."""
    count = 0
    stack = list(module.body.operations)
    while stack:
        op = stack.pop()
        for region in op.regions:
            for block in region.blocks:
                count += len(block.operations)
                if count > limit:
                    return count
                stack.extend(block.operations)
    return count


def is_small(module: Any) -> bool:
    """At most MAX_OPS operations."""
    return count_ops(module) <= MAX_OPS


def install() -> bool:
    """Wrap JAX's compile-option construction so that CPU programs of at most MAX_OPS ops get CHEAP_OPTIONS."""
    try:
        from jax._src.interpreters import pxla
    except ImportError:
        return False
    original = getattr(pxla, "create_compile_options", None)
    if original is None:
        return False
    if getattr(original, "_jaxlm_small_programs", False):  # installed already
        return True

    def create_compile_options(computation, tuple_args, allow_in, allow_out, backend, np_dev, compiler_options):
        if backend.platform == "cpu" and not compiler_options and is_small(computation):
            compiler_options = dict(CHEAP_OPTIONS)
        return original(computation, tuple_args, allow_in, allow_out, backend, np_dev, compiler_options)

    create_compile_options._jaxlm_small_programs = True
    pxla.create_compile_options = create_compile_options
    return True
