"""Multi-process training on localhost: 2 processes x 4 CPU devices joined by jax.distributed (gloo).

The two-process run (``multihost_worker.py``) is compared with one process on this test's 8
devices fed the same global batches: each global batch of the two-process run is process 0's
rows followed by process 1's, each read from that process's shard of the documents, so the
one-process run reads both shards (``_two_host_batches``) and concatenates them.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, config_lib, distributed
from jaxlm.common_types import UserError
from jaxlm.data import pipeline, sources, tokenizers
from jaxlm.main import task_data, train
from jaxlm.metric_writer import read_metrics

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
RESUME_AT = 3
PROCESSES = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own 4 devices
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _write_corpus(directory):
    """Documents (lines) of different lengths, each with a unique marker ``dNNN``."""
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    os.makedirs(directory)
    n = 0
    for f in range(4):
        lines = []
        for _ in range(40):
            lines.append(f"d{n:03d} " + " ".join(rng.choice(words, size=int(rng.integers(2, 12)))))
            n += 1
        with open(os.path.join(directory, f"part{f}.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return os.path.join(directory, "*.txt")


def _config(files, data_dir, mesh):
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "gpt.py") + ":size=tiny")
    c.model.vocab_size = 264  # 263 byte-tokenizer ids, padded so that tensor=2 divides the vocabulary
    c.data.source = "files"
    c.data.files = files
    c.data.data_dir = data_dir
    c.data.document = "line"
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.train.num_steps = STEPS
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_steps = 1
    c.train.progress = False
    c.checkpoint.every_steps = RESUME_AT
    c.checkpoint.max_to_keep = 10
    # A constant learning rate: the compiled step then does not depend on num_steps, so the SIGTERM
    # test's 2,000-step run (same mesh) reuses this run's compilations from the session's cache, and
    # a shorter rerun is the same run.
    c.optim.schedule, c.optim.warmup_steps = "constant", 0
    for axis in ("data", "fsdp", "tensor", "sequence"):
        c.mesh.shape[axis] = mesh.get(axis, 1)
    return config_lib.validate(c)


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _start_training(port, config_json, workdir, record):
    """The PROCESSES worker processes of one multi-process training run."""
    return [
        subprocess.Popen(
            [sys.executable, WORKER, "train", str(i), str(PROCESSES), str(port), str(config_json), workdir, record],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_worker_env(),
        )
        for i in range(PROCESSES)
    ]


def _outputs(procs, timeout_message):
    """Each process's output once all have exited with status 0 (within 110 s)."""
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=110)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(timeout_message)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Train on 2 processes x 4 devices (mesh data=2, fsdp=2, tensor=2); returns what they did."""
    tmp = tmp_path_factory.mktemp("multihost")
    files = _write_corpus(str(tmp / "corpus"))
    cfg = _config(files, str(tmp / "datasets"), {"data": 2, "fsdp": 2, "tensor": 2})
    split_sources = sources.open_sources(cfg.data)  # prepared once here, not raced by the workers
    config_json = tmp / "config.json"
    config_json.write_text(config_lib.to_json(cfg))
    workdir, record = str(tmp / "two"), str(tmp / "record")
    port = _free_port()
    start = time.perf_counter()
    procs = _start_training(port, config_json, workdir, record)
    outputs = _outputs(procs, "the two-process run did not finish in 110 s")
    records = [dict(np.load(f"{record}.{i}.npz")) for i in range(PROCESSES)]
    return {
        "cfg": cfg,
        "tmp": tmp,
        "workdir": workdir,
        "records": records,
        "losses": _losses(workdir),
        "sources": split_sources,
        "seconds": time.perf_counter() - start,
        "output": outputs[0],
    }


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_8_devices(two_process_run):
    run = two_process_run
    assert "8 devices" in run["output"] and sorted(run["losses"]) == list(range(1, STEPS + 1))
    # One process reading the same 2 data shards sees the same global batches.
    raw = config_lib.from_json(config_lib.to_json(run["cfg"]))
    raw.data.num_shards = PROCESSES
    reference = str(run["tmp"] / "one")
    train.run(config_lib.validate(raw), reference)
    one = _losses(reference)
    rel = max(abs(one[s] - run["losses"][s]) / abs(one[s]) for s in one)
    print(f"2 processes x 4 devices vs 1 process x 8 devices: max relative loss difference {rel:.2e}")
    print(f"two-process run: {run['seconds']:.1f}s")
    for step in range(1, STEPS + 1):
        assert one[step] == pytest.approx(run["losses"][step], rel=1e-5), (step, one, run["losses"])


@pytest.mark.slow
def test_each_process_reads_only_its_shard_of_the_documents(two_process_run):
    run = two_process_run
    cfg, source = run["cfg"], run["sources"]["train"]
    tokenizer = tokenizers.build(cfg.data.tokenizer)
    texts = [source[i]["text"].decode() for i in range(len(source))]
    marker = re.compile(r"d\d{3}")
    seen = []
    for i, rec in enumerate(run["records"]):
        assert tuple(rec["shard"]) == (i, PROCESSES)
        # Reproduce the shard selection: this host's pipeline alone gives exactly its batches.
        ds = pipeline.lm_dataset(
            source,
            tokenizer,
            seq_len=cfg.data.seq_len,
            batch_size=cfg.data.batch_size // PROCESSES,
            seed=cfg.data.seed,
            shuffle=True,
            shard_index=i,
            shard_count=PROCESSES,
            prefetch=0,
            packing=task_data.lm_packing(cfg),
        )
        it = iter(ds)
        expected = np.stack([next(it)["inputs"] for _ in range(len(rec["inputs"]))])
        np.testing.assert_array_equal(rec["inputs"], expected)
        # And its batches hold documents of its shard only.
        words = set()
        for row in rec["inputs"].reshape(-1, cfg.data.seq_len):
            for document in np.split(row, np.flatnonzero(row == tokenizer.eos_id)):
                words.update(tokenizer.decode(document).split())
        markers = {w for w in words if marker.fullmatch(w)}
        mine = {marker.match(t).group() for t in texts[i::PROCESSES]}
        assert markers and markers <= mine, sorted(markers - mine)
        seen.append(markers)
    assert not seen[0] & seen[1]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process_with_another_mesh(two_process_run):
    run = two_process_run
    resumed = str(run["tmp"] / "resumed")
    shutil.copytree(run["workdir"], resumed)
    for step in os.listdir(os.path.join(resumed, checkpoint.CHECKPOINT_DIR)):
        if step.isdigit() and int(step) > RESUME_AT:
            shutil.rmtree(os.path.join(resumed, checkpoint.CHECKPOINT_DIR, step))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    assert checkpoint.latest_step(resumed) == RESUME_AT
    cfg = config_lib.validate(_with_mesh(run["cfg"], {"fsdp": 8}))
    lines = []
    train.run(cfg, resumed, stream=_Lines(lines))
    assert any(f"at step {RESUME_AT}" in line for line in lines), lines
    assert any("'fsdp': 8" in line for line in lines), lines
    after = _losses(resumed)
    assert sorted(after) == list(range(RESUME_AT + 1, STEPS + 1))
    rel = max(abs(after[s] - run["losses"][s]) / abs(after[s]) for s in after)
    print(f"resumed on 1 process, fsdp=8, vs uninterrupted 2 processes: max relative loss difference {rel:.2e}")
    for step in after:
        assert after[step] == pytest.approx(run["losses"][step], rel=1e-5), (step, after, run["losses"])


@pytest.mark.slow
def test_checkpoint_holds_the_data_state_of_every_process(two_process_run):
    run = two_process_run
    states = [json.loads(str(rec["states"][RESUME_AT - 1])) for rec in run["records"]]
    # Rows at random offsets (packing='windows', the default for local files): each shard's state is
    # its row index, the same on both processes; each must still be saved under its own shard.
    assert all(set(state) == {"next_index"} for state in states), states
    manager = checkpoint.make_manager(run["workdir"], run["cfg"].checkpoint, read_only=True)
    import orbax.checkpoint as ocp

    saved = manager.restore(RESUME_AT, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    manager.close()
    assert saved["num_shards"] == PROCESSES
    for shard, state in enumerate(states):  # process i reads shard i; every position is saved
        assert saved["shards"][str(shard)] == state


def _with_mesh(cfg, mesh):
    raw = config_lib.from_json(config_lib.to_json(cfg))
    for axis in ("data", "fsdp", "tensor", "sequence"):
        raw.mesh.shape[axis] = mesh.get(axis, 1)
    return raw


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.extend(t for t in text.splitlines() if t)

    def flush(self):
        pass


# ---- Joining: errors instead of hangs.


def _join(process_id, port, timeout_s):
    return subprocess.Popen(
        [sys.executable, WORKER, "join", str(process_id), str(PROCESSES), str(port), str(timeout_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_env(),
    )


def test_a_process_that_cannot_reach_the_coordinator_fails_in_one_line():
    # Process 1 with no coordinator, and a coordinator (process 0) whose peer never starts.
    lone_worker, lone_coordinator = _join(1, _free_port(), 5), _join(0, _free_port(), 5)
    start = time.perf_counter()
    results = [p.communicate(timeout=90) + (p.returncode,) for p in (lone_worker, lone_coordinator)]
    assert time.perf_counter() - start < 60
    for (_out, err, code), process in zip(results, (1, 0)):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (code, err[-2000:])
        assert len(lines) == 1, err[-2000:]
        assert "within 5 s" in lines[0] and f"(process {process} of 2, from flags)" in lines[0], lines[0]
        assert "127.0.0.1:" in lines[0]
    assert "could not reach the coordinator at 127.0.0.1:" in results[0][1]
    assert "the other 1 process(es) did not reach the coordinator" in results[1][1]


# ---- Where the process group comes from.


def test_single_process_needs_no_initialization():
    assert distributed.detect(environ={}) is None
    assert distributed.detect("127.0.0.1:1234", 1, 0, environ={}) is None


def test_flags_describe_the_process_group():
    group = distributed.detect("10.0.0.2:1234", 4, 3, environ={"SLURM_NTASKS": "8"})
    assert (group.coordinator_address, group.num_processes, group.process_id, group.source) == (
        "10.0.0.2:1234",
        4,
        3,
        "flags",
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("10.0.0.2:1234", 2, None), "--coordinator_address, --num_processes given without --process_id"),
        (("10.0.0.2", 2, 0), "is not HOST:PORT"),
        (("10.0.0.2:1234", 2, 2), "--process_id=2 must be in [0, --num_processes=2)"),
    ],
)
def test_bad_flags_are_user_errors(args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        distributed.detect(*args, environ={})


def test_slurm_job_step_is_detected():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "gpu[07-10]",
        "SLURM_STEP_NUM_NODES": "4",
    }
    group = distributed.detect(environ=env)
    assert group.coordinator_address == f"gpu07:{4242 % 4096 + 61440}"
    assert (group.num_processes, group.process_id, group.local_device_ids) == (4, 2, None)
    assert "SLURM_NTASKS=4" in group.source
    # Two tasks per node: each process drives one local device, as JAX's own SLURM detection does.
    two_per_node = {**env, "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1", "JAX_COORDINATOR_PORT": "999"}
    group = distributed.detect(environ=two_per_node)
    assert group.local_device_ids == (1,) and group.coordinator_address == "gpu07:999"
    # One task (e.g. a batch script outside srun) is a single process.
    assert distributed.detect(environ={**env, "SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize(
    "nodelist, first", [("node001", "node001"), ("a1,b2", "a1"), ("gpu[01-04,07],cpu1", "gpu01"), ("n[3,5]", "n3")]
)
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_cloud_tpu_vm_leaves_detection_to_jax(monkeypatch):
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    distributed.initialize(timeout_s=10)
    assert len(calls) == 1 and "coordinator_address" not in calls[0]
    assert calls[0]["initialization_timeout"] > 10


def test_initialize_passes_the_flags_and_keeps_jax_detection_off(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    distributed.initialize("127.0.0.1:1234", 2, 1, timeout_s=7)
    (kw,) = calls
    assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == ("127.0.0.1:1234", 2, 1)
    assert kw["cluster_detection_method"] == "deactivate" and kw["local_device_ids"] is None
    assert kw["initialization_timeout"] > 7  # JAX's own (fatal) deadline comes after ours


def test_a_join_that_hangs_becomes_a_user_error(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: release.wait(30))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"could not reach the coordinator at 10\.1\.2\.3:4 within 0\.5 s \(process 1"):
        distributed.initialize("10.1.2.3:4", 3, 1, timeout_s=0.5)
    release.set()
    assert time.perf_counter() - start < 5


def test_a_port_in_use_becomes_a_user_error(monkeypatch):
    def fail(**kw):
        raise RuntimeError("UNKNOWN: Failed to start RPC server")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(UserError, match="Failed to start RPC server; the port is probably in use"):
        distributed.initialize("127.0.0.1:4", 2, 0, timeout_s=5)


# ---- Preemption with several processes: they agree on the step.


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    """SIGTERM reaches only process 1 (not the one writing metrics); both save one step and exit 0."""
    files = _write_corpus(str(tmp_path / "corpus"))
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}  # two_process_run's: its compiled programs are reused
    raw = config_lib.from_json(config_lib.to_json(_config(files, str(tmp_path / "datasets"), mesh)))
    raw.train.num_steps = 2000
    raw.train.log_every = 3  # the processes compare their SIGTERM flags every 3 steps
    raw.checkpoint.every_steps = 10_000
    assert (raw.optim.schedule, raw.optim.warmup_steps) == ("constant", 0)  # so a shorter rerun is the same run
    cfg = config_lib.validate(raw)
    sources.open_sources(cfg.data)
    config_json = tmp_path / "config.json"
    config_json.write_text(config_lib.to_json(cfg))
    workdir, port = str(tmp_path / "two"), _free_port()
    procs = _start_training(port, config_json, workdir, str(tmp_path / "record"))
    deadline = time.time() + 110
    while time.time() < deadline and not _losses(workdir) and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _outputs(procs, "the processes did not stop within 110 s of SIGTERM")
    said = [re.findall(r"preempted: saved step (\d+)", out) for out in outputs]
    assert said[0] and said[0] == said[1], said  # both stopped, at the same step
    saved = int(said[0][0])
    assert saved % cfg.train.log_every == 0 and saved < cfg.train.num_steps
    assert checkpoint.latest_step(workdir) == saved
    # Resume (here on one process with the same 2 data shards) and compare with an uninterrupted run.
    end = saved + 3
    shorter = config_lib.from_json(config_lib.to_json(cfg))
    shorter.train.num_steps, shorter.data.num_shards = end, PROCESSES
    shorter = config_lib.validate(shorter)
    train.run(shorter, workdir)
    fresh = str(tmp_path / "fresh")
    train.run(shorter, fresh)
    resumed, uninterrupted = _losses(workdir), _losses(fresh)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(cfg.train.log_every, end + 1, cfg.train.log_every))
    for step in uninterrupted:  # before the SIGTERM (2 processes) and after the resume (1 process)
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), (step, resumed, uninterrupted)
