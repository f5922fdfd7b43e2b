"""jaxlm.nn.matmul.einsum: values and gradients against float64 NumPy, and the backward's dtypes."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import hardware
from jaxlm.nn import matmul

SPECS = {
    "dense": ("btd,dh->bth", (2, 5, 8), (8, 6)),
    "dense_heads": ("btd,dnh->btnh", (2, 5, 8), (8, 3, 4)),
    "dense_out": ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 8)),
    "logits": ("btkgh,bskh->bkgts", (2, 5, 2, 3, 4), (2, 7, 2, 4)),
    "values": ("bkgts,bskh->btkgh", (2, 2, 3, 5, 7), (2, 7, 2, 4)),
    "attend": ("btd,vd->btv", (2, 5, 8), (11, 8)),
}


def _operands(xs, ys, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(xs), rng.standard_normal(ys), rng.standard_normal


def _reference(spec, x, y, g):
    """Output and the gradients of sum(out * g), by float64 NumPy."""
    a, b, out = matmul._parse(spec)
    return (
        np.einsum(spec, x, y),
        np.einsum(f"{out},{b}->{a}", g, y),
        np.einsum(f"{a},{out}->{b}", x, g),
    )


@pytest.mark.parametrize("name", SPECS)
def test_float32_matches_float64_reference_and_autodiff(name):
    spec, xs, ys = SPECS[name]
    x, y, normal = _operands(xs, ys)
    out_ref = np.einsum(spec, x, y)
    g = normal(out_ref.shape)
    ref = _reference(spec, x, y, g)
    x32, y32, g32 = (jnp.asarray(v, jnp.float32) for v in (x, y, g))
    out, vjp = jax.vjp(lambda a, b: matmul.einsum(spec, a, b), x32, y32)
    dx, dy = vjp(g32)
    for got, want in zip((out, dx, dy), ref):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    # Same as autodiff of the plain einsum.
    _, plain = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x32, y32)
    for got, want in zip((dx, dy), plain(g32)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _dots(jaxpr):
    """Every dot_general equation in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_dots(sub))
    return found


@pytest.mark.parametrize("name", ["dense", "logits", "attend"])
def test_bfloat16_backward_matmuls_take_bfloat16_operands_and_accumulate_in_float32(name):
    spec, xs, ys = SPECS[name]
    x, y, normal = _operands(xs, ys, seed=1)
    g = normal(np.einsum(spec, x, y).shape)
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss(a, b):
        return jnp.sum(matmul.einsum(spec, a, b, jnp.bfloat16) * jnp.asarray(g, jnp.float32))

    with matmul.operand_setting("compute"):  # bf16 operands on any CPU (auto upcasts them on AVX2)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x32, y32).jaxpr
        dx, dy = jax.grad(loss, argnums=(0, 1))(x32, y32)
    dots = _dots(jaxpr)
    assert len(dots) == 3  # forward, and one per operand
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert eqn.outvars[0].aval.dtype == jnp.float32
    assert dx.dtype == dy.dtype == jnp.float32  # gradients in the operands' own dtype
    # Against float64 on the bf16-rounded operands: only the rounding of g to bf16 remains.
    bf = lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)  # noqa: E731
    _, dx_ref, dy_ref = _reference(spec, bf(x), bf(y), bf(g))
    for got, want in zip((dx, dy), (dx_ref, dy_ref)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_autodiff_of_the_plain_bf16_einsum_runs_backward_in_float32():
    # Why the custom rule exists: without it the backward matmuls see float32 operands.
    x, y = jnp.ones((4, 8)), jnp.ones((8, 3))

    def loss(a, b):
        return jnp.sum(
            jnp.einsum("td,dh->th", a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        )

    dots = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, y).jaxpr)
    assert any(jnp.float32 in [v.aval.dtype for v in eqn.invars] for eqn in dots[1:])


def test_works_under_remat_and_jit_and_gives_the_same_gradients():
    spec, xs, ys = SPECS["dense"]
    x, y, _ = _operands(xs, ys, seed=2)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def f(a, b):
        return jnp.sum(jnp.tanh(matmul.einsum(spec, a, b)) ** 2)

    want = jax.grad(f, argnums=(0, 1))(x, y)
    for policy in (None, jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims):
        got = jax.jit(jax.grad(jax.checkpoint(f, policy=policy), argnums=(0, 1)))(x, y)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", ["btd,dh", "btd,dh->bt", "bdd,dh->bh", "btd,dh->btdh x"])
def test_unsupported_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        matmul.einsum(spec, jnp.ones((2, 3, 4)), jnp.ones((4, 5)))


def test_operand_setting_picks_the_operand_dtype_by_cpu(monkeypatch):
    x, y = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16)

    def operand_dtypes():
        loss = lambda a, b: jnp.sum(matmul.einsum("td,dh->th", a, b, jnp.bfloat16))  # noqa: E731
        dots = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, y).jaxpr)
        return {v.aval.dtype for eqn in dots for v in eqn.invars}

    avx2 = hardware.parse_cpuinfo("flags : avx avx2 fma", 2)
    zen5 = hardware.parse_cpuinfo("flags : avx avx2 fma avx512f avx512_bf16", 2)
    for cpu, auto in ((avx2, jnp.float32), (zen5, jnp.bfloat16)):
        monkeypatch.setattr(hardware, "cpu_info", lambda cpu=cpu: cpu)
        for setting, expected in (("auto", auto), ("compute", jnp.bfloat16), ("float32", jnp.float32)):
            with matmul.operand_setting(setting):
                assert operand_dtypes() == {jnp.dtype(expected)}, (cpu.isa, setting)
    with pytest.raises(ValueError, match="not one of"):
        matmul.set_operand_setting("bf16")
