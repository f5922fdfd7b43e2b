"""The command line end to end, and its one-line errors (exit 2, nothing overwritten)."""

import contextlib
import hashlib
import io
import os
import subprocess
import sys

import pytest
from subprocess_env import subprocess_env

from jaxlm import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(REPO, "configs", "gpt.py")


def jaxlm(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=subprocess_env(),
        timeout=600,
    )


def run_in_process(*args):
    """``jaxlm ARGS`` through ``jaxlm.cli.execute`` in this process, stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.execute(list(args))
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())


def _tiny(workdir, data_dir, files, *extra):
    return [
        "--config",
        f"{GPT}:size=tiny",
        "--workdir",
        str(workdir),
        "--config.data.source=files",
        f"--config.data.files={files}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.document=line",
        "--config.train.progress=false",
        *extra,
    ]


def _snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _assert_one_line_error(result, fragment):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text("\n".join(f"def f{i}_{j}(x):\n    return x + {j}" for j in range(30)))
    workdir = tmp / "run"
    result = jaxlm(
        "train",
        *_tiny(
            workdir,
            tmp / "data",
            corpus / "*.txt",
            "--config.train.num_steps=12",
            "--config.train.log_every=4",
            "--config.checkpoint.every_steps=6",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, workdir, corpus


def test_train_writes_metrics_checkpoints_config_and_tensorboard(trained):
    _, workdir, _ = trained
    names = os.listdir(workdir)
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "checkpoints"} <= set(names)
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == 12
    import json

    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_keys = {"step", "loss", "tokens_per_s", "mfu", "lr"}
    assert any(train_keys <= set(r) for r in records)
    assert any({"eval_loss", "eval_perplexity"} <= set(r) for r in records)


def test_eval_and_generate_use_the_latest_checkpoint(trained):
    tmp, workdir, corpus = trained
    result = jaxlm("eval", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval_loss=" in result.stdout and "eval_perplexity=" in result.stdout
    held = tmp / "held.txt"
    held.write_text("def held(x):\n    return x\n" * 50)
    result = jaxlm("eval", "--workdir", str(workdir), f"--config.data.eval_files={held}")
    assert result.returncode == 0, result.stderr[-2000:]
    result = jaxlm(
        "generate",
        "--workdir",
        str(workdir),
        "--prompt",
        "def ",
        "--max_new_tokens",
        "20",
        "--temperature",
        "0.8",
        "--top_k",
        "20",
        "--top_p",
        "0.9",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def ")
    a = jaxlm("generate", "--workdir", str(workdir), "--prompt", "def ", "--max_new_tokens", "10", "--temperature", "0")
    b = jaxlm("generate", "--workdir", str(workdir), "--prompt", "def ", "--max_new_tokens", "10", "--temperature", "0")
    assert a.stdout == b.stdout and a.returncode == 0


def test_bad_inputs_give_one_line_exit_2_and_leave_the_workdir_alone(trained):
    tmp, workdir, corpus = trained
    before = _snapshot(workdir)
    cases = [
        (_tiny(workdir, tmp / "data", tmp / "missing*.txt"), "matches no files"),
        (_tiny(workdir, tmp / "data", corpus / "*.txt", "--config.model.num_layers=3"), "model.num_layers=2"),
        (_tiny(workdir, tmp / "data", corpus / "*.txt", "--config.model.num_heads=3"), "must divide"),
        (_tiny(workdir, tmp / "data", corpus / "*.txt", "--config.model.num_layerz=3"), "unknown key 'num_layerz'"),
        (_tiny(workdir, tmp / "data", corpus / "*.txt", "--bogus"), "unrecognized arguments: --bogus"),
        (["--config", "nope.py", "--workdir", str(workdir)], "no such file"),
    ]
    # The first case in a real process (exit status, one stderr line); the others through the CLI's
    # own execute() in this process: the same messages without importing jax anew each time.
    for i, (args, fragment) in enumerate(cases):
        _assert_one_line_error((jaxlm if i == 0 else run_in_process)("train", *args), fragment)
    _assert_one_line_error(run_in_process("generate", "--workdir", str(tmp / "nowhere")), "does not exist")
    _assert_one_line_error(jaxlm("frobnicate"), "invalid choice")
    assert _snapshot(workdir) == before


def test_workdir_that_is_a_file_and_empty_corpus(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "empty.txt").write_text("")
    # In this process (the test above runs `jaxlm train` as a real process for its exit status).
    _assert_one_line_error(run_in_process("train", *_tiny(a_file, tmp_path / "d", tmp_path / "empty.txt")), "is a file")
    _assert_one_line_error(
        run_in_process("train", *_tiny(tmp_path / "w", tmp_path / "d", tmp_path / "empty.txt")), "empty"
    )
    assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")
    assert a_file.read_text() == "x"


def test_info_prints_counts_flops_and_axes():
    result = jaxlm("info", "--config", f"{GPT}:size=tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    total = int(next(line for line in lines if line.startswith("parameters:")).split()[1].replace(",", ""))
    modules = [line for line in lines if line.startswith("  ") and line.split()[-1].replace(",", "").isdigit()]
    assert total == sum(int(line.split()[-1].replace(",", "")) for line in modules) > 0
    assert "FLOPs per token" in result.stdout
    assert "(vocab, embed)" in result.stdout and "(embed, heads, head_dim)" in result.stdout


def test_unreachable_coordinator_is_a_one_line_error(tmp_path, text_corpus):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = jaxlm(
        "train",
        *_tiny(tmp_path / "w", tmp_path / "d", text_corpus),
        "--coordinator_address",
        f"127.0.0.1:{port}",
        "--num_processes",
        "2",
        "--process_id",
        "1",
        "--distributed_timeout_s",
        "5",
    )
    _assert_one_line_error(result, "coordinator")
