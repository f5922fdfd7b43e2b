"""Adapters, prefix and prompt tuning (jaxlm.nn.adapters, jaxlm.nn.virtual_tokens) in the models and jaxlm.peft.

Identity at init (adapters), trainable counts, training moves only the new parameters, masks
against NumPy references and unpacked / unpadded equivalents, prefix KV-cache decoding, task
heads that skip the virtual positions, and the one-line config errors.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, decoding, models, param_paths, peft
from jaxlm.common_types import ConfigError
from jaxlm.main import experiment
from jaxlm.main.generate import init_cache, make_step_fn
from jaxlm.models.heads import HeadConfig
from jaxlm.nn import virtual_tokens
from jaxlm.nn.attention import MultiHeadAttention

V = 53
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
NEW = ("adapter_", "/prefix/", "prompt/")


def _validated(spec, tmp_path, **peft_fields):
    name, _, arg = spec.partition(":")
    c = config_lib.load_config_file(os.path.join(CONFIGS, name) + (":" + arg if arg else ""))
    c.data.data_dir = str(tmp_path)
    c.data.seq_len = 16
    c.peft.trainable = ""
    for key, value in peft_fields.items():
        setattr(c.peft, key, value)
    return config_lib.validate(c)


def _small(kind="decoder_only", **fields):
    base = config_lib.validate(config_lib.base_config()).model
    small = dict(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=40, vocab_size=V, dropout_rate=0.0)
    return dataclasses.replace(base, kind=kind, **{**small, **fields})


def _init(model, *args, **kwargs):
    # Compiled as the trainer compiles its initializers (jaxlm.hardware.init_compiler_options): these
    # 2-layer models are far below the threshold, so with XLA:CPU's cheap settings (~5 CPU-s of
    # optimizing random draws otherwise, vs ~1.5 for the forward pass).
    init = experiment.run_init(lambda r: model.init(r, *args, **kwargs), 0, jax.random.key(0))
    return nn.unbox(init["params"])


def _apply(model, params, *args, **kwargs):
    """``model.apply`` jitted (one compile; op-by-op dispatch would compile every op)."""
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))(params, *args)


def _is_new(path):
    return any(n in path for n in NEW)


def _without_new(params):
    flat = {p: x for p, x in param_paths.flatten(params).items() if not _is_new(p)}
    out = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


@pytest.mark.parametrize(
    "spec, kind, overrides",
    [
        ("gpt.py:size=tiny", "houlsby", {}),
        ("gpt.py:size=tiny", "pfeiffer", {"scan_layers": True, "fuse_qkv": "on"}),
        pytest.param("bert.py:size=tiny", "houlsby", {}, marks=pytest.mark.slow),
        ("t5.py:size=tiny", "houlsby", {"scan_layers": True}),
    ],
    ids=["gpt-houlsby", "gpt-pfeiffer-scan-fused", "bert-houlsby", "t5-houlsby-scan"],
)
def test_adapters_start_as_the_base_model_and_count(spec, kind, overrides, tmp_path):
    cfg = _validated(spec, tmp_path, method="adapter", adapter_dim=8, adapter_kind=kind)
    m = dataclasses.replace(models.resolve(cfg.model, V), **overrides)
    assert (m.adapter_dim, m.adapter_kind) == (8, kind)
    args = experiment.example_args(m, 16, cfg.data.objective)
    params = _init(models.build(m), *args)
    # Fresh adapters are the identity: the adapted model computes the base model.
    base = models.build(dataclasses.replace(m, adapter_dim=0))
    got, want = _apply(models.build(m), params, *args), _apply(base, _without_new(params), *args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
    trainable = peft.init(jax.random.key(0), params, cfg.peft)
    layers = m.num_layers + (m.num_layers if m.kind == "encoder_decoder" else 0)
    sublayers = 2 if kind == "houlsby" else 1
    d, a = m.embed_dim, 8
    assert peft.count(trainable) == layers * sublayers * (d * a + a + a * d + d)
    assert all(_is_new(p) for p in param_paths.flatten(trainable))


@pytest.mark.parametrize(
    "kind, method",
    [
        ("decoder_only", "prefix"),
        ("encoder_only", "prompt"),
        pytest.param("encoder_only", "prefix", marks=pytest.mark.slow),
        pytest.param("decoder_only", "prompt", marks=pytest.mark.slow),
    ],
)
def test_virtual_token_counts_and_gradients_reach_only_them(kind, method):
    p = 3
    fields = {"prefix_tokens": p} if method == "prefix" else {"prompt_tokens": p}
    m = _small(kind, num_kv_heads=2, **fields)
    model = models.build(m)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 1, V)
    params = _init(model, tokens)
    cfg = dataclasses.replace(config_lib.validate(config_lib.base_config()).peft, method=method, trainable="")
    trainable = peft.init(jax.random.key(0), params, cfg)
    want = 2 * 2 * p * 2 * (32 // 4) if method == "prefix" else p * 32  # L * (key, value) * P * K * H, or P * D
    assert peft.count(trainable) == want

    def loss(t):
        out = model.apply({"params": peft.effective_params(params, t, cfg)}, tokens)  # inside jax.grad's jit
        logits = out if kind == "decoder_only" else out["mlm_logits"]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = param_paths.flatten(jax.jit(jax.grad(loss))(trainable))
    assert grads and all(_is_new(path) for path in grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in grads.values()), grads.keys()


@pytest.mark.parametrize("method", ["prompt", "adapter,lora", pytest.param("prefix,bitfit", marks=pytest.mark.slow)])
def test_steps_move_only_the_new_parameters_and_the_loss_falls(tiny_config, method):
    tiny_config.optim.warmup_steps = 0
    tiny_config.optim.lr = 3e-2
    tiny_config.data.seq_len = 32
    tiny_config.peft.method, tiny_config.peft.num_virtual_tokens, tiny_config.peft.adapter_dim = method, 4, 8
    cfg = config_lib.validate(tiny_config)
    exp = experiment.build(cfg, 263)
    base = experiment.init_params(exp, 0)
    base_before = [np.asarray(x) for x in jax.tree.leaves(base)]
    state = experiment.init_peft_state(exp, base, 0)
    before = param_paths.flatten(jax.tree.map(np.asarray, state.params))
    step = jax.jit(experiment.train_step_fn(exp))
    tokens = jax.random.randint(jax.random.key(5), (8, 33), 0, 263)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((8, 32), jnp.float32)}
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch, jax.random.key(0), base)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    after = param_paths.flatten(jax.tree.map(np.asarray, state.params))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    news = {p for p in before if p.startswith("params/") and _is_new(p)}
    assert news and news <= changed, (news, changed)
    if "lora" in method:
        assert any(p.endswith("lora_b") for p in changed)
    if "bitfit" in method:
        assert any(p.endswith("/bias") and not _is_new(p) for p in changed)
    for got, want in zip(jax.tree.leaves(base), base_before):  # the frozen base is untouched
        np.testing.assert_array_equal(got, want)


def test_prompt_mask_matches_a_numpy_construction():
    rng = np.random.default_rng(0)
    p, t = 2, 5
    real = rng.random((3, 1, t, t)) < 0.6
    valid = rng.random((3, t)) < 0.7
    for causal in (True, False):
        got = np.asarray(virtual_tokens.prompt_mask(jnp.asarray(real), jnp.asarray(valid), p, t, causal=causal))
        want = np.zeros((3, 1, p + t, p + t), bool)
        for b in range(3):
            for q in range(p + t):
                for k in range(p + t):
                    if q >= p and k >= p:
                        want[b, 0, q, k] = real[b, 0, q - p, k - p]
                    elif k < p:  # every query attends the virtual keys (causal: virtual ones up to itself)
                        want[b, 0, q, k] = q >= p or not causal or k <= q
                    else:  # a virtual query and a real key
                        want[b, 0, q, k] = (not causal) and valid[b, k - p]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal_flag", [False, True])
def test_prefix_attention_matches_a_numpy_reference(causal_flag):
    b, t, d, n, k_heads, p = 2, 6, 16, 4, 2, 3
    h = d // n
    layer = MultiHeadAttention(num_heads=n, num_kv_heads=k_heads, head_dim=h, prefix_tokens=p)
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    valid = np.ones((b, t), bool)
    valid[1, 4:] = False
    mask = None if causal_flag else jnp.asarray(np.tril(np.ones((t, t), bool))[None, None] & valid[:, None, None, :])
    params = _init(layer, x, mask=mask, deterministic=True, causal=causal_flag)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape), params)  # biases too
    got = np.asarray(_apply(layer, params, x, mask=mask, deterministic=True, causal=causal_flag))

    f = {k: np.asarray(v, np.float64) for k, v in param_paths.flatten(params).items()}
    xs = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", xs, f["query/kernel"]) + f["query/bias"]
    k = np.einsum("btd,dkh->btkh", xs, f["key/kernel"]) + f["key/bias"]
    v = np.einsum("btd,dkh->btkh", xs, f["value/kernel"]) + f["value/bias"]
    k = np.concatenate([np.broadcast_to(f["prefix/key"], (b, p, k_heads, h)), k], axis=1)
    v = np.concatenate([np.broadcast_to(f["prefix/value"], (b, p, k_heads, h)), v], axis=1)
    k, v = np.repeat(k, n // k_heads, axis=2), np.repeat(v, n // k_heads, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    allowed = np.tril(np.ones((t, t), bool))[None, None]
    if not causal_flag:
        allowed = allowed & valid[:, None, None, :]
    allowed = np.concatenate([np.ones((b, 1, t, p), bool), np.broadcast_to(allowed, (b, 1, t, t))], axis=-1)
    logits = np.where(allowed, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", w, v)
    want = np.einsum("btnh,nhd->btd", out, f["out/kernel"]) + f["out/bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [{"prompt_tokens": 3}, pytest.param({"prefix_tokens": 3}, marks=pytest.mark.slow)],
    ids=["prompt", "prefix"],
)
def test_packed_document_equals_it_alone_and_causality_holds(fields):
    """GPT: a packed second document (segments, positions restarting) == the document alone; the future is unseen."""
    model = models.build(_small(**fields))
    a, b_doc = [5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17]
    packed = jnp.asarray([a + b_doc])
    segs = jnp.asarray([[1] * len(a) + [2] * len(b_doc)])
    pos = jnp.asarray([list(range(len(a))) + list(range(len(b_doc)))])
    params = _init(model, packed)
    params = jax.tree.map(lambda x: x * 2.0, params)  # virtual tokens that matter
    packed_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, positions=pos, segment_ids=segs))
    full = np.asarray(packed_fn(params, packed))[0]
    got = full[len(a) :]
    alone = np.asarray(_apply(model, params, jnp.asarray([b_doc])))[0]
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)
    moved = np.asarray(packed_fn(params, packed.at[0, -1].set(40)))[0]
    np.testing.assert_array_equal(moved[:-1], full[:-1])
    zeroed = param_paths.map_with_path(lambda p, x: x * 0 if _is_new(p) else x, params)
    other = np.asarray(_apply(model, zeroed, jnp.asarray([b_doc])))[0]
    assert np.abs(other - alone).min(axis=-1).max() > 1e-4  # every real position sees the virtual tokens


@pytest.mark.parametrize(
    "fields",
    [{"prompt_tokens": 3}, pytest.param({"prefix_tokens": 3}, marks=pytest.mark.slow)],
    ids=["prompt", "prefix"],
)
def test_bert_padding_is_ignored_and_the_pooler_reads_cls(fields):
    m = _small("encoder_only", type_vocab_size=2, pre_norm=False, max_len=40, **fields)
    model = models.build(m)
    tokens = jnp.asarray([[2, 5, 6, 7, 8, 9], [2, 5, 6, 7, 0, 0]])
    params = _init(model, tokens)
    out = _apply(model, params, tokens)
    assert out["mlm_logits"].shape == (2, 6, V) and out["hidden"].shape == (2, 6, 32)
    short = _apply(model, params, tokens[1:, :4])
    np.testing.assert_allclose(out["mlm_logits"][1, :4], short["mlm_logits"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pooled"][1], short["pooled"][0], rtol=1e-5, atol=1e-5)
    f = param_paths.flatten(params)  # BERT's pooler reads [CLS] (real position 0), not a virtual token
    cls = np.tanh(np.asarray(out["hidden"][:, 0]) @ np.asarray(f["pooler/kernel"]) + np.asarray(f["pooler/bias"]))
    np.testing.assert_allclose(out["pooled"], cls, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["decoder_only", pytest.param("encoder_only", marks=pytest.mark.slow)])
def test_task_heads_skip_the_virtual_positions(kind):
    m = _small(kind, prompt_tokens=4)
    tokens = jnp.asarray([[3, 4, 5, 6, 0, 0], [3, 4, 5, 6, 7, 8]])
    segs = (tokens > 0).astype(jnp.int32)
    cls_model = models.build(m, head=HeadConfig("classification", 3, pooling="last"))
    params = _init(cls_model, tokens, segment_ids=segs)
    padded = _apply(cls_model, params, tokens, segment_ids=segs)["logits"]
    alone = _apply(cls_model, params, tokens[:1, :4])["logits"]
    np.testing.assert_allclose(padded[0], alone[0], rtol=1e-5, atol=1e-5)
    tok_model = models.build(m, head=HeadConfig("token_classification", 5))
    tok_params = _init(tok_model, tokens, segment_ids=segs)
    out = jax.eval_shape(lambda: tok_model.apply({"params": tok_params}, tokens, segment_ids=segs))
    assert out["logits"].shape == (2, 6, 5)


@pytest.mark.parametrize("position", ["learned", *(pytest.param(p, marks=pytest.mark.slow) for p in ("alibi", "rope"))])
def test_prefix_cached_decoding_equals_the_full_forward(position):
    m = _small(prefix_tokens=3, position=position, max_len=48)
    model = models.build(m)
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 1, V)
    params = jax.tree.map(lambda x: x * 3.0, _init(model, prompt))  # sharp: greedy ties cannot flip
    cached = decoding.generate(
        make_step_fn(model, params),
        init_cache(model, 2, 40),
        prompt,
        jax.random.key(0),
        max_new_tokens=8,
        temperature=0.0,
    )
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    uncached = decoding.generate_uncached(forward, prompt, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))


def test_t5_prompt_tuning_pads_decodes_from_the_cache_and_counts():
    """Encoder prompt (Lester et al.): padded inputs == unpadded, cached greedy == uncached, P x D trainable."""
    from jaxlm.main import generate

    m = _small("encoder_decoder", prompt_tokens=3, position="relative", norm="rmsnorm", use_bias=False, max_len=48)
    model = models.build(m)
    inputs = jnp.asarray([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    targets = jnp.asarray([[0, 3, 4, 5], [0, 6, 7, 8]])
    params = jax.tree.map(lambda x: x * 3.0, _init(model, inputs, targets))
    cfg = dataclasses.replace(config_lib.validate(config_lib.base_config()).peft, method="prompt", trainable="")
    trainable = peft.init(jax.random.key(0), params, cfg)
    assert peft.count(trainable) == 3 * 32 and list(param_paths.flatten(trainable)) == ["params/prompt/embedding"]
    full = np.asarray(_apply(model, params, inputs, targets))
    short = np.asarray(_apply(model, params, inputs[:1, :4], targets[:1]))
    np.testing.assert_allclose(full[0], short[0], rtol=1e-5, atol=1e-5)
    zeroed = param_paths.map_with_path(lambda p, x: x * 0 if _is_new(p) else x, params)
    assert np.abs(np.asarray(_apply(model, zeroed, inputs, targets)) - full).max() > 1e-3
    encoded = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.encode))(params, inputs)
    assert encoded.shape == (2, 3 + 6, 32)
    step = generate.make_seq2seq_step_fn(model, params, encoded, inputs)
    cache = generate.init_cache(model, 2, 16, inputs)
    start = jnp.zeros((2, 1), jnp.int32)
    cached = decoding.generate(step, cache, start, jax.random.key(0), max_new_tokens=6, temperature=0.0)
    forward = jax.jit(lambda t: model.apply({"params": params}, inputs, t))
    uncached = decoding.generate_uncached(forward, start, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))


def test_prompt_tuned_decoder_refuses_decode_mode_in_one_line():
    model = models.build(_small(prompt_tokens=2))
    with pytest.raises(ConfigError, match="no KV-cache decode mode") as e:
        init_cache(model, 1, 16)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "spec, method, extra, message",
    [
        ("rnn.py", "prefix", {}, "prefix needs config.model.kind in decoder_only, encoder_only"),
        ("rnn.py", "adapter", {}, "adapter needs config.model.kind in"),
        ("t5.py:size=tiny", "prefix", {}, "prefix needs config.model.kind in"),
        ("gpt.py:size=tiny", "prompt", {"model.attention": "blockwise"}, "needs config.model.attention=xla"),
        ("gpt.py:size=tiny", "prefix", {"model.attention_window": (0, 8)}, "attention_window=0"),
        ("gpt.py:size=tiny", "prompt", {"data.seq_len": 64}, "exceeds config.model.max_len=64"),
        ("gpt.py:size=tiny", "prefix,prompt", {}, "combines prefix and prompt"),
    ],
)
def test_combinations_that_make_no_sense_are_one_line_errors(spec, method, extra, message, tmp_path):
    name, _, arg = spec.partition(":")
    c = config_lib.load_config_file(os.path.join(CONFIGS, name) + (":" + arg if arg else ""))
    c.data.data_dir = str(tmp_path)
    c.peft.method = method
    for key, value in extra.items():
        section, field = key.split(".")
        setattr(getattr(c, section), field, value)
    with pytest.raises(ConfigError, match=message) as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)


def test_derived_model_fields_stay_out_of_the_saved_config(tiny_config):
    tiny_config.peft.method, tiny_config.data.seq_len = "prefix,adapter", 32
    cfg = config_lib.validate(tiny_config)
    assert (cfg.model.prefix_tokens, cfg.model.adapter_dim, cfg.model.prompt_tokens) == (20, 64, 0)
    text = config_lib.to_json(cfg)
    assert "prefix_tokens" not in text and "adapter_dim" in text  # peft.adapter_dim only
    again = config_lib.validate(config_lib.from_json(text))
    assert again.model == cfg.model
    raw = tiny_config.to_dict()
    raw["model"]["prefix_tokens"] = 3
    with pytest.raises(ConfigError, match="unknown key config.model.prefix_tokens"):
        config_lib.validate(raw)


@pytest.mark.slow
def test_jaxlm_train_from_a_pretrained_workdir(tiny_config, text_corpus, tmp_path):
    """``jaxlm train`` with init_from: adapters/prefix come up "initialized", only they move, generate works."""
    import io

    from jaxlm import cli
    from jaxlm.main import merge, train

    c = tiny_config
    c.data.source, c.data.files = "files", text_corpus
    c.train.eval_every, c.train.eval_steps, c.train.log_every, c.train.num_steps = 0, 1, 1, 2
    c.optim.warmup_steps, c.optim.lr = 0, 3e-2
    base_dir, run_dir = str(tmp_path / "base"), str(tmp_path / "prefix")
    train.run(config_lib.validate(c), base_dir)
    c.checkpoint.init_from = base_dir
    c.data.seq_len = 32  # the prefix takes positions 0..P-1 of the 64 learned ones
    c.peft.method, c.peft.num_virtual_tokens, c.peft.adapter_dim, c.peft.trainable = "prefix,adapter", 4, 8, ""
    cfg = config_lib.validate(c)
    out = io.StringIO()
    train.run(cfg, run_dir, stream=out)
    log = out.getvalue()
    # 2 layers x (prefix key + value) [4, 4, 16] + 2 layers x 2 adapters x (down, up) x (kernel, bias):
    # none of them in the base; 1,024 + 4 x (64 x 8 + 8 + 8 x 64 + 64) parameters.
    assert "initialized 20 tensors (5,408 params)" in log and "5,408 trainable" in log, log
    _, base, state, _, step = merge.open_peft(cfg, run_dir)
    trained = param_paths.flatten(jax.tree.map(np.asarray, state.params))
    assert step == 2 and trained and all(_is_new(p) for p in trained)
    fresh = param_paths.flatten(jax.tree.map(np.asarray, base))
    moved = [p for p in trained if not np.array_equal(trained[p], fresh[p.removeprefix("params/")])]
    assert any("adapter_mlp/up" in p for p in moved) and any("prefix" in p for p in moved), moved
    # jaxlm merge cannot fold prefixes or adapters (one line, exit 2); generate reads the PEFT workdir itself.
    assert cli.execute(["merge", "--workdir", run_dir, "--out", str(tmp_path / "merged")]) == 2
    args = ["generate", "--workdir", run_dir, "--prompt", "the quick", "--max_new_tokens", "4"]
    assert cli.execute(args) == 0


def _module_steps(cfg, steps=2):
    exp = experiment.build(cfg, 263)
    base = experiment.init_params(exp, 0)
    state = experiment.init_peft_state(exp, base, 0)
    tokens = jax.random.randint(jax.random.key(5), (8, 25), 0, 263)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((8, 24), jnp.float32)}
    with jax.set_mesh(exp.mesh):
        step = jax.jit(
            experiment.train_step_fn(exp),
            in_shardings=(exp.state_shardings, None, None, exp.base_shardings),
            out_shardings=(exp.state_shardings, None),
        )
        for _ in range(steps):
            state, _ = step(state, batch, jax.random.key(0), base)
    return base, param_paths.flatten(jax.tree.map(np.asarray, state.params))


@pytest.mark.all_devices
@pytest.mark.slow
def test_prompt_and_adapters_over_eight_fsdp_devices_equal_one_device(tiny_config):
    tiny_config.optim.lr, tiny_config.data.seq_len = 1e-2, 24
    tiny_config.peft.method, tiny_config.peft.num_virtual_tokens, tiny_config.peft.adapter_dim = "prompt,adapter", 4, 8
    tiny_config.mesh.shape.data, tiny_config.mesh.shape.fsdp = 1, 8
    base8, got = _module_steps(config_lib.validate(tiny_config))
    assert len(base8["prompt"]["embedding"].sharding.device_set) == 8
    tiny_config.mesh.shape.fsdp = 1
    original = experiment.sharding.make_mesh
    experiment.sharding.make_mesh = lambda cfg, devs=None: original(cfg, jax.devices()[:1])
    try:
        _, want = _module_steps(config_lib.validate(tiny_config))
    finally:
        experiment.sharding.make_mesh = original
    assert got.keys() == want.keys() and any("prompt" in p for p in got)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=path)
