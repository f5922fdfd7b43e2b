"""One writer per workdir: the lock file, its stale takeover, and two real `jaxlm train` processes."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from subprocess_env import subprocess_env

from jaxlm import cli
from jaxlm.common_types import CheckpointError
from jaxlm.main import lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPT = os.path.join(REPO, "configs", "gpt.py") + ":size=tiny"


def _env():
    return subprocess_env(PYTHONPATH=REPO)


def _losses(workdir):
    """Steps with a logged loss; tolerant of a line being written right now."""
    path = os.path.join(workdir, "metrics.jsonl")
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "loss" in record:
                    out.append(record["step"])
    return out


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}): {err[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_second_lock_is_refused_naming_the_holder_and_released_lock_is_free(tmp_path):
    workdir = str(tmp_path / "w")
    first = lock.acquire(workdir)
    assert first.held and os.path.isdir(workdir)
    record = lock.read_holder(workdir)
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
    with pytest.raises(CheckpointError, match=rf"is in use by jaxlm train \(pid {os.getpid()} on host"):
        lock.acquire(workdir)
    first.release()
    assert not os.path.exists(os.path.join(workdir, lock.LOCK_FILE))
    assert not os.path.exists(workdir)  # created by the lock, nothing written: removed again
    second = lock.acquire(workdir)
    (tmp_path / "w" / "kept").write_text("x")
    second.release()
    assert os.path.isdir(workdir)  # not empty: kept


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_notice(tmp_path):
    workdir = str(tmp_path / "w")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from jaxlm.main import lock; lock.acquire(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(600)",
            workdir,
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
        lock.acquire(workdir)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    notices = io.StringIO()
    taken = lock.acquire(workdir, stream=notices)
    lines = notices.getvalue().strip().splitlines()
    assert len(lines) == 1 and "taking over the lock left by" in lines[0] and "no longer running" in lines[0]
    assert f"pid {holder.pid}" in lines[0]
    assert lock.read_holder(workdir)["pid"] == os.getpid()
    taken.release()


def test_without_os_locks_the_record_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_flock", lambda fd: None)  # a filesystem without flock
    workdir = tmp_path / "w"
    workdir.mkdir()
    path = workdir / lock.LOCK_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "started": "t"}))
        with pytest.raises(CheckpointError, match=f"pid {sleeper.pid}"):
            lock.acquire(str(workdir))
    finally:
        sleeper.kill()
        sleeper.wait()
    # Same host, process gone: stale.
    notices = io.StringIO()
    lock.acquire(str(workdir), stream=notices).release()
    assert "no longer running" in notices.getvalue()
    # Another host cannot be checked: refused, with how to clear it.
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}))
    with pytest.raises(CheckpointError, match="if no run uses it any more, delete .*\\.lock"):
        lock.acquire(str(workdir))


def test_unwritable_workdirs_are_one_line_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="Not a directory.*a part of the path is a file"):
        lock.acquire(str(blocker / "sub" / "w"))


def _train_args(workdir, corpus, data_dir, steps, *extra):
    return [
        sys.executable,
        "-m",
        "jaxlm",
        "train",
        "--config",
        GPT,
        "--workdir",
        str(workdir),
        "--config.data.source=files",
        f"--config.data.files={corpus}",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.eval_steps=1",
        "--config.train.progress=false",
        *extra,
    ]


@pytest.mark.slow
def test_two_train_processes_on_one_workdir_and_a_stale_lock_after_kill_9(text_corpus, tmp_path):
    workdir, data_dir = tmp_path / "w", tmp_path / "d"
    first = subprocess.Popen(
        _train_args(workdir, text_corpus, data_dir, 100_000, "--config.checkpoint.every_steps=5"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _losses(str(workdir)), first)
        second = subprocess.run(
            _train_args(workdir, text_corpus, data_dir, 10), env=_env(), capture_output=True, text=True, timeout=300
        )
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2, second.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: --workdir "), second.stderr
        assert f"is in use by jaxlm train (pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert "use another --workdir" in lines[0]
        assert first.poll() is None  # the first run goes on, untouched
        before = len(_losses(str(workdir)))
        _wait_for(lambda: len(_losses(str(workdir))) > before + 2, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert lock.read_holder(str(workdir))["pid"] == first.pid  # left behind by kill -9
    steps = _losses(str(workdir))
    third = subprocess.run(
        _train_args(workdir, text_corpus, data_dir, max(steps) + 2), env=_env(), capture_output=True, text=True
    )
    assert third.returncode == 0, third.stderr[-3000:]
    notices = [line for line in third.stderr.splitlines() if "taking over the lock" in line]
    assert len(notices) == 1 and f"pid {first.pid}" in notices[0] and "no longer running" in notices[0]
    assert "resumed from" in third.stdout
    assert not os.path.exists(workdir / lock.LOCK_FILE)


def _tree(path):
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_mtime_ns, st.st_size)
    return out


def test_readers_need_no_lock_and_never_write_checkpoints(text_corpus, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    base = [
        "--config.data.source=files",
        f"--config.data.files={text_corpus}",
        f"--config.data.data_dir={tmp_path / 'd'}",
    ]
    assert (
        cli.execute(
            ["train", "--config", GPT, "--workdir", workdir, *base]
            + ["--config.train.num_steps=2", "--config.train.progress=false", "--config.train.eval_steps=1"]
        )
        == 0
    )
    checkpoints = os.path.join(workdir, "checkpoints")
    before = _tree(checkpoints)
    held = lock.acquire(workdir)  # as if a training run were going on
    try:
        assert cli.execute(["eval", "--workdir", workdir, "--config.train.eval_steps=1"]) == 0
        assert cli.execute(["generate", "--workdir", workdir, "--prompt", "the", "--max_new_tokens", "4"]) == 0
        assert cli.execute(["info", "--config", GPT]) == 0
        assert lock.read_holder(workdir)["pid"] == os.getpid()
    finally:
        held.release()
    assert _tree(checkpoints) == before
    capsys.readouterr()


_JOIN_AND_LOCK = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
from jaxlm.common_types import UserError
from jaxlm.main import lock
# The result goes to a file: gloo writes to stdout too, even in the middle of a line.
with open(sys.argv[4], "w") as out:
    try:
        held = lock.acquire(sys.argv[3])
    except UserError as e:
        out.write(f"refused: {e}")
    else:
        out.write("held" if held.held else "not held")
        held.release()
"""


def _two_processes(workdir):
    results = [os.path.join(os.path.dirname(workdir), f"result{i}-{time.monotonic_ns()}") for i in range(2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _JOIN_AND_LOCK, str(i), port, workdir, results[i]],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        try:
            p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    outs = []
    for path in results:
        with open(path) as f:
            outs.append(f.read().strip())
    return outs


@pytest.mark.slow
def test_with_several_processes_process_0_takes_the_lock_and_all_stop_if_it_is_taken(tmp_path):
    workdir = str(tmp_path / "w")
    assert _two_processes(workdir) == ["held", "not held"]
    taken = lock.acquire(workdir)  # another run holds it
    try:
        first, second = _two_processes(workdir)
    finally:
        taken.release()
    assert first.startswith("refused:") and f"pid {os.getpid()}" in first
    assert second.startswith("refused:") and "cannot be locked by process 0" in second
