"""Ring attention over the ``sequence`` mesh axis on 4 and 8 simulated CPU devices.

Forward outputs and gradients (query, key, value and the T5 bias table) must equal the
single-device reference (``xla_attention`` on dense masks) with packed segments, a relative
position bias, causal masking and a sliding window; a GPT trained with ``mesh.sequence=4`` and
ring attention must give the losses of ``sequence=1`` (1e-5); a length the axis does not divide
is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import config_lib, logical_axes, models, sharding
from jaxlm.common_types import ConfigError
from jaxlm.nn import masks
from jaxlm.nn.attention import xla_attention
from jaxlm.nn.positions import PositionBias
from jaxlm.nn.ring import ring_attention

pytestmark = pytest.mark.all_devices  # every mesh here spans the simulated devices (conftest.py)

TOL = dict(rtol=1e-5, atol=1e-5)


def _mesh(sequence: int, data: int = 1):
    cfg = config_lib.MeshConfig(
        shape={"data": data, "fsdp": 1, "tensor": 1, "sequence": sequence},
        dcn_shape={"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1},
    )
    return sharding.make_mesh(cfg, jax.devices()[: sequence * data])


def _inputs(t: int = 16, b: int = 2, n: int = 4, kh: int = 2, h: int = 8):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(
        np.stack([np.r_[np.ones(t // 2 + 1), 2 * np.ones(t - t // 2 - 3), np.zeros(2)], np.ones(t)]), jnp.int32
    )
    pos = jnp.asarray(np.stack([np.r_[np.arange(t // 2 + 1), np.arange(t - t // 2 - 3), [0, 0]], np.arange(t)]))
    table = jnp.asarray(rng.normal(size=(32, n)), jnp.float32)
    return q, k, v, seg, pos, table


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "devices,causal,window",
    [
        (4, True, 5),
        (8, False, 0),
        pytest.param(4, True, 0, marks=SLOW),
        pytest.param(4, False, 0, marks=SLOW),
        pytest.param(8, True, 0, marks=SLOW),
        pytest.param(8, True, 5, marks=SLOW),
    ],
)
def test_ring_equals_reference_forward_and_gradients(devices, causal, window):
    q, k, v, seg, pos, table = _inputs()

    def bias(table):
        return PositionBias(table, pos, pos, kind="relative", bidirectional=not causal)

    def ring_loss(q, k, v, table):
        out = ring_attention(
            q,
            k,
            v,
            mask=masks.TokenMask(seg, seg),
            bias=bias(table),
            causal=causal,
            window=window,
            block_q=2,
            block_kv=2,
        )
        return jnp.sum(jnp.sin(out)), out

    def ref_loss(q, k, v, table):
        mask = masks.combine(masks.segment_mask(seg, seg), masks.window_mask(16, 16, window, causal=causal))
        out = xla_attention(q, k, v, mask=mask, bias=bias(table).dense(), causal=causal)
        return jnp.sum(jnp.sin(out)), out

    grad = jax.grad(ring_loss, argnums=(0, 1, 2, 3), has_aux=True)
    with jax.set_mesh(_mesh(devices)), nn.logical_axis_rules(logical_axes.DEFAULT_RULES):
        ring_grads, ring_out = jax.jit(grad)(q, k, v, table)
    ref_grads, ref_out = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, table)
    np.testing.assert_allclose(ring_out, ref_out, **TOL)
    for name, got, want in zip(("dq", "dk", "dv", "dtable"), ring_grads, ref_grads):
        np.testing.assert_allclose(got, want, err_msg=name, **TOL)


def test_ring_length_not_divisible_is_a_config_error():
    q = jnp.zeros((1, 10, 2, 8))
    with jax.set_mesh(_mesh(4)), nn.logical_axis_rules(logical_axes.DEFAULT_RULES):
        with pytest.raises(ConfigError, match="not divisible by the 4 devices") as info:
            jax.jit(lambda q: ring_attention(q, q[:, :, :1], q[:, :, :1], causal=True))(q)
    assert "\n" not in str(info.value)


def test_ring_config_validation():
    c = config_lib.base_config()
    config_lib.apply_overrides(c, {"model.attention": "ring", "mesh.shape.sequence": "4", "data.seq_len": "30"})
    with pytest.raises(ConfigError, match="multiple of the 4 sequence devices"):
        config_lib.validate(c)


def _gpt_losses(sequence: int, steps: int = 3) -> list[float]:
    cfg = config_lib.validate(config_lib.base_config()).model
    cfg = dataclasses.replace(
        cfg, vocab_size=32, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=16, mlp_dim=32, max_len=16
    )
    cfg = dataclasses.replace(cfg, attention="ring" if sequence > 1 else "xla", position="alibi")
    model = models.build(cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 1, 32)
    seg = jnp.asarray([[1] * 9 + [2] * 7, [1] * 14 + [0] * 2])
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = model.apply({"params": p}, tokens, segment_ids=seg)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
            weights = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
            return jnp.sum(ce * weights) / jnp.sum(weights)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    mesh = _mesh(sequence)
    # Replicated over the mesh from the start, as the step returns them: one compilation, not a
    # second one for the first step's uncommitted arrays.
    params, opt_state = jax.device_put((params, opt_state), sharding.replicated(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_axes.DEFAULT_RULES):
        for _ in range(steps):
            params, opt_state, value = step(params, opt_state)
            losses.append(float(value))
    return losses


@pytest.mark.slow
def test_gpt_training_with_ring_attention_on_4_sequence_devices_equals_one():
    ring, single = _gpt_losses(4), _gpt_losses(1)
    np.testing.assert_allclose(ring, single, rtol=1e-5, atol=1e-5)
    assert ring[-1] < ring[0]  # it trains
