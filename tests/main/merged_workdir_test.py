"""The workdir ``jaxlm merge`` writes is an ordinary run: ``eval``, ``generate``, ``predict`` and
``convert --to hf`` accept it (one tiny LoRA run on a decoder-only seq2seq task, trained once)."""

import json
import os

import jax
import numpy as np
import pytest

from jaxlm import cli, config_lib
from jaxlm.main import restore, train
from jaxlm.main import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = {"pos": "good great fine nice happy".split(), "neg": "bad awful poor sad ugly".split()}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """``(root, the LoRA run's workdir, the merged workdir)``."""
    root = tmp_path_factory.mktemp("merged")
    for split, n in (("train", 32), ("eval", 8)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = "pos" if i % 3 else "neg"
                text = " ".join(WORDS[label][(i + k) % 5] for k in range(3 + i % 3))
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "gpt.py") + ":size=tiny")
    c.data.data_dir = str(root / "datasets")
    c.data.source, c.data.format, c.data.objective = "files", "jsonl", "seq2seq"
    c.data.files, c.data.eval_files = str(root / "train.jsonl"), str(root / "eval.jsonl")
    c.data.fields = "source=text,target=label"
    c.data.seq_len, c.data.batch_size, c.task.targets_len = 32, 8, 6
    c.train.progress, c.train.num_steps, c.train.eval_every, c.train.eval_steps = False, 3, 0, 1
    c.optim.lr, c.optim.warmup_steps = 1e-2, 0
    c.peft.method, c.peft.rank = "lora", 2  # on the seed's initialization (no init_from): a base all the same
    c.decode.max_new_tokens = 4
    run = str(root / "lora")
    train.run(config_lib.validate(c), run, stream=open(os.devnull, "w"))
    out = str(root / "merged")
    assert cli.execute(["merge", "--workdir", run, "--out", out]) == 0
    return root, run, out


@pytest.mark.slow
def test_merged_workdir_is_accepted_by_eval_generate_predict_and_convert(merged, capsys):
    root, _, out = merged
    config = config_lib.validate(workdir_lib.saved_config(out))
    assert config.peft.method == "none" and config.checkpoint.init_from == ""
    _, params, _, step = restore.open_trained(config, out)
    assert step == 3 and "blocks" in params  # full parameters, no trainable tree

    capsys.readouterr()
    assert cli.execute(["eval", "--workdir", out]) == 0
    assert "bleu" in capsys.readouterr().out

    assert cli.execute(["generate", "--workdir", out, "--prompt", "good", "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()

    inp, pred = root / "in.jsonl", root / "pred.jsonl"
    inp.write_text('{"text": "good great fine"}\n{"text": "bad awful"}\n')
    assert cli.execute(["predict", "--workdir", out, "--input", str(inp), "--output", str(pred)]) == 0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["label"], str) for r in rows)

    exported = str(root / "hf")
    assert cli.execute(["convert", "--to", "hf", "--workdir", out, exported]) == 0
    with open(os.path.join(exported, "config.json")) as f:
        assert json.load(f)["model_type"] == "gpt2"
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    tokens = np.random.default_rng(0).integers(1, 200, size=(1, 8))
    exp, params, _, _ = restore.open_trained(config, out)
    want = np.asarray(jax.jit(lambda p: exp.model.apply({"params": p}, tokens))(jax.device_get(params)))
    with torch.no_grad():
        got = model(input_ids=torch.tensor(tokens)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4
