"""Block variants shared by the Transformer models: norms, activations, biases, scan, remat,
attention implementations, position biases and logical axis names."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, logical_axes, models
from jaxlm.common_types import ConfigError
from jaxlm.models.encoder_decoder import shift_right
from jaxlm.nn import linears, normalization

BASE = config_lib.validate(config_lib.base_config()).model
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 1, 40)
KINDS = ("decoder_only", "encoder_only", "encoder_decoder")


def _cfg(kind="decoder_only", **kw):
    base = dict(kind=kind, vocab_size=40, num_layers=2, num_heads=4, embed_dim=16, mlp_dim=32, max_len=16)
    base.update(kw)
    return dataclasses.replace(BASE, **base)


def _args(kind, tokens=TOKENS):
    return (tokens, shift_right(tokens, 0)) if kind == "encoder_decoder" else (tokens,)


def _init(cfg, tokens=TOKENS):
    model = models.build(cfg)
    return model, nn.unbox(model.init(jax.random.key(0), *_args(cfg.kind, tokens))["params"])


def _apply(model, params, tokens=TOKENS):
    return model.apply({"params": params}, *_args(model.cfg.kind, tokens))


def _flat(tree):
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_scanned(tree):
    """The unrolled ``layer_i`` blocks of every stack, stacked as a scanned ``layers/block``."""
    if not isinstance(tree, dict):
        return tree
    layers = sorted((k for k in tree if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    out = {k: _to_scanned(v) for k, v in tree.items() if k not in layers}
    if layers:
        out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[k] for k in layers])}
    return out


def test_registry_matches_config_choices():
    assert set(models.MODELS) == set(config_lib.CHOICES["model.kind"])
    with pytest.raises(ConfigError, match="decoder_only, encoder_only, encoder_decoder, rnn"):
        models.build(_cfg(kind="lstm_transformer"))


def test_activations():
    assert set(config_lib.CHOICES["model.activation"]) <= set(linears.ACTIVATIONS)
    x = jnp.array([1.0])
    np.testing.assert_allclose(linears.ACTIVATIONS["gelu_exact"](x), [0.8413447], rtol=1e-6)  # x * Phi(x)
    np.testing.assert_allclose(linears.ACTIVATIONS["gelu"](x), [0.8411920], rtol=1e-6)  # tanh approximation
    assert linears.is_gated("swiglu") and linears.is_gated("geglu") and not linears.is_gated("gelu")


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_gated_mlp_shapes_and_formula(act):
    _, params = _init(_cfg(activation=act))
    mlp = params["blocks"]["layer_0"]["mlp"]
    assert set(mlp) == {"wi_0", "wi_1", "wo"}
    assert mlp["wi_0"]["kernel"].shape == mlp["wi_1"]["kernel"].shape == (16, 32)
    assert mlp["wo"]["kernel"].shape == (32, 16)
    x = jax.random.normal(jax.random.key(2), (1, 3, 16))
    y = linears.Mlp(32, act).apply({"params": mlp}, x, deterministic=True)
    gate, lin = (x @ mlp[n]["kernel"] + mlp[n]["bias"] for n in ("wi_0", "wi_1"))
    fn = jax.nn.silu if act == "swiglu" else (lambda v: jax.nn.gelu(v, approximate=True))
    np.testing.assert_allclose(y, (fn(gate) * lin) @ mlp["wo"]["kernel"] + mlp["wo"]["bias"], atol=1e-5)


def test_norms_use_config_epsilon():
    assert set(normalization.NORMS) == set(config_lib.CHOICES["model.norm"])
    x = jnp.array([[3.0, -3.0]])
    rms = normalization.make_norm("rmsnorm", epsilon=7.0)
    np.testing.assert_allclose(rms.apply(rms.init(jax.random.key(0), x), x), x / 4.0, rtol=1e-6)
    ln = normalization.make_norm("layernorm", epsilon=7.0)
    np.testing.assert_allclose(ln.apply(ln.init(jax.random.key(0), x), x), x / 4.0, rtol=1e-6)
    model, params = _init(_cfg(norm="rmsnorm"))
    assert set(params["final_norm"]) == {"scale"}
    out = _apply(model, params)
    other = _apply(models.build(_cfg(norm="rmsnorm", norm_eps=10.0)), params)
    assert not np.allclose(out, other)


def test_post_norm_blocks():
    _, pre = _init(_cfg())
    post_model, post = _init(_cfg(pre_norm=False))
    assert "final_norm" in pre and "final_norm" not in post  # post-norm stacks end normalized
    assert set(post["blocks"]["layer_0"]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    # A post-norm block's output is normalized: zero mean, unit variance (scale 1, bias 0 at init).
    _, state = post_model.apply({"params": post}, TOKENS, capture_intermediates=lambda m, _: m.name == "layer_1")
    block = state["intermediates"]["blocks"]["layer_1"]["__call__"][0]
    np.testing.assert_allclose(block.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(block.var(-1), 1.0, atol=1e-3)


def test_biases_optional():
    _, params = _init(_cfg(use_bias=False), TOKENS)
    names = _flat(params)
    assert not [k for k in names if k.endswith("bias") and "norm" not in k]
    assert "blocks/layer_0/attn_norm/bias" in names  # LayerNorm keeps its shift


@pytest.mark.parametrize(
    "kind, position",
    [("decoder_only", "learned"), ("encoder_only", "rope"), ("encoder_decoder", "relative")],
)
def test_scanned_equals_unrolled(kind, position):
    cfg = _cfg(kind, position=position, activation="geglu", num_kv_heads=2)
    model, params = _init(cfg)
    stacked = _to_scanned(params)
    want = _apply(model, params)
    scanned = models.build(dataclasses.replace(cfg, scan_layers=True))
    shapes = jax.eval_shape(lambda: scanned.init(jax.random.key(0), *_args(kind)))["params"]
    assert jax.tree.map(np.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, stacked)
    got = _apply(scanned, stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


def test_remat_gives_the_same_values_and_gradients():
    cfg = _cfg(position="rope")
    _, params = _init(cfg)

    def loss_and_grad(remat):
        model = models.build(dataclasses.replace(cfg, remat=remat))

        def loss(p):
            return jnp.sum(jnp.square(model.apply({"params": p}, TOKENS)))

        return jax.value_and_grad(loss)(params)

    want = loss_and_grad("none")
    for remat in ("full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), loss_and_grad(remat), want)


def test_attention_implementations_agree():
    cfg = _cfg("encoder_decoder", position="relative")  # self- and cross-attention
    model, params = _init(cfg)
    want = _apply(model, params)
    for impl in ("dot_product", "blockwise"):
        got = _apply(models.build(dataclasses.replace(cfg, attention=impl)), params)
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_has_logical_axes(kind):
    for scan in (False, True):
        cfg = _cfg(kind, position="relative", activation="swiglu", tie_embeddings=False, scan_layers=scan)
        model = models.build(cfg)
        boxed = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), *_args(kind)))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert len(leaf.names) == leaf.value.ndim
            assert all(n is None or n in logical_axes.PARAM_AXES for n in leaf.names), leaf.names
            # No two axes of one parameter may land on the same mesh axis.
            named = [n for n in leaf.names if n is not None]
            assert len(named) == len(set(named)), leaf.names
        if scan:
            stacked = [leaf for leaf in leaves if leaf.names[0] == logical_axes.LAYERS]
            assert stacked


def test_relative_bias_is_shared_and_directional():
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 1, 40)
    for kind, bucket, changes in (("decoder_only", 10, True), ("decoder_only", 17, False), ("encoder_only", 17, True)):
        model, params = _init(_cfg(kind, position="relative"), tokens)
        assert [k for k in _flat(params) if "relative_bias" in k] == ["blocks/relative_bias/rel_embedding"]
        table = params["blocks"]["relative_bias"]["rel_embedding"]
        bumped = jax.tree.map(lambda x: x, params)
        bumped["blocks"]["relative_bias"]["rel_embedding"] = table.at[bucket].add(1.0)
        a, b = _apply(model, params, tokens), _apply(model, bumped, tokens)
        a, b = (a["hidden"], b["hidden"]) if kind == "encoder_only" else (a, b)
        # Causal stacks use T5's unidirectional buckets: distance d < 16 is bucket d, later keys
        # bucket 0, so at length 12 bucket 10 is used and 17 is not; bidirectional stacks put
        # later keys in buckets 16 + d.
        assert (not np.allclose(a, b)) == changes, (kind, bucket)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_barrier_changes_the_compiled_backward_not_the_gradients(kind):
    grads, conditionals = {}, {}
    for setting in ("on", "off"):
        model, params = _init(_cfg(kind, grad_barrier=setting))

        def loss(p, model=model):
            out = _apply(model, p)  # encoder_only returns a dict of heads
            return sum(jnp.mean(x**2) for x in jax.tree.leaves(out))

        step = jax.jit(jax.grad(loss))
        conditionals[setting] = step.lower(params).compile().as_text().count("conditional(")
        grads[setting] = step(params)
    assert conditionals["off"] == 0 and conditionals["on"] >= 2 * 2  # one per sublayer
    for a, b in zip(jax.tree.leaves(grads["on"]), jax.tree.leaves(grads["off"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # auto: on for the CPU backend these tests run on.
    assert models.transformer.uses_grad_barrier(_cfg(kind)) == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_heads", [0, 2])  # plain and grouped-query attention
def test_fused_qkv_has_the_same_parameters_outputs_and_gradients(kind, kv_heads):
    results = {}
    for setting in ("on", "off"):
        model, params = _init(_cfg(kind, fuse_qkv=setting, num_kv_heads=kv_heads))

        def loss(p, model=model):
            return sum(jnp.mean(x**2) for x in jax.tree.leaves(_apply(model, p)))

        results[setting] = (params, _apply(model, params), jax.grad(loss)(params))
    (p_on, out_on, g_on), (p_off, out_off, g_off) = results["on"], results["off"]
    assert jax.tree.structure(p_on) == jax.tree.structure(p_off)
    for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves((out_on, g_on)), jax.tree.leaves((out_off, g_off))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_dense_rejects_layers_it_cannot_concatenate():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            heads = linears.DenseGeneral((4, 2), ("embed", "heads", "head_dim"))
            flat = linears.DenseGeneral((3,), ("embed", "mlp"))
            return linears.fused_dense([heads, flat], x)

    with pytest.raises(ValueError, match="differ only in their first axis"):
        Mixed().init(jax.random.key(0), jnp.ones((2, 3, 8)))
