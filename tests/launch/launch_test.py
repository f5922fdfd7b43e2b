"""Tests of the launch scripts through their --dry-run output: the exact commands they would run.

Neither gcloud nor SLURM is needed. Remote command strings and srun task scripts are also run
locally, against a fake `jaxlm` that records its arguments, to check the quoting end to end.
"""

import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU_VM = ROOT / "launch" / "tpu_vm.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sbatch"
BASH = shutil.which("bash")

NAME = "lm-test"
ZONE = "us-west4-a"
WHERE = ["--name", NAME, "--zone", ZONE]
CREATE = [*WHERE, "--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite"]
RUN = [*WHERE, "--config", "configs/gpt.py:size=small", "--workdir", "gs://bucket/runs/gpt"]
# An override that needs quoting at both levels: locally and on the worker.
TRICKY = '--config.data.name=it\'s a "test" $HOME'

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not on PATH")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process environment without anything that changes the scripts' behaviour."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXLM_")) and k not in ("DRY_RUN", "TMPDIR")
    }
    env.update(extra)
    return env


def run_script(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else clean_env(),
        check=False,
    )


def dry_run(script: Path, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The commands a dry run prints, each parsed back into its argument list."""
    result = run_script(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines, "a dry run prints its commands"
    for line in lines:
        assert line.startswith("+ "), f"every line of a dry run is a command: {line!r}"
    return [shlex.split(line[2:]) for line in lines]


def tpu_dry_run(subcommand: str, *args: str) -> list[list[str]]:
    # --dry-run right after the subcommand: after a "--" it would go to `jaxlm train` instead.
    return dry_run(TPU_VM, subcommand, "--dry-run", *args)


def option(cmd: list[str], name: str) -> str:
    """The value of `--name=value` in an argument list."""
    values = [arg.split("=", 1)[1] for arg in cmd if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} appears {len(values)} times in {cmd}"
    return values[0]


def fake_jaxlm(path: Path) -> Path:
    """A `jaxlm` that writes its arguments, NUL-separated, to $FAKE_ARGS_FILE and says hello."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$FAKE_ARGS_FILE"\necho "fake jaxlm ran"\n')
    path.chmod(0o755)
    return path


def recorded_args(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


# --- tpu_vm.sh: create, queued, delete ---------------------------------------------------------


def test_create_has_type_zone_version_and_spot():
    (cmd,) = tpu_dry_run("create", *CREATE, "--project", "my-project", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", NAME]
    assert option(cmd, "--accelerator-type") == "v5litepod-16"
    assert option(cmd, "--zone") == ZONE
    assert option(cmd, "--version") == "v2-alpha-tpuv5-lite"
    assert option(cmd, "--project") == "my-project"
    assert "--spot" in cmd


def test_create_without_spot_or_project():
    (cmd,) = tpu_dry_run("create", *CREATE)
    assert "--spot" not in cmd
    assert not any(arg.startswith("--project") for arg in cmd)


def test_queued_resource_names_the_node_after_itself():
    (cmd,) = tpu_dry_run("queued", *CREATE, "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", NAME]
    assert option(cmd, "--node-id") == NAME
    assert option(cmd, "--accelerator-type") == "v5litepod-16"
    assert option(cmd, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert option(cmd, "--zone") == ZONE
    assert "--spot" in cmd


def test_delete():
    (cmd,) = tpu_dry_run("delete", *WHERE)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME]
    assert option(cmd, "--zone") == ZONE
    assert "--quiet" in cmd


def test_delete_queued_resource_forces_its_node():
    (cmd,) = tpu_dry_run("delete", *WHERE, "--queued")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", NAME]
    assert "--force" in cmd and "--quiet" in cmd


def test_equals_form_of_options():
    (cmd,) = tpu_dry_run("create", f"--name={NAME}", f"--zone={ZONE}", "--accelerator-type=v4-8", "--version=v")
    assert option(cmd, "--accelerator-type") == "v4-8"
    assert option(cmd, "--zone") == ZONE


# --- tpu_vm.sh: install ------------------------------------------------------------------------


def remote_command(cmd: list[str]) -> str:
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME]
    assert option(cmd, "--worker") == "all"
    assert option(cmd, "--zone") == ZONE
    return option(cmd, "--command")


def test_install_from_git_url_on_all_workers():
    url = "https://github.com/example/jaxlm.git"
    (cmd,) = tpu_dry_run("install", *WHERE, "--repo", url, "--ref", "v0.1")
    remote = remote_command(cmd)
    assert f"git clone --quiet {url} ~/jaxlm && git -C ~/jaxlm checkout --quiet v0.1" in remote
    assert "uv venv --python 3.11 ~/jaxlm-venv" in remote
    assert "uv pip install --python ~/jaxlm-venv/bin/python -e ~/jaxlm 'jax[tpu]'" in remote
    assert remote.startswith("set -euo pipefail;")


def test_install_from_local_dir_packs_copies_and_unpacks(tmp_path):
    repo = tmp_path / "checkout"
    for rel in ["jaxlm/__init__.py", "configs/gpt.py", "pyproject.toml", ".venv/bin/python", ".git/HEAD"]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = clean_env(TMPDIR=str(tmp))
    tar, scp, ssh = dry_run(TPU_VM, "install", *WHERE, "--repo", str(repo), "--python", "3.12", "--dry-run", env=env)

    # The printed tar command, run for real, packs the checkout without its venv and git history.
    assert tar[0] == "tar"
    subprocess.run(tar, check=True, timeout=30)
    tarball = tmp / f"jaxlm-src-{NAME}.tar.gz"
    with tarfile.open(tarball) as packed:
        names = {name.removeprefix("./") for name in packed.getnames()}
    assert {"jaxlm/__init__.py", "configs/gpt.py", "pyproject.toml"} <= names
    assert not any(name.startswith((".venv", ".git")) for name in names)

    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [str(tarball), f"{NAME}:jaxlm-src.tar.gz"]
    assert option(scp, "--worker") == "all"
    remote = remote_command(ssh)
    assert "tar -xzf ~/jaxlm-src.tar.gz -C ~/jaxlm" in remote
    assert "uv venv --python 3.12 ~/jaxlm-venv" in remote


def test_install_defaults_to_this_checkout():
    tar, _, _ = tpu_dry_run("install", *WHERE)
    assert tar[tar.index("-C") + 1] == str(ROOT)


# --- tpu_vm.sh: run and logs -------------------------------------------------------------------


def test_run_trains_on_all_workers_with_overrides_quoted(tmp_path):
    (cmd,) = tpu_dry_run("run", *RUN, "--config.optim.lr=1e-3", TRICKY, "--", "--extra_flag=1")
    remote = remote_command(cmd)
    assert "cd ~/jaxlm && ~/jaxlm-venv/bin/jaxlm train " in remote
    train = remote.split("~/jaxlm-venv/bin/jaxlm ", 1)[1].split("; }", 1)[0]
    assert shlex.split(train) == [
        "train",
        "--config",
        "configs/gpt.py:size=small",
        "--workdir",
        "gs://bucket/runs/gpt",
        "--config.optim.lr=1e-3",
        TRICKY,
        "--extra_flag=1",
    ]
    assert "| tee -a ~/jaxlm-logs/train.log" in remote

    # Run the remote command as a worker's shell would, with a fake jaxlm in a fake home.
    home = tmp_path / "home"
    (home / "jaxlm").mkdir(parents=True)
    fake_jaxlm(home / "jaxlm-venv" / "bin" / "jaxlm")
    args_file = tmp_path / "args"
    worker = subprocess.run(
        [BASH, "-c", remote],
        env=clean_env(HOME=str(home), FAKE_ARGS_FILE=str(args_file)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr
    assert recorded_args(args_file) == [
        "train",
        "--config",
        "configs/gpt.py:size=small",
        "--workdir",
        "gs://bucket/runs/gpt",
        "--config.optim.lr=1e-3",
        TRICKY,
        "--extra_flag=1",
    ]
    log = (home / "jaxlm-logs" / "train.log").read_text()
    assert "jaxlm train ===" in log and "fake jaxlm ran" in log
    assert "fake jaxlm ran" in worker.stdout


def test_run_exit_status_is_that_of_jaxlm(tmp_path):
    (cmd,) = tpu_dry_run("run", *RUN)
    home = tmp_path / "home"
    (home / "jaxlm").mkdir(parents=True)
    failing = home / "jaxlm-venv" / "bin" / "jaxlm"
    failing.parent.mkdir(parents=True)
    failing.write_text("#!/usr/bin/env bash\necho boom\nexit 3\n")
    failing.chmod(0o755)
    worker = subprocess.run([BASH, "-c", remote_command(cmd)], env=clean_env(HOME=str(home)), timeout=30, check=False)
    assert worker.returncode == 3


def test_run_detach_keeps_training_after_ssh_ends(tmp_path):
    (cmd,) = tpu_dry_run("run", *RUN, "--detach", TRICKY)
    remote = remote_command(cmd)
    assert "nohup bash -c" in remote and remote.endswith("&")

    home = tmp_path / "home"
    (home / "jaxlm").mkdir(parents=True)
    fake_jaxlm(home / "jaxlm-venv" / "bin" / "jaxlm")
    args_file = tmp_path / "args"
    worker = subprocess.run(
        [BASH, "-c", remote],
        env=clean_env(HOME=str(home), FAKE_ARGS_FILE=str(args_file)),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert worker.returncode == 0
    log = home / "jaxlm-logs" / "train.log"
    deadline = time.monotonic() + 20
    while not (log.exists() and "fake jaxlm ran" in log.read_text()):
        assert time.monotonic() < deadline, "the detached job did not write its log"
        time.sleep(0.05)
    assert recorded_args(args_file)[-1] == TRICKY


def test_local_workdir_is_allowed_with_a_note():
    result = run_script(TPU_VM, "run", *WHERE, "--config", "c.py", "--workdir", "runs/x", "--dry-run")
    assert result.returncode == 0
    assert "gs://" in result.stderr


def test_logs_copies_each_worker_log():
    mkdir, *scps = tpu_dry_run("logs", *WHERE, "--num-workers", "4", "--logdir", "out/logs")
    assert mkdir == ["mkdir", "-p", "out/logs"]
    assert len(scps) == 4
    for i, scp in enumerate(scps):
        assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
        assert scp[5:7] == [f"{NAME}:jaxlm-logs/train.log", f"out/logs/worker-{i}.log"]
        assert option(scp, "--worker") == str(i)
        assert option(scp, "--zone") == ZONE


def test_logs_looks_up_the_worker_count():
    describe, mkdir, scp = tpu_dry_run("logs", *WHERE)
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME]
    assert option(describe, "--format") == "value(networkEndpoints.len())"
    assert mkdir == ["mkdir", "-p", f"logs/{NAME}"]
    assert option(scp, "--worker") == "0"


# --- tpu_vm.sh: errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ([], ["missing subcommand"]),
        (["launch", *WHERE], ["unknown subcommand 'launch'"]),
        (["create", "--zone", ZONE], ["missing --name", "--name NAME"]),
        (["create", "--name", NAME], ["missing --zone", "--zone ZONE"]),
        (["create", *WHERE, "--version", "v2-alpha-tpuv5-lite"], ["missing --accelerator-type"]),
        (["create", *WHERE, "--accelerator-type", "v4-8"], ["missing --version"]),
        (["create", *CREATE, "--zonee", "x"], ["unknown option --zonee"]),
        (["create", *CREATE, "--config", "c.py"], ["--config does not apply to 'create'"]),
        (["create", *CREATE, "--name", "Bad_Name"], ["--name 'Bad_Name'"]),
        (["create", *CREATE, "--zone", "us-west4"], ["--zone 'us-west4'"]),
        # --accelerator-type and --version swapped.
        (["create", *WHERE, "--accelerator-type", "v2-alpha-tpuv5-lite", "--version", "v4-8"], ["--accelerator-type"]),
        (["create", *CREATE, "--spot=yes"], ["--spot takes no value"]),
        (["create", *CREATE, "--name"], ["--name needs a value"]),
        (["run", *WHERE, "--workdir", "gs://b/r"], ["missing --config"]),
        (["run", *WHERE, "--config", "c.py"], ["missing --workdir"]),
        (["run", *RUN, "--config.optim.lr"], ["--config.optim.lr=VALUE"]),
        (["run", *RUN, "stray"], ["unexpected argument 'stray'"]),
        (["logs", *WHERE, "--num-workers", "0"], ["--num-workers"]),
        (["install", *WHERE, "--repo", "no/such/dir"], ["--repo"]),
        (["install", *WHERE, "--ref", "main"], ["--ref"]),
    ],
)
def test_bad_options_exit_2_with_one_line(args, needles):
    # --dry-run right after the subcommand: should a check ever let a case through, nothing runs.
    args = [args[0], "--dry-run", *args[1:]] if args else []
    assert_one_line_error(run_script(TPU_VM, *args), *needles)


def test_dry_run_after_double_dash_is_refused():
    # After "--" it would be passed to jaxlm train, and the gcloud commands would really run.
    result = run_script(TPU_VM, "run", *RUN, "--", "--dry-run")
    assert_one_line_error(result, "--dry-run after --")


def test_without_gcloud_fails_in_one_line(tmp_path):
    # An empty PATH hides gcloud even where it is installed; bash is started by absolute path.
    env = clean_env(PATH=str(tmp_path))
    assert_one_line_error(run_script(TPU_VM, "delete", *WHERE, env=env), "gcloud not found", "--dry-run")
    # A dry run needs no gcloud.
    (cmd,) = dry_run(TPU_VM, "delete", *WHERE, "--dry-run", env=env)
    assert cmd[0] == "gcloud"


@pytest.mark.parametrize("script", [TPU_VM, SLURM])
def test_help_exits_0(script):
    result = run_script(script, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout and "--dry-run" in result.stdout


# --- slurm_gpu.sbatch --------------------------------------------------------------------------


def slurm_env(**extra: str) -> dict[str, str]:
    """A fake two-node job, as sbatch would describe it, with the host list faked."""
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "JAXLM_FAKE_HOSTS": "gpu07 gpu08",
    }
    return clean_env(**{**job, **extra})


EMPTY_PATH = "<an empty directory>"
SLURM_ARGS = ["--config", "configs/gpt.py:size=small", "--workdir", "/shared/runs/gpt"]


def test_slurm_dry_run_sets_up_jax_distributed(tmp_path):
    (cmd,) = dry_run(SLURM, "--dry-run", *SLURM_ARGS, "--port", "23456", TRICKY, env=slurm_env())
    assert cmd[0] == "srun"
    assert "--ntasks-per-node=1" in cmd and option(cmd, "--nodes") == "2" and option(cmd, "--ntasks") == "2"
    assert "--kill-on-bad-exit=1" in cmd
    assert cmd[-3:-1] == ["bash", "-c"]
    task = cmd[-1]
    assert task.startswith(
        "exec jaxlm train --config configs/gpt.py:size=small --workdir /shared/runs/gpt"
        ' --coordinator_address gpu07:23456 --num_processes 2 --process_id "$SLURM_PROCID"'
    )

    # Each task's shell fills in its own process id.
    fake_jaxlm(tmp_path / "bin" / "jaxlm")
    for procid in ("0", "1"):
        args_file = tmp_path / f"args{procid}"
        env = clean_env(
            PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
            SLURM_PROCID=procid,
            FAKE_ARGS_FILE=str(args_file),
        )
        subprocess.run([BASH, "-c", task], env=env, check=True, capture_output=True, timeout=30)
        assert recorded_args(args_file) == [
            "train",
            "--config",
            "configs/gpt.py:size=small",
            "--workdir",
            "/shared/runs/gpt",
            "--coordinator_address",
            "gpu07:23456",
            "--num_processes",
            "2",
            "--process_id",
            procid,
            TRICKY,
        ]


def test_slurm_dry_run_from_environment_and_default_port():
    (cmd,) = dry_run(SLURM, *SLURM_ARGS, "--", "--extra_flag=1", env=slurm_env(DRY_RUN="1", JAXLM_BIN="/opt/jaxlm"))
    task = cmd[-1]
    # The default port comes from the job id, so jobs sharing a first node do not collide.
    assert "--coordinator_address gpu07:24242 --num_processes 2" in task
    assert task.startswith("exec /opt/jaxlm train ")
    assert task.endswith(" --extra_flag=1")


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (["--dry-run", "--workdir", "w"], {}, ["missing --config"]),
        (["--dry-run", "--config", "c.py"], {}, ["missing --workdir"]),
        (["--dry-run", *SLURM_ARGS, "--bogus"], {}, ["unknown argument --bogus"]),
        (["--dry-run", *SLURM_ARGS, "--port", "80"], {}, ["--port '80'"]),
        (["--dry-run", *SLURM_ARGS], {"SLURM_NTASKS": "16"}, ["SLURM_NTASKS=16", "--ntasks-per-node=1"]),
        (["--dry-run", *SLURM_ARGS], {"SLURM_JOB_ID": ""}, ["SLURM_JOB_ID"]),
        # EMPTY_PATH: a PATH without scontrol and srun, even where SLURM is installed.
        (["--dry-run", *SLURM_ARGS], {"JAXLM_FAKE_HOSTS": "", "PATH": EMPTY_PATH}, ["scontrol not found"]),
        ([*SLURM_ARGS], {"PATH": EMPTY_PATH}, ["srun not found", "DRY_RUN=1"]),
    ],
)
def test_slurm_errors_exit_2_with_one_line(tmp_path, args, env, needles):
    if env.get("PATH") == EMPTY_PATH:
        env = {**env, "PATH": str(tmp_path)}
    assert_one_line_error(run_script(SLURM, *args, env=slurm_env(**env)), *needles)
