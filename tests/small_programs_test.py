"""The tests' cheap compilation of small programs (``tests/small_programs.py``) computes what XLA's default does.

The suite's eager ops and small jitted helpers compile without XLA:CPU's MLIR fusion emitters;
every test that checks numerics then relies on that producing the same bits as the emitters do.
This checks it on the kinds of operation tests use (elementwise math with its polynomial
approximations, reductions, softmax, matmuls, random draws, scans, sorting) in float32 and
bfloat16, and that the wrapper picks programs by size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_programs
from jax._src.interpreters import pxla


def _x(dtype):
    x = jnp.concatenate([jnp.linspace(-20.0, 20.0, 4001), jax.random.normal(jax.random.key(0), (4000,)) * 3])
    return x.astype(dtype)


FUNCTIONS = {
    "tanh": jnp.tanh,
    "exp": jnp.exp,
    "log": lambda v: jnp.log(jnp.abs(v) + 1e-3),
    "log1p": lambda v: jnp.log1p(jnp.abs(v)),
    "erf": jax.scipy.special.erf,
    "sigmoid": jax.nn.sigmoid,
    "sin_cos": lambda v: jnp.sin(v) * jnp.cos(v),
    "rsqrt": lambda v: jax.lax.rsqrt(jnp.abs(v) + 1e-3),
    "pow": lambda v: (jnp.abs(v) + 1e-3) ** 0.7,
    "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
    "gelu_grad": jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True).astype(jnp.float32))),
    "one_minus_tanh_squared": lambda v: 1 - jnp.tanh(v) ** 2,
    "sum": lambda v: jnp.sum(v * 1.1),
    "softmax_rows": lambda v: jax.nn.softmax(v[:7998].reshape(93, 86), axis=-1),
    "log_softmax_rows": lambda v: jax.nn.log_softmax(v[:7998].reshape(93, 86), axis=-1),
    "matmul": lambda v: v[:7998].reshape(93, 86) @ v[:7998].reshape(86, 93),
    "cumsum": jnp.cumsum,
    "sort": jnp.sort,
    "normal_draws": lambda v: v + jax.random.normal(jax.random.key(1), v.shape, v.dtype),
    "scan": lambda v: jax.lax.scan(lambda c, y: (c * 0.9 + jnp.tanh(y), c), jnp.zeros((), v.dtype), v)[1],
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_cheap_options_compute_the_same_bits(name, dtype):
    x = _x(dtype)
    lowered = jax.jit(FUNCTIONS[name]).lower(x)
    assert small_programs.is_small(lowered.compiler_ir("stablehlo"))
    # Explicit options bypass the wrapper: XLA's default (emitters on) against the cheap options.
    default = np.asarray(lowered.compile(compiler_options={"xla_cpu_use_fusion_emitters": True})(x))
    cheap = np.asarray(lowered.compile(compiler_options=small_programs.CHEAP_OPTIONS)(x))
    np.testing.assert_array_equal(cheap, default)


def _options(fn, *args, compiler_options=None):
    """What the (wrapped) compile-option construction gives ``fn``'s program: its XLA option overrides."""
    module = jax.jit(fn).lower(*args).compiler_ir("stablehlo")
    devices = np.array(jax.devices()[:1])
    options = pxla.create_compile_options(
        module, False, [False] * len(args), [False], devices[0].client, devices, dict(compiler_options or {})
    )
    return dict(options.env_option_overrides)


def test_only_small_programs_without_options_of_their_own_get_the_cheap_options():
    assert small_programs.install()  # conftest installed it already: a second call changes nothing
    x = jnp.ones(8)
    assert _options(lambda v: v * 2, x) == small_programs.CHEAP_OPTIONS

    def large(v):
        for _ in range(small_programs.MAX_OPS // 2 + 1):
            v = jnp.sin(v) * 1.01
        return v

    assert small_programs.count_ops(jax.jit(large).lower(x).compiler_ir("stablehlo")) > small_programs.MAX_OPS
    assert _options(large, x) == {}
    assert _options(lambda v: v * 2, x, compiler_options={"xla_backend_optimization_level": 0}) == {
        "xla_backend_optimization_level": 0
    }


def test_ops_inside_loops_count():
    def loop(v):
        def body(c, _):
            for _ in range(small_programs.MAX_OPS // 2 + 1):
                c = jnp.sin(c) * 1.01
            return c, None

        return jax.lax.scan(body, v, None, length=3)[0]

    module = jax.jit(loop).lower(jnp.ones(8)).compiler_ir("stablehlo")
    assert small_programs.count_ops(module) > small_programs.MAX_OPS
