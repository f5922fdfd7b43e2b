"""Hugging Face BERT import/export against the PyTorch reference in ``transformers``.

The models are built from tiny configs with random weights (nothing is downloaded); the
tokenizer is a WordPiece trained here with the ``tokenizers`` package.
"""

import os
import shutil

import numpy as np
import pytest
import reference_libs

torch = reference_libs.importorskip("torch")
transformers = reference_libs.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import jax  # noqa: E402

from jaxlm import config_lib  # noqa: E402
from jaxlm.common_types import DataError  # noqa: E402
from jaxlm.interop import hf  # noqa: E402
from jaxlm.main import convert, evaluate, restore  # noqa: E402
from jaxlm.main import workdir as workdir_lib  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, as in BERT's vocabularies
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, jax and torch agree on every logit"] * 20


def _train_tokenizer(vocab_size=200):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    return tok


def _bert(cls, seed, vocab_size, **kw):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **kw,
    )
    model = cls(config).eval()
    with torch.no_grad():  # zero-initialized biases and unit norms would hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    """BertForPreTraining (exact GELU, 3 token types), model.safetensors + tokenizer.json."""
    d = tmp_path_factory.mktemp("bert_st")
    tok = _train_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    _bert(transformers.BertForPreTraining, 0, tok.get_vocab_size(), type_vocab_size=3).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
    """BertForMaskedLM (no pooler / NSP head, untied decoder, tanh GELU, eps 1e-6) as pytorch_model.bin; bytes."""
    d = tmp_path_factory.mktemp("bert_bin")
    model = _bert(
        transformers.BertForMaskedLM, 1, 300, hidden_act="gelu_new", layer_norm_eps=1e-6, tie_word_embeddings=False
    )
    model.config.save_pretrained(str(d))
    torch.save(model.state_dict(), str(d / "pytorch_model.bin"))
    return str(d)


class _Converted(dict):
    """Workdirs imported on first use (read-only)."""

    def __init__(self, tmp_path_factory, sources):
        super().__init__()
        self.tmp_path_factory, self.sources = tmp_path_factory, sources

    def __missing__(self, name):
        src, overrides = self.sources[name]
        workdir = str(self.tmp_path_factory.mktemp(f"wd_bert_{name}") / "run")
        with open(os.path.join(os.path.dirname(workdir), "convert.txt"), "w") as stream:
            convert.run_from_hf(src, workdir, overrides=overrides, stream=stream)
        self[name] = workdir
        return workdir


@pytest.fixture(scope="module")
def converted(tmp_path_factory, st_dir, bin_dir):
    return _Converted(tmp_path_factory, {"st": (st_dir, {}), "bin": (bin_dir, {})})


def _open(workdir):
    config = config_lib.validate(workdir_lib.saved_config(workdir))
    return config, restore.open_trained(config, workdir)


@pytest.mark.parametrize("name", ["st", "bin"])
def test_logits_match_pytorch_with_padding_and_token_types(name, converted, st_dir, bin_dir):
    src = bin_dir if name == "bin" else st_dir
    config, (exp, params, tokenizer, step) = _open(converted[name])
    assert step == 0 and config.data.objective == "masked_lm"
    cfg = exp.model_cfg
    assert (cfg.kind, cfg.pre_norm, cfg.position, cfg.norm) == ("encoder_only", False, "learned", "layernorm")
    assert cfg.activation == ("gelu" if name == "bin" else "gelu_exact")
    assert cfg.type_vocab_size == (2 if name == "bin" else 3)
    assert cfg.norm_eps == (1e-6 if name == "bin" else 1e-12)
    assert tokenizer.name == ("byte" if name == "bin" else "hf")
    assert ("decoder" in params["mlm"]) == (name == "bin")  # the untied decoder stayed untied

    cls = transformers.BertForMaskedLM if name == "bin" else transformers.BertForPreTraining
    model = cls.from_pretrained(src).eval()
    rng = np.random.default_rng(0)
    lengths = [20, 13, 5, 1]
    tokens = rng.integers(5, model.config.vocab_size, size=(len(lengths), max(lengths)))
    mask = (np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]).astype(np.int64)  # right padding
    tokens = np.where(mask == 1, tokens, tokenizer.pad_id)
    types = np.where(np.arange(max(lengths))[None] >= np.asarray(lengths)[:, None] // 2, 1, 0) * mask
    if cfg.type_vocab_size > 2:
        types[0, -3:] = 2
    with torch.no_grad():
        want = model(
            input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask)
        )
    # Jitted on one device: op by op on the 8-device shardings would compile every op for them.
    got = jax.jit(exp.model.apply)({"params": jax.device_get(params)}, tokens, token_types=types, segment_ids=mask)
    valid = mask.astype(bool)
    mlm = want.logits if name == "bin" else want.prediction_logits
    diff = float(np.max(np.abs(np.asarray(got["mlm_logits"])[valid] - mlm.numpy()[valid])))
    print(f"max |mlm logit difference| ({name}): {diff:.2e}")
    assert diff < 1e-4
    if name != "bin":
        nsp = float(np.max(np.abs(np.asarray(got["nsp_logits"]) - want.seq_relationship_logits.numpy())))
        print(f"max |nsp logit difference| ({name}): {nsp:.2e}")
        assert nsp < 1e-4


def test_scanned_layout(st_dir):
    """Blocks stacked for nn.scan export back to the same tensors (T5's test runs a scanned import)."""
    state, config = hf.load_state_dict(st_dir), hf.read_config(st_dir)
    fields = {**hf.model_fields_from_hf(config, state=state), "scan_layers": True}
    params = hf.params_from_hf(config, state, fields)
    assert params["blocks"]["layers"]["block"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
    assert params["blocks"]["layers"]["block"]["mlp_norm"]["bias"].shape == (2, 32)
    back = hf.params_to_hf(params, fields)
    assert sorted(back) == sorted(k for k in state if k not in ("cls.predictions.decoder.weight",))
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key])


def test_missing_heads_are_initialized(converted, bin_dir):
    """BertForMaskedLM has no pooler or NSP head: the import starts them fresh and says so."""
    workdir = converted["bin"]
    log = open(os.path.join(os.path.dirname(workdir), "convert.txt")).read()
    assert "freshly initialized: pooler, nsp" in log, log
    _, (_, params, _, _) = _open(workdir)
    assert np.all(np.asarray(params["nsp"]["bias"]) == 0) and 0.005 < float(np.std(params["pooler"]["kernel"])) < 0.05
    # A bare BertModel (no "bert." prefix, no heads at all) imports too.
    state = hf.load_state_dict(bin_dir)
    bare = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    bare["embeddings.position_ids"] = np.arange(64)[None]  # a buffer older checkpoints carry
    config = hf.read_config(bin_dir)
    fields = hf.model_fields_from_hf(config, state=bare)
    assert fields["tie_embeddings"] is True
    params = hf.params_from_hf(config, bare, fields)
    np.testing.assert_array_equal(params["token_embed"]["embedding"], state["bert.embeddings.word_embeddings.weight"])
    assert hf.fresh_parameters(config, bare, fields) == ["pooler", "mlm", "nsp"]
    with pytest.raises(DataError, match="tensors BERT does not use"):
        hf.params_from_hf(config, {**bare, "classifier.weight": np.zeros((2, 32), np.float32)}, fields)


@pytest.mark.parametrize("name", ["st", "bin"])
def test_export_round_trips(name, converted, st_dir, bin_dir, tmp_path):
    src = bin_dir if name == "bin" else st_dir
    out = convert.run_to_hf(converted[name], str(tmp_path / "export"), stream=open(os.devnull, "w"))
    cls = transformers.BertForMaskedLM if name == "bin" else transformers.BertForPreTraining
    original = cls.from_pretrained(src)
    exported = transformers.BertForPreTraining.from_pretrained(out)
    for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "hidden_act", "type_vocab_size"):
        assert getattr(exported.config, field) == getattr(original.config, field), field
    assert exported.config.layer_norm_eps == original.config.layer_norm_eps
    got = exported.state_dict()
    for key, value in original.state_dict().items():  # the pooler and NSP head of 'bin' are extra
        if name == "bin" and key == "cls.predictions.bias":
            continue  # untied in transformers 5, the forward adds decoder.bias and never reads this one
        assert torch.equal(value, got[key]), key
    if name == "st":
        assert sorted(os.listdir(out)) == [
            "config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
        ]


def test_eval_on_the_import(converted, tmp_path):
    """``jaxlm eval`` reads the imported workdir (masked LM on a small corpus)."""
    (tmp_path / "train.txt").write_text("\n".join(CORPUS[:30]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(CORPUS[30:]) + "\n")
    workdir = str(tmp_path / "run")
    shutil.copytree(converted["st"], workdir)  # the shared import stays as it is
    raw = workdir_lib.saved_config(workdir)
    config_lib.apply_overrides(
        raw,
        {
            "data.source": "files",
            "data.files": str(tmp_path / "train.txt"),
            "data.eval_files": str(tmp_path / "eval.txt"),
            "data.document": "line",
            "data.data_dir": str(tmp_path / "datasets"),
            "data.seq_len": "16",
            "data.batch_size": "8",
            "train.eval_steps": "1",
        },
    )
    config = config_lib.validate(raw)
    metrics = evaluate.run(config, workdir, stream=open(os.devnull, "w"))
    # Random weights: about the loss of a uniform guess over the vocabulary.
    uniform = np.log(config.model.vocab_size)
    assert np.isfinite(metrics["eval_loss"]) and 0.5 * uniform < metrics["eval_loss"] < 2 * uniform


def test_config_checks():
    base = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_attention_heads": 4}
    base |= {"num_hidden_layers": 1, "intermediate_size": 32, "max_position_embeddings": 16}
    fields = hf.model_fields_from_hf(base)
    assert (fields["kind"], fields["activation"], fields["norm_eps"], fields["type_vocab_size"]) == (
        "encoder_only",
        "gelu_exact",
        1e-12,
        2,
    )
    for bad, fragment in (
        ({"hidden_act": "tanh"}, "hidden_act"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"is_decoder": True}, "is_decoder"),
        ({"num_attention_heads": 5}, "does not divide"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ):
        with pytest.raises(DataError, match=fragment):
            hf.model_fields_from_hf({**base, **bad})
    with pytest.raises(DataError, match="pre_norm"):
        hf.hf_config_from_model({**fields, "pre_norm": True, "num_kv_heads": 0}, {})
