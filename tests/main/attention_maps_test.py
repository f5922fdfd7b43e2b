"""``jaxlm attention``: heatmaps, index.html and statistics of converted GPT-2 / T5 models, checked
against the attention weights ``transformers`` returns (``output_attentions=True``)."""

import json
import os

import numpy as np
import pytest
import reference_libs

pytest.importorskip("matplotlib")
torch = reference_libs.importorskip("torch")
transformers = reference_libs.importorskip("transformers")
pytest.importorskip("safetensors")

from jaxlm import cli  # noqa: E402
from jaxlm.data import tokenizers  # noqa: E402
from jaxlm.main import attention, convert  # noqa: E402

BYTE = tokenizers.build("byte")
TEXT = "the cat sat"  # 11 byte tokens


def _convert(hf_model, tmp_path, name, **overrides):
    hf_model.save_pretrained(str(tmp_path / f"hf_{name}"))  # no tokenizer.json: bytes
    workdir = str(tmp_path / name)
    convert.run_from_hf(str(tmp_path / f"hf_{name}"), workdir, overrides=overrides, stream=open(os.devnull, "w"))
    return workdir


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=3, n_embd=24, n_positions=16, vocab_size=BYTE.vocab_size, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(config).eval(), tmp_path_factory.mktemp("gpt2")


def _stats(out):
    with open(os.path.join(out, attention.STATS_FILE)) as f:
        return json.load(f)


def _check_stack(stack, want_layers, queries, keys, out, *, distances=True):
    """Maps, files and statistics of one stack against ``want_layers`` (``[N, T, S]`` per layer)."""
    assert stack["queries"] == queries and stack["keys"] == keys
    maps = stack["maps"]
    assert [(m["layer"], m["head"]) for m in maps] == [(i, h) for i in range(len(want_layers)) for h in range(3)]
    for m in maps:
        w = want_layers[m["layer"]][m["head"]]
        np.testing.assert_allclose(m["entropy"], attention.attention_entropy(w), rtol=1e-4, atol=1e-5)
        if distances:
            np.testing.assert_allclose(m["mean_distance"], attention.mean_distance(w), rtol=1e-4, atol=1e-5)
        else:
            assert m["mean_distance"] is None
        with open(os.path.join(out, m["file"]), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("scan", [False, True])
def test_gpt2_maps_match_transformers(gpt2, tmp_path, capsys, scan):
    hf_model, root = gpt2
    workdir = _convert(hf_model, root, f"wd{int(scan)}", **({"model.scan_layers": "true"} if scan else {}))
    out = str(tmp_path / "maps")
    assert cli.execute(["attention", "--workdir", workdir, "--text", TEXT, "--out", out]) == 0
    assert "wrote 6 heatmaps" in capsys.readouterr().out
    ids = BYTE.encode(TEXT)
    with torch.no_grad():
        want = [
            a[0].numpy()
            for a in hf_model(torch.tensor(ids[None, :].astype(np.int64)), output_attentions=True).attentions
        ]
    stats = _stats(out)
    assert list(stats["stacks"]) == ["self"]
    _check_stack(stats["stacks"]["self"], want, list(TEXT), list(TEXT), out)
    index = open(os.path.join(out, attention.INDEX_FILE)).read()
    assert all(f"src='{m['file']}'" in index for m in stats["stacks"]["self"]["maps"])
    # Closed forms: uniform rows over k keys have entropy log k; the causal first row has distance 0.
    assert attention.attention_entropy(np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]) == pytest.approx(
        np.mean(np.log(np.arange(1, 5)))
    )
    assert attention.mean_distance(np.eye(3)) == 0.0


def test_t5_self_and_cross_attention_maps(tmp_path, capsys):
    torch.manual_seed(1)
    config = transformers.T5Config(
        vocab_size=BYTE.vocab_size + 100,  # room for the span-corruption sentinels
        d_model=24,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=3,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        attn_implementation="eager",
    )
    hf_model = transformers.T5ForConditionalGeneration(config).eval()
    workdir = _convert(hf_model, tmp_path, "t5", **{"model.max_len": "32"})
    out = str(tmp_path / "maps")
    target = "a dog"
    assert cli.execute(["attention", "--workdir", workdir, "--text", TEXT, "--target", target, "--out", out]) == 0
    assert "wrote 18 heatmaps" in capsys.readouterr().out
    x, y = BYTE.encode(TEXT), np.concatenate([[0], BYTE.encode(target)])
    with torch.no_grad():
        o = hf_model(
            input_ids=torch.tensor(x[None].astype(np.int64)),
            decoder_input_ids=torch.tensor(y[None].astype(np.int64)),
            output_attentions=True,
        )
    stats = _stats(out)
    dec = ["<start>", *target]
    _check_stack(stats["stacks"]["encoder"], [a[0].numpy() for a in o.encoder_attentions], list(TEXT), list(TEXT), out)
    _check_stack(stats["stacks"]["decoder"], [a[0].numpy() for a in o.decoder_attentions], dec, dec, out)
    cross = [a[0].numpy() for a in o.cross_attentions]
    _check_stack(stats["stacks"]["cross"], cross, dec, list(TEXT), out, distances=False)

    # Without --target the decoder reads its own greedy output.
    out2 = str(tmp_path / "maps2")
    assert cli.execute(["attention", "--workdir", workdir, "--text", TEXT, "--out", out2, "--max_new_tokens", "4"]) == 0
    assert len(_stats(out2)["stacks"]["cross"]["queries"]) in range(2, 6)


def test_bad_input_is_one_line(gpt2, tmp_path, capsys):
    hf_model, root = gpt2
    workdir = _convert(hf_model, root, "bad")
    out = str(tmp_path / "maps")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()  # the import's progress output
    cases = [
        (["--text", "x" * 17, "--out", out], "longer than the model's max_len=16"),
        (["--text", "", "--out", out], "--text is empty"),
        (["--text", "hi", "--out", str(tmp_path / "file")], "is a file"),
    ]
    for args, message in cases:
        assert cli.execute(["attention", "--workdir", workdir, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not os.path.exists(out)
