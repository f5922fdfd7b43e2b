"""Hugging Face T5 (v1.0 and v1.1) import/export against the PyTorch reference in ``transformers``.

The models are built from tiny configs with random weights (nothing is downloaded); the
tokenizer is a byte-level BPE trained here with the ``tokenizers`` package.
"""

import os
import shutil

import numpy as np
import pytest
import reference_libs

torch = reference_libs.importorskip("torch")
transformers = reference_libs.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers_lib = pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlm import checkpoint, config_lib  # noqa: E402
from jaxlm.common_types import ConfigError, DataError  # noqa: E402
from jaxlm.data import objectives_t5  # noqa: E402
from jaxlm.interop import hf, hf_t5  # noqa: E402
from jaxlm.main import convert, evaluate, generate, restore, train  # noqa: E402
from jaxlm.main import workdir as workdir_lib  # noqa: E402
from jaxlm.models.encoder_decoder import shift_right  # noqa: E402

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5's vocabulary
SENTINELS = 100  # jaxlm's span corruption puts them past the tokenizer's ids
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, jax and torch agree on every logit"] * 20
# v1.1 imports with its blocks stacked for nn.scan, a shorter max_len (T5 has no position
# table, so that is the user's choice) and data settings, as a fine-tuning run would.
V11 = {"model.scan_layers": "true", "model.max_len": "64"}


def _train_tokenizer(vocab_size=200, extra=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(list(extra))
    return tok


def _t5(seed, vocab_size, *, v11):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,  # sqrt(16) = 4: the query rescale round-trips exactly
        d_ff=96,
        num_layers=2,
        # A deeper decoder in v1.1; v1.0 stays even because transformers' generate() assumes it.
        num_decoder_layers=3 if v11 else 2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=40,
        layer_norm_epsilon=1e-5 if v11 else 1e-6,
        feed_forward_proj="gated-gelu" if v11 else "relu",
        tie_word_embeddings=not v11,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if v11:  # transformers 5 ties a fresh model's head whatever the config says: give it its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
        for name, p in model.named_parameters():  # unit norms would hide mapping mistakes
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "relative_attention_bias" in name:  # a bias large enough to matter
                p.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def v10_dir(tmp_path_factory):
    """T5 v1.0 (ReLU, tied and rescaled head), model.safetensors + tokenizer.json."""
    d = tmp_path_factory.mktemp("t5_v10")
    tok = _train_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    # Room for the sentinels jaxlm's span corruption adds past the tokenizer's ids.
    _t5(0, tok.get_vocab_size() + SENTINELS, v11=False).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def v11_dir(tmp_path_factory):
    """T5 v1.1 (gated GELU, own head) as pytorch_model.bin (tied copies included); bytes (263 + 100 ids)."""
    d = tmp_path_factory.mktemp("t5_v11")
    model = _t5(1, 384, v11=True)
    model.config.save_pretrained(str(d))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, str(d / "pytorch_model.bin"))
    return str(d)


class _Converted(dict):
    """Workdirs imported on first use (read-only)."""

    def __init__(self, tmp_path_factory, sources):
        super().__init__()
        self.tmp_path_factory, self.sources = tmp_path_factory, sources

    def __missing__(self, name):
        src, overrides = self.sources[name]
        workdir = str(self.tmp_path_factory.mktemp(f"wd_t5_{name}") / "run")
        convert.run_from_hf(src, workdir, overrides=overrides, stream=open(os.devnull, "w"))
        self[name] = workdir
        return workdir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Data overrides naming a tiny text corpus (train and eval files) and a dataset directory."""
    d = tmp_path_factory.mktemp("t5_corpus")
    (d / "train.txt").write_text("\n".join(CORPUS) + "\n")
    (d / "eval.txt").write_text("\n".join(reversed(CORPUS)) + "\n")
    files = {"data.files": str(d / "train.txt"), "data.eval_files": str(d / "eval.txt")}
    return {"data.source": "files", "data.document": "line", "data.data_dir": str(d / "datasets"), **files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, v10_dir, v11_dir, corpus):
    return _Converted(tmp_path_factory, {"v1.0": (v10_dir, {}), "v1.1": (v11_dir, {**V11, **corpus})})


def _open(workdir, **overrides):
    raw = workdir_lib.saved_config(workdir)
    config_lib.apply_overrides(raw, overrides)
    config = config_lib.validate(raw)
    return config, restore.open_trained(config, workdir)


def _padded_batch(rng, vocab, lengths, width):
    tokens = rng.integers(3, vocab, size=(len(lengths), width))
    mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, tokens, 0), mask


@pytest.mark.parametrize("name", ["v1.0", "v1.1"])
def test_logits_match_pytorch_with_padding(name, converted, v10_dir, v11_dir):
    src = v10_dir if name == "v1.0" else v11_dir
    config, (exp, params, tokenizer, step) = _open(converted[name])
    assert step == 0 and config.data.objective == "span_corruption"
    cfg = exp.model_cfg
    assert (cfg.kind, cfg.position, cfg.norm, cfg.pre_norm, cfg.use_bias) == (
        "encoder_decoder",
        "relative",
        "rmsnorm",
        True,
        False,
    )
    v11 = name != "v1.0"
    assert (cfg.relative_buckets, cfg.relative_max_distance, cfg.num_decoder_layers) == (16, 40, 3 if v11 else 2)
    assert (cfg.activation, cfg.tie_embeddings, cfg.norm_eps) == (
        ("geglu", False, 1e-5) if v11 else ("relu", True, 1e-6)
    )
    assert tokenizer.name == ("byte" if v11 else "hf")
    assert ("layers" in params["encoder"]["blocks"]) == v11 and cfg.max_len == (64 if v11 else 512)

    model = transformers.T5ForConditionalGeneration.from_pretrained(src).eval()
    rng = np.random.default_rng(0)
    inputs, inputs_mask = _padded_batch(rng, cfg.vocab_size, [45, 20, 7, 1], 45)  # past max_distance
    targets, targets_mask = _padded_batch(rng, cfg.vocab_size, [12, 30, 1, 50], 50)
    targets_in = np.asarray(shift_right(jnp.asarray(targets)))
    with torch.no_grad():
        want = model(
            input_ids=torch.tensor(inputs),
            attention_mask=torch.tensor(inputs_mask),
            decoder_input_ids=torch.tensor(targets_in),
        ).logits.numpy()
    # Jitted on one device: op by op on the 8-device shardings would compile every op for them.
    got = np.asarray(jax.jit(exp.model.apply)({"params": jax.device_get(params)}, inputs, targets_in))
    valid = targets_mask.astype(bool)
    diff = float(np.max(np.abs(got[valid] - want[valid])))
    print(f"max |logit difference| (T5 {name}): {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", ["v1.0", "v1.1"])
def test_export_round_trips_exactly(name, converted, v10_dir, v11_dir, tmp_path):
    src = v10_dir if name == "v1.0" else v11_dir
    out = convert.run_to_hf(converted[name], str(tmp_path / "export"), stream=open(os.devnull, "w"))
    original = transformers.T5ForConditionalGeneration.from_pretrained(src)
    exported = transformers.T5ForConditionalGeneration.from_pretrained(out)
    for field in ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "vocab_size"):
        assert getattr(exported.config, field) == getattr(original.config, field), field
    for field in ("feed_forward_proj", "layer_norm_epsilon", "relative_attention_num_buckets", "scale_decoder_outputs"):
        assert getattr(exported.config, field) == getattr(original.config, field), field
    a, b = original.state_dict(), exported.state_dict()
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert (exported.lm_head.weight is exported.shared.weight) == (name == "v1.0")


def test_greedy_generation_matches_pytorch(converted, v11_dir):
    """``jaxlm generate --temperature 0`` on the imported T5 continues as greedy decoding in torch does."""
    config, (_, _, tokenizer, _) = _open(
        converted["v1.1"], **{"decode.temperature": "0", "decode.max_new_tokens": "12"}
    )
    prompt = "the quick brown fox"
    (text,) = generate.run(config, converted["v1.1"], prompt)

    # The reference: a full forward pass per token (transformers' generate() assumes as many
    # decoder layers as encoder layers).
    model = transformers.T5ForConditionalGeneration.from_pretrained(v11_dir).eval()
    inputs = torch.tensor([tokenizer.encode(prompt).tolist()])
    new = []
    with torch.no_grad():
        while len(new) < 12 and (not new or new[-1] != tokenizer.eos_id):
            logits = model(input_ids=inputs, decoder_input_ids=torch.tensor([[0] + new])).logits
            new.append(int(logits[0, -1].argmax()))
    assert len(set(new)) > 2, new  # a meaningful comparison, not one token repeated
    assert text == tokenizer.decode(np.asarray(new)), (text, new)


def test_eval_then_fine_tune_from_the_import(converted, tmp_path):
    """``jaxlm eval`` reads the imported workdir; ``train`` resumes from it (span corruption)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(converted["v1.1"], workdir)  # the shared import stays at step 0
    raw = workdir_lib.saved_config(workdir)
    config_lib.apply_overrides(
        raw,
        {
            "data.seq_len": "16",
            "data.batch_size": "8",
            "train.num_steps": "2",
            "train.log_every": "1",
            "train.eval_steps": "1",
            "train.progress": "false",
        },
    )
    config = config_lib.validate(raw)
    metrics = evaluate.run(config, workdir, stream=open(os.devnull, "w"))
    assert np.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        metrics = train.run(config, workdir, stream=stream)
    assert "resumed from" in log.read_text()
    assert np.isfinite(metrics["loss"])
    assert checkpoint.latest_step(workdir) == 2


def test_tokenizer_holding_its_sentinels(tmp_path):
    """The layout of a real T5: the tokenizer ends with <extra_id_99> ... <extra_id_0>, the model rounds up."""
    d = tmp_path / "t5"
    d.mkdir()
    tok = _train_tokenizer(extra=[f"<extra_id_{i}>" for i in reversed(range(SENTINELS))])
    tok.save(str(d / "tokenizer.json"))
    _t5(2, tok.get_vocab_size() + 28, v11=False).save_pretrained(str(d))
    convert.run_from_hf(str(d), str(tmp_path / "run"), stream=open(os.devnull, "w"))
    _, (exp, _, tokenizer, _) = _open(str(tmp_path / "run"))
    assert exp.model_cfg.vocab_size == tok.get_vocab_size() + 28
    # Span corruption uses the tokenizer's own sentinels, <extra_id_0> first.
    sentinels = objectives_t5.sentinel_ids(tokenizer, None, SENTINELS)
    assert sentinels[0] == tok.token_to_id("<extra_id_0>") and sentinels[-1] == tok.token_to_id("<extra_id_99>")


def _fields(**kw):
    base = {"model_type": "t5", "vocab_size": 40, "d_model": 16, "d_kv": 4, "num_heads": 4, "d_ff": 32}
    return {**base, "num_layers": 1, **kw}


def test_config_and_tying_rules():
    fields = hf.model_fields_from_hf(_fields())
    assert (fields["num_decoder_layers"], fields["activation"], fields["tie_embeddings"]) == (1, "relu", True)
    assert hf.model_fields_from_hf(_fields(feed_forward_proj="gated-silu"))["activation"] == "swiglu"
    assert hf.model_fields_from_hf(_fields(feed_forward_proj="gelu"))["activation"] == "gelu_exact"
    for bad, fragment in (
        ({"d_kv": 8}, "differs from d_model"),
        ({"feed_forward_proj": "gated-relu"}, "feed_forward_proj"),
        ({"relative_attention_max_distance": 8, "relative_attention_num_buckets": 32}, "max_distance"),
        ({"decoder_start_token_id": 5}, "decoder_start_token_id"),
    ):
        with pytest.raises(DataError, match=fragment):
            hf.model_fields_from_hf(_fields(**bad))

    rng = np.random.default_rng(0)
    shared = rng.standard_normal((40, 16)).astype(np.float32)
    own = rng.standard_normal((40, 16)).astype(np.float32)
    # transformers 4 writes v1.1 as tie_word_embeddings=false; transformers 5 as scale_decoder_outputs=false.
    for cfg in (_fields(tie_word_embeddings=False), _fields(tie_word_embeddings=True, scale_decoder_outputs=False)):
        assert (
            hf.model_fields_from_hf(cfg, state={"shared.weight": shared, "lm_head.weight": own})["tie_embeddings"]
            is False
        )
        # Tied weights without the rescaling: an untied copy of the embedding.
        assert hf.model_fields_from_hf(cfg, state={"shared.weight": shared})["tie_embeddings"] is False
    # An own head with the rescaling (v1.0 config, different weights): the factor goes into the kernel.
    cfg = _fields()
    state = {"shared.weight": shared, "lm_head.weight": own}
    model = hf.model_fields_from_hf(cfg, state=state)
    assert model["tie_embeddings"] is False
    rules = {rule.path: rule for rule in map(hf.Rule._make, hf_t5.rules(model, state, cfg))}
    assert rules["lm_head/kernel"].scale == pytest.approx(16**-0.5)
    np.testing.assert_allclose(rules["lm_head/kernel"].to_jaxlm(own), own.T * 0.25)

    with pytest.raises(DataError, match="has no T5 equivalent"):
        hf.hf_config_from_model({**fields, "use_bias": True}, {})


def test_refuses_overrides_that_contradict_the_checkpoint(v11_dir, converted, tmp_path):
    with pytest.raises(ConfigError, match="model.relative_buckets=32 contradicts"):
        convert.run_from_hf(v11_dir, str(tmp_path / "a"), overrides={"model.relative_buckets": "32"})
    assert not os.path.exists(tmp_path / "a")
    # max_len is free for T5 (no position table); seq_len follows it unless given.
    config, _ = _open(converted["v1.1"])
    assert (config.model.max_len, config.data.seq_len, config.data.source) == (64, 64, "files")
