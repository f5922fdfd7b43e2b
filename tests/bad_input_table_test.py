"""The bad-input table: every mistake a user can make in a config, the data or the command line
gives one line naming the field and the fix, exit status 2, and leaves what a workdir already
holds (checkpoints, metrics, config) untouched."""

import hashlib
import os
import shutil

import pytest

from jaxlm import cli
from jaxlm.checkpoint import DISK_FULL_AT_SAVE_ENV
from jaxlm.main import lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(REPO, "configs", "gpt.py") + ":size=tiny"
BERT = os.path.join(REPO, "configs", "bert.py") + ":size=tiny"


def _snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, an empty file, a bad-UTF-8 file and a workdir trained for 4 steps."""
    tmp = tmp_path_factory.mktemp("bad")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text("".join(f"line {i} {j} of some text\n" for j in range(60)))
    (tmp / "empty.txt").write_text("")
    (tmp / "one_byte.txt").write_text("a")
    (tmp / "short.txt").write_text("a few\nshort\nlines\nof text\n")
    (tmp / "a_file").write_text("not a directory")
    (tmp / "syntax.py").write_text(
        "from jaxlm import config_lib\n\ndef get_config(arg):\n    return config_lib.base_config(\n"
    )
    (tmp / "raises.py").write_text(
        "from jaxlm import config_lib\n\ndef get_config(arg):\n    c = config_lib.base_config()\n    c.seed = 1 // 0\n"
    )
    (tmp / "bad_saved").mkdir()
    (tmp / "bad_saved" / "config.json").write_text('{"model": {"num_layers": "four"}}')
    world = {"tmp": tmp, "corpus": str(corpus / "*.txt"), "data": str(tmp / "data"), "run": str(tmp / "run")}
    status = cli.execute(
        ["train", *_base(world, world["run"]), "--config.train.num_steps=4", "--config.checkpoint.every_steps=2"]
    )
    assert status == 0
    held = lock.acquire(str(tmp / "locked"))  # as if another `jaxlm train` were running there
    yield world
    held.release()


def _base(world, workdir, config=GPT):
    return [
        "--config",
        config,
        "--workdir",
        str(workdir),
        "--config.data.source=files",
        f"--config.data.files={world['corpus']}",
        f"--config.data.data_dir={world['data']}",
        "--config.train.progress=false",
        "--config.train.eval_steps=1",
        "--config.data.document=line",
    ]


def _train(extra, config=GPT, workdir_key="run"):
    return lambda w: [
        "train",
        *_base(w, w[workdir_key] if workdir_key in w else w["tmp"] / workdir_key, config),
        *extra,
    ]


CASES = {
    # --- config: types, ranges, divisibility, unknown keys, combinations
    "int-type": (_train(["--config.model.num_layers=abc"]), "config.model.num_layers=abc: expected an integer"),
    "zero-layers": (_train(["--config.model.num_layers=0"], workdir_key="n1"), "config.model.num_layers=0 must be > 0"),
    "heads-divide": (_train(["--config.model.num_heads=3"], workdir_key="n2"), "must divide config.model.embed_dim"),
    "kv-heads": (_train(["--config.model.num_kv_heads=3"], workdir_key="n3"), "num_kv_heads=3 must divide"),
    "dropout-range": (_train(["--config.model.dropout_rate=1.5"], workdir_key="n4"), "dropout_rate=1.5 must be in"),
    "lr-positive": (_train(["--config.optim.lr=0"], workdir_key="n5"), "config.optim.lr=0.0 must be > 0"),
    "lr-nan": (_train(["--config.optim.lr=nan"], workdir_key="n57"), "error: config.optim.lr=nan must be finite"),
    "betas": (_train(["--config.optim.b1=1.5"], workdir_key="n6"), "b1 and b2 must be in [0, 1)"),
    "accum-divide": (_train(["--config.optim.grad_accum_steps=3"], workdir_key="n7"), "grad_accum_steps=3 must divide"),
    "seq-vs-max-len": (_train(["--config.data.seq_len=100000"], workdir_key="n8"), "exceeds config.model.max_len"),
    "batch-positive": (_train(["--config.data.batch_size=0"], workdir_key="n9"), "batch_size=0 must be > 0"),
    "position-name": (_train(["--config.model.position=rotary"], workdir_key="n10"), "is not one of"),
    "kind-name": (_train(["--config.model.kind=gpt"], workdir_key="n11"), "config.model.kind='gpt' is not one of"),
    "unknown-key": (_train(["--config.model.nope=1"], workdir_key="n12"), "unknown key 'nope'"),
    "unknown-section": (_train(["--config.nosection.x=1"], workdir_key="n13"), "unknown key 'nosection'"),
    "bool-type": (_train(["--config.model.tie_embeddings=maybe"], workdir_key="n14"), "expected true or false"),
    "section-value": (_train(["--config.model=3"], workdir_key="n15"), "is a section"),
    "rope-odd-head": (
        _train(["--config.model.position=rope", "--config.model.num_heads=64"], workdir_key="n16"),
        "needs an even head dim",
    ),
    "alibi-encoder": (_train(["--config.model.position=alibi"], config=BERT, workdir_key="n17"), "'alibi'"),
    "objective-kind": (_train(["--config.data.objective=masked_lm"], workdir_key="n18"), "does not train"),
    "mesh-devices": (_train(["--config.mesh.shape.data=3"], workdir_key="n19"), "8 devices"),
    "mesh-divides-dim": (
        _train(["--config.mesh.shape.data=1", "--config.mesh.shape.tensor=8"], workdir_key="n20"),
        "do not divide",
    ),
    "rule-axis": (_train(["--config.sharding.rules.embed=model"], workdir_key="n21"), "'model' is not a mesh axis"),
    "num-steps": (_train(["--config.train.num_steps=-5"], workdir_key="n22"), "num_steps=-5 must be > 0"),
    "tokenizer-name": (_train(["--config.data.tokenizer=nope"], workdir_key="n23"), "config.data.tokenizer='nope'"),
    "hf-needs-path": (_train(["--config.data.tokenizer=hf"], workdir_key="n24"), "tokenizer_path"),
    "float16-on-cpu": (_train(["--config.model.dtype=float16"], workdir_key="n31"), "use bfloat16 or float32"),
    "peak-flops": (
        _train(["--config.train.peak_flops=-1"], workdir_key="n40"),
        "config.train.peak_flops must be >= 0 (FLOP/s per device; 0 = by device kind)",
    ),
    "cond-update": (_train(["--config.train.cond_update=no"], workdir_key="n41"), "config.train.cond_update='no'"),
    # --- data
    "files-empty-glob": (_train(["--config.data.files="], workdir_key="n25"), "config.data.files is empty"),
    "files-missing": (
        lambda w: ["train", *_base(w, w["tmp"] / "n26"), f"--config.data.files={w['tmp']}/nope*.txt"],
        "matches no files",
    ),
    "files-all-empty": (
        lambda w: ["train", *_base(w, w["tmp"] / "n27"), f"--config.data.files={w['tmp']}/empty.txt"],
        "are empty",
    ),
    "eval-files-missing": (
        _train(["--config.data.eval_files=/nonexistent/*.txt"], workdir_key="n28"),
        "config.data.eval_files",
    ),
    # --- command line and paths
    "unknown-flag": (_train(["--bogus"], workdir_key="n29"), "unrecognized arguments: --bogus"),
    "missing-workdir": (lambda w: ["train", "--config", GPT], "the following arguments are required: --workdir"),
    "config-file-missing": (
        lambda w: ["train", "--config", "nope.py", "--workdir", str(w["tmp"] / "n30")],
        "no such file",
    ),
    "workdir-is-file": (lambda w: ["train", *_base(w, w["tmp"] / "a_file")], "is a file, not a directory"),
    "workdir-unwritable": (lambda w: ["train", *_base(w, "/sys/jaxlm-workdir")], "/sys/jaxlm-workdir"),
    "unknown-command": (lambda w: ["frobnicate"], "invalid choice: 'frobnicate'"),
    "generate-no-workdir": (lambda w: ["generate", "--workdir", str(w["tmp"] / "nowhere")], "does not exist"),
    "generate-too-long": (lambda w: ["generate", "--workdir", w["run"], "--prompt", "x" * 300], "exceeds the model's"),
    "generate-top-p": (lambda w: ["generate", "--workdir", w["run"], "--top_p", "0"], "config.decode.top_p"),
    "incompatible-checkpoint": (_train(["--config.model.num_layers=3"]), "holds a run with model.num_layers=2"),
    "incompatible-tokenizer": (_train(["--config.data.tokenizer=char"]), "tokenizer"),
    # --- reliability (issue 17): config-file code, paths, sizes, a busy workdir, a damaged config.json
    "config-syntax-error": (
        lambda w: ["train", "--config", str(w["tmp"] / "syntax.py"), "--workdir", str(w["tmp"] / "n50")],
        "syntax.py:4: SyntaxError: '(' was never closed",
    ),
    "config-raises": (
        lambda w: ["info", "--config", str(w["tmp"] / "raises.py")],
        "raises.py:5: ZeroDivisionError: integer division or modulo by zero (in get_config)",
    ),
    "workdir-under-a-file": (
        lambda w: ["train", *_base(w, w["tmp"] / "a_file" / "run")],
        "a_file is a file, not a directory",
    ),
    "data-dir-under-a-file": (
        lambda w: ["train", *_base(w, w["tmp"] / "n51"), f"--config.data.data_dir={w['tmp'] / 'a_file' / 'd'}"],
        "a_file/d' cannot be created (Not a directory)",
    ),
    "corpus-one-byte": (
        lambda w: ["train", *_base(w, w["tmp"] / "n52"), f"--config.data.files={w['tmp']}/one_byte.txt"],
        "the train split comes out empty (train: 1 records, validation: 1 records)",
    ),
    "corpus-below-one-row": (
        lambda w: ["train", *_base(w, w["tmp"] / "n53"), f"--config.data.files={w['tmp']}/short.txt"],
        "fewer than one row of config.data.seq_len + 1 = 65 tokens",
    ),
    "validation-empty": (
        _train(["--config.data.source=synthetic", "--config.data.synthetic.num_eval_tokens=0"], workdir_key="n54"),
        "the validation split comes out empty",
    ),
    "sentencepiece-vocab-too-large": (
        _train(
            ["--config.data.tokenizer=sentencepiece_bpe", "--config.data.tokenizer_vocab_size=5000"], workdir_key="n55"
        ),
        "Vocabulary size too high (5000): the corpus supports at most",
    ),
    "compile-cache-under-a-file": (
        lambda w: [
            "train",
            *_base(w, w["tmp"] / "n56"),
            "--config.train.num_steps=1",
            f"--config.train.compile_cache_dir={w['tmp'] / 'a_file' / 'xla'}",
        ],
        "a_file/xla",
    ),
    "workdir-in-use": (
        lambda w: ["train", *_base(w, w["tmp"] / "locked")],
        f"is in use by jaxlm train (pid {os.getpid()}",
    ),
    "saved-config-wrong-type": (
        lambda w: ["eval", "--workdir", str(w["tmp"] / "bad_saved")],
        "config.json: saved config: model.num_layers='four' must be an integer",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(name, world, capsys):
    argv_fn, fragment = CASES[name]
    before = _snapshot(world["run"])
    capsys.readouterr()
    status = cli.execute([str(a) for a in argv_fn(world)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert _snapshot(world["run"]) == before


def test_disk_full_during_save_keeps_earlier_checkpoints_and_metrics(world, capsys, monkeypatch):
    # The earlier run: a copy of the fixture's finished 4-step run (checkpoints 2 and 4), resumed to
    # 6 steps with the disk full at the step-6 save (one run to compile here instead of two).
    workdir = world["tmp"] / "full"
    shutil.copytree(world["run"], workdir)
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [2, 4]
    before = _snapshot(workdir)
    metrics_before = (workdir / "metrics.jsonl").read_text()
    monkeypatch.setenv(DISK_FULL_AT_SAVE_ENV, "6")
    capsys.readouterr()
    status = cli.execute(
        ["train", *_base(world, workdir), "--config.train.num_steps=6", "--config.checkpoint.every_steps=2"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "No space left on device" in err[0], err
    after = _snapshot(workdir)
    for name, digest in before.items():
        # The step-2 and step-4 checkpoints and the tokenizer are untouched (config.json records
        # the new num_steps; metrics and event files are appended to).
        if name not in ("metrics.jsonl", "config.json") and not name.startswith("events."):
            assert after.get(name) == digest, name
    metrics_after = (workdir / "metrics.jsonl").read_text()
    assert metrics_after.startswith(metrics_before) and len(metrics_after) > len(metrics_before)
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [2, 4]


def test_table_has_at_least_30_cases():
    assert len(CASES) >= 30
