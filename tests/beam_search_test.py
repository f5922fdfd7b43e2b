"""Beam search: exhaustive search on a tiny vocabulary for every generative model family, and
the same beams as ``transformers``' ``generate(num_beams=...)`` on converted GPT-2 and T5."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import beam_search, config_lib, models
from jaxlm.main.generate import init_cache, make_seq2seq_step_fn, make_step_fn

VOCAB, EOS, PAD = 5, 1, 0


def _tiny(kind, **fields):
    base = config_lib.validate(config_lib.base_config()).model
    extra = {"rnn_cell": "lstm"} if kind == "rnn" else {}
    cfg = dataclasses.replace(
        base,
        kind=kind,
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=2,
        embed_dim=16,
        mlp_dim=32,
        max_len=16,
        **extra,
        **fields,
    )
    return cfg, models.build(cfg)


def _adapters(kind, model, params, prompt, beam):
    """(step_fn, init_cache, decoder prompt, full-forward log-prob function) for one model kind."""
    max_len = 16
    if kind != "encoder_decoder":

        def forward(seqs):  # [R, P + N] -> logits
            return model.apply({"params": params}, seqs)

        return make_step_fn(model, params), lambda r: init_cache(model, r, max_len), prompt, forward
    inputs = prompt  # drawn from 2..V-1: no pad id (0) among the encoder tokens
    # Jitted: op by op the encoder and the full forward compile ~100 one-op programs that no other
    # case of this file shares (the decoder-only cases share theirs, so they stay eager).
    encoded = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, inputs)
    step = make_seq2seq_step_fn(model, params, jnp.repeat(encoded, beam, axis=0), jnp.repeat(inputs, beam, axis=0))
    s = inputs.shape[1]
    start = jnp.zeros((prompt.shape[0], 1), jnp.int32)

    @jax.jit
    def forward_seq2seq(seqs):
        rows = seqs.shape[0] // inputs.shape[0]
        return model.apply({"params": params}, jnp.repeat(inputs, rows, axis=0), seqs)

    return step, lambda r: init_cache(model, r, max_len, jnp.zeros((r, s), jnp.int32)), start, forward_seq2seq


def _all_outputs(n):
    """Every output of at most ``n`` tokens: EOS ends one early; otherwise it runs ``n`` tokens."""
    out = []
    for length in range(1, n + 1):
        for body in itertools.product([t for t in range(VOCAB) if t != EOS], repeat=length - 1):
            out.append((*body, EOS))
            if length == n:
                out.extend((*body, t) for t in range(VOCAB) if t != EOS)
    return out


def _exhaustive(forward, start, n, alpha):
    """All outputs of every batch row ranked by sum log p / len ** alpha, from full forward passes."""
    outputs = _all_outputs(n)
    b, p = start.shape
    padded = np.full((len(outputs), n), PAD, np.int32)
    for i, o in enumerate(outputs):
        padded[i, : len(o)] = o
    seqs = np.concatenate([np.repeat(np.asarray(start), len(outputs), axis=0), np.tile(padded, (b, 1))], axis=1)
    logp = np.asarray(jax.nn.log_softmax(forward(jnp.asarray(seqs)), axis=-1))
    ranked = []
    for row in range(b):
        scored = []
        for i, o in enumerate(outputs):
            r = row * len(outputs) + i
            total = sum(logp[r, p - 1 + j, o[j]] for j in range(len(o)))
            scored.append((total / len(o) ** alpha, padded[i]))
        scored.sort(key=lambda x: -x[0])
        ranked.append(scored)
    return ranked, len(outputs)


@pytest.mark.parametrize(
    "kind,alpha,early",
    [
        pytest.param("decoder_only", 1.0, "never", marks=pytest.mark.slow),
        ("decoder_only", -0.5, False),
        ("encoder_decoder", 2.0, True),
        ("rnn", 0.0, False),
    ],
)
def test_equals_exhaustive_search_on_a_tiny_vocabulary(kind, alpha, early):
    """With as many beams as outputs, beam search ranks every output exactly as exhaustive search."""
    n = 3
    cfg, model = _tiny(kind)
    prompt = jax.random.randint(jax.random.key(1), (2, 3), 2, VOCAB)
    args = (prompt, prompt[:, :1]) if kind == "encoder_decoder" else (prompt,)
    params = model.init(jax.random.key(0), *args)["params"]
    params = jax.tree.map(lambda x: x * 2.0, params)  # sharper distributions: no near-ties
    num_outputs = len(_all_outputs(n))
    step, make_cache, start, forward = _adapters(kind, model, params, prompt, num_outputs)
    ranked, _ = _exhaustive(forward, start, n, alpha)

    search = jax.jit(
        lambda start: beam_search.beam_search(
            step,
            make_cache,
            start,
            beam_size=num_outputs,
            max_new_tokens=n,
            eos_id=EOS,
            length_penalty=alpha,
            early_stopping=early,
            pad_id=PAD,
        )
    )
    tokens, scores = search(start)
    for row in range(prompt.shape[0]):
        np.testing.assert_allclose(np.asarray(scores[row]), [s for s, _ in ranked[row]], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(tokens[row]), np.stack([t for _, t in ranked[row]]))


def test_cache_batch_axes_and_reorder():
    cfg, model = _tiny("decoder_only", scan_layers=True)
    axes = beam_search.cache_batch_axes(lambda r: init_cache(model, r, 8))
    flat = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: x is None)[0]
    }
    assert all(v in (None, 0, 1) for v in flat.values()), flat
    assert any(v == 1 for v in flat.values())  # stacked layers: the row axis comes second
    cache = jax.tree.map(lambda x: x, init_cache(model, 3, 8))
    cache = jax.tree.map(lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), cache)
    moved = beam_search.reorder_cache(cache, axes, jnp.array([2, 2, 0]))
    for path, a in jax.tree_util.tree_flatten_with_path(cache)[0]:
        b = dict(jax.tree_util.tree_flatten_with_path(moved)[0])[path]
        axis = flat[jax.tree_util.keystr(path)]
        want = a if axis is None else jnp.take(a, jnp.array([2, 2, 0]), axis=axis)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(want))


def _from_hf(hf_model):
    """The jaxlm model and parameters of a ``transformers`` model, through ``jaxlm.interop.hf``."""
    from jaxlm.interop import hf

    hf_config = hf_model.config.to_dict()
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    fields = hf.model_fields_from_hf(hf_config, state=state)
    raw = config_lib.base_config()
    for key, value in fields.items():
        raw.model[key] = value
    raw.data.objective = hf.architecture(hf_config).objective
    raw.data.seq_len = min(raw.data.seq_len, raw.model.max_len)
    cfg = config_lib.validate(raw).model
    return models.build(cfg), jax.tree.map(jnp.asarray, hf.params_from_hf(hf_config, state, fields))


def _hf_beams(hf_model, input_ids, k, n, alpha, early, **kwargs):
    """``transformers``' beams ``[B, K, N]`` (padded with PAD) and their scores ``[B, K]``."""
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(np.asarray(input_ids)),
            attention_mask=torch.ones(input_ids.shape, dtype=torch.long),
            num_beams=k,
            num_return_sequences=k,
            length_penalty=alpha,
            early_stopping=early,
            do_sample=False,
            max_new_tokens=n,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    prefix = input_ids.shape[1] if not hf_model.config.is_encoder_decoder else 1
    seqs = out.sequences.numpy()[:, prefix:]
    seqs = np.pad(seqs, ((0, 0), (0, n - seqs.shape[1])), constant_values=PAD)
    # transformers fills after EOS with `pad_token_id or eos_token_id`: EOS when the pad id is 0.
    after_eos = np.cumsum(seqs == hf_model.config.eos_token_id, axis=1) - (seqs == hf_model.config.eos_token_id) > 0
    seqs = np.where(after_eos, PAD, seqs)
    b = input_ids.shape[0]
    return seqs.reshape(b, k, n), out.sequences_scores.numpy().reshape(b, k)


HF_CASES = [
    (4, 1.0, False),
    pytest.param(3, 0.6, True, marks=pytest.mark.slow),
    pytest.param(4, -1.0, "never", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("k,alpha,early", HF_CASES)
def test_gpt2_beams_equal_transformers(k, alpha, early):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vocab, eos, n = 48, 7, 10
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=32,
        vocab_size=vocab,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=PAD,
        initializer_range=0.2,
    )
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # EOS likely enough that some beams finish early
        hf_model.transformer.wte.weight[eos] *= 5.0
    model, params = _from_hf(hf_model)
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 8, vocab)
    want_tokens, want_scores = _hf_beams(hf_model, prompt, k, n, alpha, early)
    ended = (want_tokens == eos).any(-1)
    assert ended.any() and not ended.all()  # beams that end in EOS and beams that run out of tokens

    tokens, scores = jax.jit(
        lambda params, prompt: beam_search.beam_search(
            make_step_fn(model, params),
            lambda r: init_cache(model, r, 32),
            prompt,
            beam_size=k,
            max_new_tokens=n,
            eos_id=eos,
            length_penalty=alpha,
            early_stopping=early,
            pad_id=PAD,
        )
    )(params, prompt)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,alpha,early", HF_CASES[:2])
def test_t5_beams_equal_transformers(k, alpha, early):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    vocab, eos, n = 48, 1, 10
    config = transformers.T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        eos_token_id=eos,
        pad_token_id=PAD,
        dropout_rate=0.0,
        initializer_factor=4.0,
    )
    hf_model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # EOS likely enough that some beams finish early
        hf_model.shared.weight[eos] *= 3.0
    model, params = _from_hf(hf_model)
    inputs = jax.random.randint(jax.random.key(3), (2, 6), 2, vocab)
    want_tokens, want_scores = _hf_beams(hf_model, inputs, k, n, alpha, early)
    ended = (want_tokens == eos).any(-1)
    assert ended.any() and not ended.all()

    def search(params, inputs):
        encoded = model.apply({"params": params}, inputs, method="encode")
        step = make_seq2seq_step_fn(model, params, jnp.repeat(encoded, k, axis=0), jnp.repeat(inputs, k, axis=0))
        return beam_search.beam_search(
            step,
            lambda r: init_cache(model, r, 32, jnp.zeros((r, inputs.shape[1]), jnp.int32)),
            jnp.zeros((inputs.shape[0], 1), jnp.int32),
            beam_size=k,
            max_new_tokens=n,
            eos_id=eos,
            length_penalty=alpha,
            early_stopping=early,
            pad_id=PAD,
        )

    tokens, scores = jax.jit(search)(params, inputs)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-4, atol=1e-4)


def test_jaxlm_generate_with_beams_equals_transformers(tmp_path, capsys):
    """``jaxlm generate --beam_size`` on an imported GPT-2 prints transformers' beams."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from jaxlm import cli
    from jaxlm.data import tokenizers
    from jaxlm.main import convert

    byte = tokenizers.build("byte")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=32,
        vocab_size=byte.vocab_size,
        bos_token_id=byte.eos_id,
        eos_token_id=byte.eos_id,
        pad_token_id=byte.pad_id,
        initializer_range=0.2,
    )
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))  # no tokenizer.json: the import uses bytes
    workdir = str(tmp_path / "run")
    convert.run_from_hf(str(tmp_path / "hf"), workdir, stream=open("/dev/null", "w"))
    prompt = "beams"
    args = ["generate", "--workdir", workdir, "--prompt", prompt, "--max_new_tokens", "8", "--num_samples", "3"]
    assert cli.execute([*args, "--beam_size", "3", "--length_penalty", "0.5", "--early_stopping", "true"]) == 0
    printed = [t for t in capsys.readouterr().out.split("\n" + "-" * 40 + "\n") if t]

    want_tokens, _ = _hf_beams(hf_model, byte.encode(prompt)[None, :], 3, 8, 0.5, True)
    assert printed == [prompt + byte.decode(row) for row in want_tokens[0]]
    # Bad input is one line, exit 2.
    assert cli.execute([*args, "--beam_size", "2"]) == 2
    assert "num_samples=3 exceeds config.decode.beam_size=2" in capsys.readouterr().err
