"""Fine-tuning through `jaxlm train`: init_from by path, task heads, whole-split eval metrics, predict, resume."""

import dataclasses
import io
import json
import os

import pytest

from jaxlm import checkpoint, cli, config_lib
from jaxlm.common_types import CheckpointError
from jaxlm.main import evaluate, predict, train
from jaxlm.metric_writer import read_metrics

WORDS = {"pos": "good great fine nice happy".split(), "neg": "bad awful poor sad ugly".split()}


def _records(n, seed):
    out = []
    for i in range(n):
        label = "pos" if (i * 7 + seed) % 3 else "neg"
        words = WORDS[label]
        out.append({"text": " ".join(words[(i + k) % 5] for k in range(3 + i % 4)), "label": label})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    for split, n in (("train", 48), ("eval", 21)):  # 21: the last eval batch is partial
        with open(root / f"{split}.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in _records(n, len(split))) + "\n")
    base = _bert(root, "masked_lm")
    base.data.source, base.data.files = "files", str(root / "train.jsonl")
    pre = str(root / "pre")
    train.run(config_lib.validate(base), pre)
    return root, pre


def _bert(root, objective):
    c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "bert.py:size=tiny"))
    c.data.data_dir = str(root / "datasets")
    c.data.objective = objective
    c.data.seq_len, c.data.batch_size = 32, 8
    c.model.max_len = 64
    c.train.progress = False
    c.train.num_steps, c.train.eval_every, c.train.eval_steps = 4, 0, 2
    return c


def _classifier(root, pre, **over):
    c = _bert(root, "classification")
    c.data.source, c.data.format = "files", "jsonl"
    c.data.files, c.data.eval_files = str(root / "train.jsonl"), str(root / "eval.jsonl")
    c.task.labels = "neg,pos"
    c.checkpoint.init_from = pre
    c.train.eval_steps = 0  # the whole validation split
    for k, v in over.items():
        section, key = k.split("__")
        setattr(getattr(c, section), key, v)
    return config_lib.validate(c)


@pytest.fixture(scope="module")
def finetuned(world, tmp_path_factory):
    """One classifier fine-tuned from the base (init_from): its workdir, returned metrics, log and metrics file."""
    root, pre = world
    wd = str(tmp_path_factory.mktemp("finetuned") / "ft")
    log = io.StringIO()
    out = train.run(_classifier(root, pre), wd, stream=log)
    return wd, out, log.getvalue(), read_metrics(wd)


def test_init_from_loads_the_base_initializes_the_head_and_ignores_the_lm_heads(finetuned):
    _, out, log, records = finetuned
    line = next(x for x in log.splitlines() if x.startswith("init_from"))
    assert "initialized 2 tensors" in line and "head/classifier/kernel" in line
    assert "ignored 7 tensors" in line and "mlm/" in line  # the MLM and next-sentence heads
    # Whole split: 21 examples in batches of 8 -> 3 batches, accuracy over exactly 21.
    assert out["eval_batches"] == 3
    assert 0.0 <= out["eval_accuracy"] <= 1.0 and "eval_macro_f1" in out
    record = [r for r in records if "eval_accuracy" in r][-1]
    assert record["eval_metric_impl"].startswith("scikit-learn ")


def test_eval_and_predict_on_the_finetuned_workdir(finetuned, tmp_path):
    wd = finetuned[0]
    saved = config_lib.validate(config_lib.from_json(open(os.path.join(wd, "config.json")).read()))
    metrics = evaluate.run(saved, wd)
    assert metrics["eval_batches"] == 3 and "eval_accuracy" in metrics
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"text": "good great"}\n{"text": "bad awful", "id": 7}\n')
    assert predict.run(saved, wd, str(inp), str(outp)) == 2
    rows = [json.loads(x) for x in outp.read_text().splitlines()]
    assert rows[1]["id"] == 7 and all(r["label"] in ("neg", "pos") for r in rows)
    inp.write_text('{"text": "good"}\n{"txt": "bad"}\n')
    assert cli.execute(["predict", "--workdir", wd, "--input", str(inp), "--output", str(outp)]) == 2


def test_predict_errors_name_the_line(finetuned, tmp_path, capsys):
    wd = finetuned[0]
    inp = tmp_path / "in.jsonl"
    for text, message in (
        ('{"text": "ok"}\n{"txt": "x"}\n', "in.jsonl:2: no field 'text'"),
        ('{"text": 3}\n', "in.jsonl:1: field 'text' must be a string"),
        ('{"text": "' + "good " * 40 + '"}\n', "in.jsonl:1: is "),
        ("not json\n", "in.jsonl:1: not valid JSON"),
    ):
        inp.write_text(text)
        assert cli.execute(["predict", "--workdir", wd, "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()


def test_init_from_errors_are_one_line(world, tmp_path):
    root, pre = world
    with pytest.raises(CheckpointError, match="init_from=.*does not exist"):
        train.run(_classifier(root, str(tmp_path / "nowhere")), str(tmp_path / "a"))
    with pytest.raises(
        CheckpointError, match=r"parameter pos_embed/embedding has shape \(64, 64\) there but \(128, 64\)"
    ):
        train.run(_classifier(root, pre, model__max_len=128), str(tmp_path / "b"))


def test_resume_takes_precedence_over_init_from_and_is_exact(world, tmp_path, capsys):
    root, pre = world
    cfg = _classifier(root, pre, model__dropout_rate=0.1, train__log_every=1, checkpoint__every_steps=2)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.run(cfg, full)
    train.run(cfg, part, stop_at=2)
    assert checkpoint.latest_step(part) == 2
    capsys.readouterr()
    train.run(cfg, part)
    log = capsys.readouterr().out
    assert "resumed from" in log and "init_from" not in log

    def losses(wd):
        return {r["step"]: r["loss"] for r in read_metrics(wd) if "loss" in r}

    a, b = losses(full), losses(part)
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]


@pytest.mark.all_devices
@pytest.mark.slow
def test_finetuning_sharded_over_eight_devices_equals_one_device(world, tmp_path):
    import jax

    from jaxlm import sharding

    root, pre = world
    cfg = _classifier(root, pre, train__log_every=1)  # data parallel over the 8 simulated devices
    sharded = train.run(cfg, str(tmp_path / "eight"))
    original = sharding.make_mesh
    sharding.make_mesh = lambda c, devs=None: original(c, jax.devices()[:1])
    try:
        single = train.run(cfg, str(tmp_path / "one"))
    finally:
        sharding.make_mesh = original

    def losses(wd):
        return [r["loss"] for r in read_metrics(wd) if "loss" in r]

    assert losses(str(tmp_path / "eight")) == pytest.approx(losses(str(tmp_path / "one")), rel=1e-5, abs=1e-6)
    assert sharded["eval_accuracy"] == single["eval_accuracy"]


@pytest.mark.slow
def test_decoder_only_seq2seq_trains_evaluates_bleu_and_predicts_greedy_and_by_beam(world, tmp_path):
    root, _ = world
    c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "gpt.py:size=tiny"))
    c.data.data_dir = str(root / "datasets")
    c.data.source, c.data.format, c.data.objective = "files", "jsonl", "seq2seq"
    c.data.files, c.data.eval_files = str(root / "train.jsonl"), str(root / "eval.jsonl")
    c.data.fields = "source=text,target=label"
    c.data.seq_len, c.data.batch_size, c.task.targets_len = 32, 8, 6
    c.train.progress, c.train.num_steps, c.train.eval_every, c.train.eval_steps = False, 30, 0, 1
    cfg = config_lib.validate(c)
    wd = str(tmp_path / "s2s")
    out = train.run(cfg, wd)
    assert "eval_bleu" in out and out["eval_bleu_signature"].startswith("nrefs:1")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "good great fine"}\n{"text": "bad awful"}\n')
    greedy, beam = tmp_path / "greedy.jsonl", tmp_path / "beam.jsonl"
    predict.run(cfg, wd, str(inp), str(greedy))
    one_beam = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, beam_size=2, num_samples=1))
    predict.run(one_beam, wd, str(inp), str(beam))
    g = [json.loads(x)["label"] for x in greedy.read_text().splitlines()]
    b = [json.loads(x)["label"] for x in beam.read_text().splitlines()]
    assert len(g) == len(b) == 2 and all(isinstance(x, str) for x in g + b)
