"""Hugging Face GPT-2 import/export against the PyTorch reference in ``transformers``.

The models are built from tiny configs with random weights (nothing is downloaded); the
tokenizer is a byte-level BPE trained here with the ``tokenizers`` package.
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import reference_libs
from subprocess_env import subprocess_env

torch = reference_libs.importorskip("torch")
transformers = reference_libs.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers_lib = pytest.importorskip("tokenizers")

import jax  # noqa: E402

from jaxlm import checkpoint, cli, config_lib  # noqa: E402
from jaxlm.common_types import CheckpointError, ConfigError, DataError  # noqa: E402
from jaxlm.interop import hf  # noqa: E402
from jaxlm.main import convert, restore, train  # noqa: E402
from jaxlm.main import workdir as workdir_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOT = "<|endoftext|>"
SCAN = {"model.scan_layers": "true", "model.remat": "full"}  # how it runs may change at import
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, jax and torch agree on every logit"] * 20


def _train_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _gpt2(seed, vocab_size, *, tie=True, eos=None, eps=1e-5):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_positions=64,
        vocab_size=vocab_size,
        tie_word_embeddings=tie,
        layer_norm_epsilon=eps,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # zero-initialized biases and norms would hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
        # Larger position embeddings make greedy decoding move on instead of repeating one token.
        model.transformer.wpe.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    """A save_pretrained directory: model.safetensors (tied) + tokenizer.json."""
    d = tmp_path_factory.mktemp("gpt2_st")
    tok = _train_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    _gpt2(0, tok.get_vocab_size(), eos=tok.token_to_id(EOT)).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
    """A pytorch_model.bin state dict (untied head, LayerNorm eps 1e-3), no tokenizer.json: imported with bytes."""
    d = tmp_path_factory.mktemp("gpt2_bin")
    model = _gpt2(1, 300, tie=False, eps=1e-3)
    model.config.save_pretrained(str(d))
    torch.save(model.state_dict(), str(d / "pytorch_model.bin"))
    return str(d)


class _Converted(dict):
    """Workdirs imported on first use: 'st' and 'scan' from st_dir, 'bin' from bin_dir (read-only)."""

    def __init__(self, tmp_path_factory, sources):
        super().__init__()
        self.tmp_path_factory, self.sources = tmp_path_factory, sources

    def __missing__(self, name):
        src, overrides = self.sources[name]
        workdir = str(self.tmp_path_factory.mktemp(f"wd_{name}") / "run")
        convert.run_from_hf(src, workdir, overrides=overrides, stream=open(os.devnull, "w"))
        self[name] = workdir
        return workdir


@pytest.fixture(scope="module")
def converted(tmp_path_factory, st_dir, bin_dir):
    return _Converted(tmp_path_factory, {"st": (st_dir, {}), "bin": (bin_dir, {}), "scan": (st_dir, SCAN)})


def _open(workdir):
    config = config_lib.validate(workdir_lib.saved_config(workdir))
    return restore.open_trained(config, workdir)


@pytest.mark.parametrize("name", ["st", "bin", "scan"])
def test_logits_match_pytorch_with_padding(name, converted, st_dir, bin_dir):
    src = {"st": st_dir, "bin": bin_dir, "scan": st_dir}[name]
    exp, params, tokenizer, step = _open(converted[name])
    assert step == 0
    assert tokenizer.name == ("byte" if name == "bin" else "hf")
    assert ("layers" in params["blocks"]) == (name == "scan")
    model = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
    rng = np.random.default_rng(0)
    lengths = [24, 17, 6, 1]
    tokens = rng.integers(0, model.config.vocab_size, size=(len(lengths), max(lengths)))
    mask = (np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]).astype(np.int64)  # right padding
    tokens = np.where(mask == 1, tokens, tokenizer.pad_id)
    with torch.no_grad():
        want = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    # Jitted on one device: op by op on the 8-device shardings would compile every op for them.
    got = np.asarray(jax.jit(exp.model.apply)({"params": jax.device_get(params)}, tokens, segment_ids=mask))
    valid = mask.astype(bool)
    diff = float(np.max(np.abs(got[valid] - want[valid])))
    print(f"max |logit difference| ({name}): {diff:.2e}")
    assert diff < 1e-4
    # The head really is untied in the .bin model, and the import kept it so.
    assert ("lm_head" in params) == (name == "bin")


@pytest.mark.parametrize("name", ["st", "bin", "scan"])
def test_export_round_trips_exactly(name, converted, st_dir, bin_dir, tmp_path):
    src = {"st": st_dir, "bin": bin_dir, "scan": st_dir}[name]
    out = convert.run_to_hf(converted[name], str(tmp_path / "export"), stream=open(os.devnull, "w"))
    original_model = transformers.GPT2LMHeadModel.from_pretrained(src)
    exported_model = transformers.GPT2LMHeadModel.from_pretrained(out)
    for field in ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "vocab_size", "layer_norm_epsilon"):
        want = getattr(original_model.config, field)
        assert getattr(exported_model.config, field) == (4 * 64 if field == "n_inner" and want is None else want)
    assert exported_model.config.tie_word_embeddings == original_model.config.tie_word_embeddings
    original, exported = original_model.state_dict(), exported_model.state_dict()
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert torch.equal(value, exported[key]), key
    files = sorted(os.listdir(out))
    if name != "bin":
        assert files == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json"]
        with open(os.path.join(src, "tokenizer.json")) as a, open(os.path.join(out, "tokenizer.json")) as b:
            assert a.read() == b.read()
    else:
        assert files == ["config.json", "model.safetensors"]
    # Re-importing the export gives the same jaxlm parameters.
    again = str(tmp_path / "again")
    convert.run_from_hf(out, again, overrides=SCAN if name == "scan" else {}, stream=open(os.devnull, "w"))
    _, p1, _, _ = _open(converted[name])
    _, p2, _, _ = _open(again)
    for a, b in zip(hf._flatten(p1).values(), hf._flatten(p2).values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scanned_layout_round_trips(bin_dir):
    state = hf.load_state_dict(bin_dir)
    config = hf.read_config(bin_dir)
    fields = {**hf.model_fields_from_hf(config), "scan_layers": True}
    params = hf.params_from_hf(config, state, fields)
    assert params["blocks"]["layers"]["block"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)
    back = hf.params_to_hf(params, fields)
    assert sorted(back) == sorted(k for k in state if not k.endswith(".attn.bias"))
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key])


def test_hub_layouts(bin_dir, tmp_path):
    """Bare GPT2Model keys with mask buffers, sharded safetensors and bfloat16 files all read."""
    state = hf.load_state_dict(bin_dir)
    config = {**hf.read_config(bin_dir), "tie_word_embeddings": True}
    fields = hf.model_fields_from_hf(config)
    want = hf.params_from_hf(config, {k: v for k, v in state.items() if k != "lm_head.weight"}, fields)
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    bare["h.0.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
    bare["h.0.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    got = hf.params_from_hf(config, bare, fields)
    for a, b in zip(hf._flatten(want).values(), hf._flatten(got).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="tensors GPT-2 does not use"):
        hf.params_from_hf(config, {**bare, "score.weight": np.zeros((2, 64), np.float32)}, fields)

    model = transformers.GPT2LMHeadModel.from_pretrained(bin_dir)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="200KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    sharded = hf.load_state_dict(str(tmp_path / "sharded"))
    assert sorted(sharded) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(sharded[key], value)

    from safetensors.torch import save_file

    (tmp_path / "bf16").mkdir()
    save_file(
        {"wte.weight": torch.full((3, 2), 1.5, dtype=torch.bfloat16)}, str(tmp_path / "bf16" / "model.safetensors")
    )
    loaded = hf.load_state_dict(str(tmp_path / "bf16"))["wte.weight"]
    assert np.all(np.asarray(loaded, np.float32) == 1.5)  # bfloat16 via ml_dtypes, or float32 via torch


def test_fine_tuning_resumes_from_the_import(st_dir, tmp_path):
    workdir = str(tmp_path / "run")
    convert.run_from_hf(st_dir, workdir, stream=open(os.devnull, "w"))
    raw = workdir_lib.saved_config(workdir)
    config_lib.apply_overrides(
        raw,
        {
            "data.source": "synthetic",
            "data.data_dir": str(tmp_path / "datasets"),
            "data.synthetic.num_train_tokens": "4000",
            "data.synthetic.num_eval_tokens": "2000",
            "data.seq_len": "16",
            "data.batch_size": "8",
            "train.num_steps": "2",
            "train.log_every": "1",
            "train.eval_steps": "1",
            "train.progress": "false",
        },
    )
    config = config_lib.validate(raw)
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        metrics = train.run(config, workdir, stream=stream)
    assert "resumed from" in log.read_text()
    assert np.isfinite(metrics["loss"])
    assert checkpoint.latest_step(workdir) == 2


def test_config_checks():
    base = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "vocab_size": 300}
    fields = hf.model_fields_from_hf(base)
    assert (fields["mlp_dim"], fields["max_len"], fields["tie_embeddings"]) == (256, 64, True)
    for bad, fragment in (
        ({"model_type": "llama"}, "model_type='llama' is not supported"),
        ({"layer_norm_epsilon": -1.0}, "layer_norm_epsilon"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_head": 5}, "n_head=5 does not divide"),
    ):
        with pytest.raises(DataError, match=fragment):
            hf.model_fields_from_hf({**base, **bad})
    exported = hf.hf_config_from_model({**fields, "num_kv_heads": 0}, {"eos": 7})
    assert exported["eos_token_id"] == 7 and exported["n_inner"] == 256
    with pytest.raises(DataError, match="position"):
        hf.hf_config_from_model({**fields, "position": "sinusoidal"}, {})


def test_refuses_overrides_that_contradict_the_checkpoint(st_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.num_layers=3 contradicts"):
        convert.run_from_hf(st_dir, str(tmp_path / "run"), overrides={"model.num_layers": "3"})
    assert not os.path.exists(tmp_path / "run")


def test_refuses_to_overwrite(converted, st_dir, tmp_path):
    with pytest.raises(CheckpointError, match="already has a checkpoint"):
        convert.run_from_hf(st_dir, converted["st"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not an empty directory"):
        convert.run_to_hf(converted["st"], str(taken))
    assert os.listdir(taken) == ["keep.txt"]


# ---- The command line.


def jaxlm(*args):
    env = subprocess_env(PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "jaxlm", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=REPO,
        env=env,
        timeout=600,
    )


def jaxlm_in_process(capsys, *args):
    """``jaxlm ARGS`` run by the CLI's own ``execute`` in this process: the same messages and status
    without a fresh interpreter importing jax (~2.5 CPU-seconds per call)."""
    capsys.readouterr()
    status = cli.execute(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), status, out.out, out.err)


def _assert_one_line_error(result, fragment):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    assert fragment in lines[0], lines[0]


def test_cli_convert_then_greedy_generate_matches_pytorch(st_dir, tmp_path):
    workdir = str(tmp_path / "run")
    result = jaxlm("convert", "--from", "hf", st_dir, "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    prompt = "the quick brown"
    result = jaxlm("generate", "--workdir", workdir, "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]

    tok = tokenizers_lib.Tokenizer.from_file(os.path.join(st_dir, "tokenizer.json"))
    model = transformers.GPT2LMHeadModel.from_pretrained(st_dir).eval()
    ids = torch.tensor([tok.encode(prompt).ids])
    eos = tok.token_to_id(EOT)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    new = out[0, ids.shape[1] :].tolist()
    expected = prompt + tok.decode(new, skip_special_tokens=True)
    assert len(set(new)) > 2, new  # a meaningful comparison, not one token repeated
    assert result.stdout == expected + "\n" + "-" * 40 + "\n", (result.stdout, new)


def test_cli_bad_input(tmp_path, capsys):
    # One real process for the exit status and the single stderr line; the rest in-process.
    _assert_one_line_error(
        jaxlm("convert", "--from", "hf", str(tmp_path / "missing"), "--workdir", str(tmp_path / "a")), "not a directory"
    )
    run = functools.partial(jaxlm_in_process, capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(
        run("convert", "--from", "hf", str(empty), "--workdir", str(tmp_path / "b")), "has no config.json"
    )
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _assert_one_line_error(
        run("convert", "--from", "hf", str(llama), "--workdir", str(tmp_path / "c")),
        "model_type='llama' is not supported",
    )
    _assert_one_line_error(run("convert", "--from", "onnx", str(llama), "--workdir", str(tmp_path / "d")), "--from")
    _assert_one_line_error(
        run("convert", "--to", "hf", "--workdir", str(tmp_path / "nothing"), str(tmp_path / "e")), "does not exist"
    )
    assert not any(os.path.exists(tmp_path / name) for name in "abcde")
