"""RoPE scaling methods against Hugging Face ``transformers`` and closed forms.

For the methods ``transformers`` implements (linear, dynamic, yarn, llama3), the inverse
frequencies and attention factor must equal those of its ``ROPE_INIT_FUNCTIONS`` for the same
settings (1e-6); ``ntk`` (static NTK-aware base change) is checked against its closed form.
transformers is imported lazily and the comparison skipped where it is not installed.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.nn.positions import RopeScaling, apply_rope, rope_frequencies, rope_inv_frequencies

HEAD_DIM, BASE = 64, 10_000.0


def _hf(method: str, factor: float, original: int, seq_len: int | None = None, **extra) -> tuple[np.ndarray, float]:
    """``(inv_freq, attention_factor)`` from transformers' RoPE init function for a Llama config."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": method, "rope_theta": BASE, "factor": factor, **extra}
    if method in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    config = transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        max_position_embeddings=original if method == "dynamic" else original * int(factor),
        rope_parameters=params,
    )
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    inv_freq, attention = ROPE_INIT_FUNCTIONS[method](config, "cpu", **kwargs)
    return inv_freq.numpy(), float(attention)


CASES = [
    ("linear", dict(factor=4.0), {}),
    ("yarn", dict(factor=4.0, original_max_len=512), {}),
    ("yarn", dict(factor=8.0, original_max_len=2048, beta_fast=16.0, beta_slow=2.0), dict(beta_fast=16, beta_slow=2)),
    ("yarn", dict(factor=4.0, original_max_len=512, attention_factor=1.3), dict(attention_factor=1.3)),
    ("llama3", dict(factor=8.0, original_max_len=8192), dict(low_freq_factor=1.0, high_freq_factor=4.0)),
    (
        "llama3",
        dict(factor=4.0, original_max_len=1024, low_freq_factor=2.0, high_freq_factor=8.0),
        dict(low_freq_factor=2.0, high_freq_factor=8.0),
    ),
]


@pytest.mark.parametrize("method,ours,theirs", CASES)
def test_static_methods_match_transformers(method, ours, theirs):
    scaling = RopeScaling(method=method, **ours)
    freqs, attention = rope_frequencies(HEAD_DIM, BASE, scaling)
    want, want_attention = _hf(method, ours["factor"], ours.get("original_max_len", 512), **theirs)
    np.testing.assert_allclose(np.asarray(freqs), want, rtol=0, atol=1e-6)
    assert abs(attention - want_attention) < 1e-6


@pytest.mark.parametrize("seq_len", [256, 512, 1000, 4096])
def test_dynamic_matches_transformers(seq_len):
    scaling = RopeScaling(method="dynamic", factor=2.0, original_max_len=512)
    freqs, attention = rope_frequencies(HEAD_DIM, BASE, scaling, seq_len=seq_len)
    want, want_attention = _hf("dynamic", 2.0, 512, seq_len=seq_len)
    np.testing.assert_allclose(np.asarray(freqs), want, rtol=1e-6, atol=1e-6)
    assert attention == want_attention == 1.0


def test_ntk_closed_form():
    factor = 4.0
    freqs, attention = rope_frequencies(HEAD_DIM, BASE, RopeScaling(method="ntk", factor=factor))
    base = BASE * factor ** (HEAD_DIM / (HEAD_DIM - 2))
    want = np.array([base ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)])
    np.testing.assert_allclose(np.asarray(freqs), want, rtol=1e-6, atol=1e-7)
    assert attention == 1.0
    # The highest frequency is kept; the lowest is divided by exactly the factor (the "NTK-aware" property).
    assert freqs[0] == 1.0
    ratio = float(freqs[-1] / rope_inv_frequencies(HEAD_DIM, BASE)[-1])
    assert ratio == pytest.approx(1 / factor, rel=1e-5)


def test_none_and_factor_one_are_plain_rope():
    plain = np.asarray(rope_inv_frequencies(HEAD_DIM, BASE))
    for method in ("none", "linear", "ntk", "llama3"):
        freqs, attention = rope_frequencies(HEAD_DIM, BASE, RopeScaling(method=method, factor=1.0, original_max_len=64))
        np.testing.assert_allclose(np.asarray(freqs), plain, rtol=1e-6, err_msg=method)
        assert attention == 1.0


def test_yarn_attention_factor_scales_logits_by_its_square():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 3, 1, 8)), jnp.float32) for _ in range(2))
    pos = jnp.arange(3)[None]
    scaling = RopeScaling(method="yarn", factor=4.0, original_max_len=64)
    _, attention = rope_frequencies(8, BASE, scaling)
    assert attention == pytest.approx(0.1 * math.log(4.0) + 1.0)
    freqs, _ = rope_frequencies(8, BASE, scaling)
    plain = jnp.einsum(
        "bqnh,bknh->bqk", apply_rope(q, pos, inv_frequencies=freqs), apply_rope(k, pos, inv_frequencies=freqs)
    )
    scaled = jnp.einsum("bqnh,bknh->bqk", apply_rope(q, pos, scaling=scaling), apply_rope(k, pos, scaling=scaling))
    np.testing.assert_allclose(scaled, plain * attention**2, rtol=1e-5)


def test_dynamic_in_apply_rope_uses_the_current_length():
    x = jnp.ones((1, 8, 1, 8))
    scaling = RopeScaling(method="dynamic", factor=2.0, original_max_len=4)
    long = apply_rope(x, jnp.arange(8)[None], scaling=scaling)
    freqs, _ = rope_frequencies(8, BASE, scaling, seq_len=8)
    np.testing.assert_allclose(long, apply_rope(x, jnp.arange(8)[None], inv_frequencies=freqs), rtol=1e-6)
    short = apply_rope(x[:, :4], jnp.arange(4)[None], scaling=scaling)  # within the original length: plain RoPE
    np.testing.assert_allclose(short, apply_rope(x[:, :4], jnp.arange(4)[None]), rtol=1e-6)
