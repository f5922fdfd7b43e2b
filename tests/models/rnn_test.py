"""LSTM / GRU language models: PyTorch parity, causality, state resets, cached decoding, scan, remat."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, decoding, models
from jaxlm.main.generate import init_cache, make_step_fn
from jaxlm.models import config as model_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 1, 40)


def _cfg(**kw):
    cfg = config_lib.validate(config_lib.base_config()).model
    base = dict(kind="rnn", vocab_size=40, num_layers=2, embed_dim=16, mlp_dim=16, max_len=16, position="none")
    base.update(kw)
    return dataclasses.replace(cfg, **base)


def _init(cfg, tokens=TOKENS):
    model = models.build(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    return model, params, jax.jit(lambda p, t, s=None: model.apply({"params": p}, t, segment_ids=s))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_pytorch(cell):
    torch = pytest.importorskip("torch")
    cfg = _cfg(rnn_cell=cell, mlp_dim=24, tie_embeddings=False)
    _, params, forward = _init(cfg)
    gates = {"lstm": 4, "gru": 3}[cell]
    assert params["layer_0"]["kernel"].shape == (16, gates * 24)
    assert params["layer_1"]["recurrent_kernel"].shape == (24, gates * 24)
    rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(16, 24, num_layers=2, batch_first=True)
    with torch.no_grad():
        for i in range(2):
            p = {k: torch.tensor(np.asarray(v)) for k, v in params[f"layer_{i}"].items()}
            getattr(rnn, f"weight_ih_l{i}").copy_(p["kernel"].T)
            getattr(rnn, f"weight_hh_l{i}").copy_(p["recurrent_kernel"].T)
            getattr(rnn, f"bias_ih_l{i}").copy_(p["bias"])
            getattr(rnn, f"bias_hh_l{i}").copy_(p["recurrent_bias"])
        x = torch.tensor(np.asarray(params["token_embed"]["embedding"])[np.asarray(TOKENS)])
        hidden = rnn(x)[0].numpy()
    head = params["lm_head"]
    np.testing.assert_allclose(forward(params, TOKENS), hidden @ head["kernel"] + head["bias"], atol=2e-5)


def test_tied_only_when_sizes_match():
    _, params, forward = _init(_cfg())
    assert "lm_head" not in params
    assert forward(params, TOKENS).shape == (2, 8, 40)
    untied = models.build(_cfg(mlp_dim=24))  # tie_embeddings=True, but H != D
    shapes = jax.eval_shape(lambda: untied.init(jax.random.key(0), TOKENS))["params"]
    assert shapes["lm_head"]["kernel"].value.shape == (24, 40)


def test_causal_and_resets_at_segment_starts():
    _, params, forward = _init(_cfg(rnn_cell="gru"))
    a = forward(params, TOKENS)
    b = forward(params, TOKENS.at[:, 5:].set(1))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8])
    packed = forward(params, TOKENS, segments)
    alone = forward(params, TOKENS[:, 3:])
    np.testing.assert_allclose(packed[0, 3:], alone[0], atol=1e-6)
    np.testing.assert_allclose(packed[1], a[1], atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cached_decoding_matches_full_forward(cell):
    cfg = _cfg(rnn_cell=cell, num_layers=3, scan_layers=True)
    model, params, forward = _init(cfg)
    assert set(params) == {"token_embed", "layer_0", "layers"}
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 1, 40)
    full = forward(params, tokens)
    step = jax.jit(make_step_fn(model, params))
    cache = init_cache(model, 2, cfg.max_len)
    logits, cache = step(cache, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)))
    outs = [logits]
    for i in range(5, 12):
        logits, cache = step(cache, tokens[:, i : i + 1], jnp.full((2, 1), i))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    if cell == "lstm":  # jaxlm.decoding.generate drives the same step
        sharp = jax.tree.map(lambda x: 3.0 * x, params)
        prompt = tokens[:, :4]
        got = decoding.generate(
            make_step_fn(model, sharp),
            init_cache(model, 2, 16),
            prompt,
            jax.random.key(0),
            max_new_tokens=6,
            temperature=0,
        )
        want = decoding.generate_uncached(lambda t: model.apply({"params": sharp}, t), prompt, max_new_tokens=6)
        np.testing.assert_array_equal(got, want)


def test_scanned_equals_unrolled_with_and_without_remat():
    cfg = _cfg(num_layers=3)
    _, params, forward = _init(cfg)
    stacked = {
        "token_embed": params["token_embed"],
        "layer_0": params["layer_0"],
        "layers": {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), params["layer_1"], params["layer_2"])},
    }
    for remat in ("none", "full"):
        scanned = models.build(dataclasses.replace(cfg, scan_layers=True, remat=remat))
        np.testing.assert_allclose(
            jax.jit(scanned.apply)({"params": stacked}, TOKENS), forward(params, TOKENS), atol=1e-5
        )


def test_flops_per_token_by_hand():
    cfg = _cfg(num_layers=3, embed_dim=16, mlp_dim=24)  # LSTM: G=4, D=16, H=24, V=40
    n = 4 * 24 * (16 + 24) + 2 * 4 * 24 * 48 + 24 * 40
    assert n == 14016
    assert model_config.matmul_params(cfg) == n
    assert model_config.flops_per_token(cfg, 8) == model_config.flops_per_token(cfg, 1024) == 6 * n
    gru = dataclasses.replace(cfg, rnn_cell="gru")
    assert model_config.matmul_params(gru) == 3 * 24 * (16 + 24) + 2 * 3 * 24 * 48 + 24 * 40


def test_rnn_config_builds():
    for size in ("tiny", "small", "base"):
        c = config_lib.load_config_file(os.path.join(REPO, "configs", "rnn.py") + f":size={size}")
        cfg = config_lib.validate(c).model
        assert cfg.kind == "rnn" and c.data.objective == "causal_lm"
    assert (cfg.num_layers, cfg.embed_dim, cfg.mlp_dim, cfg.rnn_cell) == (2, 1024, 1024, "lstm")
    model = models.build(cfg, vocab_size=256)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), TOKENS))["params"]
    assert set(shapes) == {"token_embed", "layer_0", "layer_1"}  # tied: H == D
