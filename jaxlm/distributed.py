"""Joining the processes of a multi-host run with ``jax.distributed``, with a deadline.

Where the process group comes from, first match wins:

1. explicit arguments (``jaxlm train --coordinator_address HOST:PORT --num_processes N
   --process_id I``), all three or none;
2. a SLURM job step with more than one task (``srun``): ``SLURM_STEP_NUM_TASKS`` /
   ``SLURM_NTASKS``, ``SLURM_PROCID``, the coordinator on the first host of the step's node
   list (port ``JAX_COORDINATOR_PORT``, else the one JAX derives from the job id);
3. a Cloud TPU VM, where JAX finds the hosts of the pod slice itself;

otherwise nothing happens and the process uses its local devices alone.

JAX ends a process whose peers never arrive with a fatal error (``SIGABRT``, exit 134) that
Python cannot catch. So the join runs on a helper thread with JAX's own deadline set past
ours: if it has not finished after ``timeout_s`` seconds, :func:`initialize` raises a
:class:`~jaxlm.common_types.UserError` naming the coordinator, the process and the timeout.
The process must then exit (the CLI does, with status 2) before JAX's deadline aborts it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import jax

from jaxlm.common_types import UserError

DEFAULT_TIMEOUT_S = 300.0
# JAX's deadline is this much later than ours, so that our error is the one the user sees.
_JAX_DEADLINE_MARGIN = 2.0


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Who this process is in a multi-process run, and where that was found.

    ``coordinator_address``, ``num_processes`` and ``process_id`` are None when JAX detects
    them itself (Cloud TPU). ``local_device_ids`` restricts this process to some local
    devices (several SLURM tasks per node: one GPU each); None uses them all.
    """

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str
    local_device_ids: tuple[int, ...] | None = None

    def describe(self) -> str:
        """``process 1 of 2, from flags``."""
        who = "process ? of ?" if self.num_processes is None else f"process {self.process_id} of {self.num_processes}"
        return f"{who}, from {self.source}"


def _check_address(address: str, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{source}: coordinator address {address!r} is not HOST:PORT (e.g. 10.0.0.2:1234)")


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM host list: ``gpu[01-04,07],cpu1`` -> ``gpu01``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise UserError(f"cannot read the first host of the SLURM node list {nodelist!r}; pass --coordinator_address")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def _slurm(env: Mapping[str, str]) -> ProcessGroup | None:
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env or not tasks or int(tasks) <= 1:
        return None
    num, pid = int(tasks), int(env["SLURM_PROCID"])
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError(f"SLURM_NTASKS={num} but no SLURM node list is set; pass --coordinator_address")
    # The port JAX's own SLURM detection picks, so both ways agree.
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or num)
    local = None
    if num > nodes and "SLURM_LOCALID" in env:  # several tasks per node: one device each, as JAX does
        local = (int(env["SLURM_LOCALID"]),)
    return ProcessGroup(
        f"{first_slurm_host(nodelist)}:{port}", num, pid, f"SLURM (SLURM_NTASKS={num}, SLURM_PROCID={pid})", local
    )


def _on_cloud_tpu_vm() -> bool:
    try:
        from jax._src import cloud_tpu_init  # set when jax is imported on a TPU VM
    except ImportError:  # pragma: no cover - a JAX without this module
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> ProcessGroup | None:
    """The process group from the arguments or the environment; None for a single process."""
    env = os.environ if environ is None else environ
    flags = {"--coordinator_address": coordinator_address, "--num_processes": num_processes, "--process_id": process_id}
    given = [k for k, v in flags.items() if v is not None]
    if given:
        if len(given) < 3:
            missing = [k for k in flags if k not in given]
            raise UserError(
                f"{', '.join(given)} given without {' and '.join(missing)}; "
                "--coordinator_address, --num_processes and --process_id go together"
            )
        _check_address(coordinator_address, "--coordinator_address")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes}) and --num_processes >= 1"
            )
        if num_processes == 1:
            return None
        return ProcessGroup(coordinator_address, num_processes, process_id, "flags")
    group = _slurm(env)
    if group is not None:
        _check_address(group.coordinator_address, group.source)
        if not 0 <= group.process_id < group.num_processes:
            raise UserError(f"SLURM_PROCID={group.process_id} is not below SLURM_NTASKS={group.num_processes}")
        return group
    if _on_cloud_tpu_vm():
        return ProcessGroup(None, None, None, "Cloud TPU VM auto-detection")
    return None


def _join(group: ProcessGroup, timeout_s: float) -> None:
    kwargs: dict[str, Any] = {"initialization_timeout": int(timeout_s * _JAX_DEADLINE_MARGIN) + 30}
    if group.coordinator_address is not None:
        # Everything is given: keep JAX's own cluster detection from overriding it (under srun it
        # would otherwise restrict a one-task-per-node process to a single GPU).
        kwargs.update(
            coordinator_address=group.coordinator_address,
            num_processes=group.num_processes,
            process_id=group.process_id,
            local_device_ids=list(group.local_device_ids) if group.local_device_ids else None,
            cluster_detection_method="deactivate",
        )
    jax.distributed.initialize(**kwargs)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Join the multi-process run described by the arguments or the environment, if any.

    Does nothing for a single process or when ``jax.distributed`` is already initialized.
    Must run before any JAX computation. Raises ``UserError`` for inconsistent flags, a
    coordinator port that cannot be bound, or processes that do not all join within
    ``timeout_s`` seconds; after a timeout the process must exit (see the module docstring).
    """
    if timeout_s <= 0:
        raise UserError(f"the distributed initialization timeout must be > 0 seconds, got {timeout_s}")
    group = detect(coordinator_address, num_processes, process_id)
    if group is None or jax.distributed.is_initialized():
        return
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            _join(group, timeout_s)
        except BaseException as e:  # handed to the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="jaxlm-distributed-initialize", daemon=True)
    thread.start()
    thread.join(timeout_s)
    address = group.coordinator_address or "the auto-detected coordinator"
    if thread.is_alive():
        if group.process_id == 0:
            what = f"the other {group.num_processes - 1} process(es) did not reach the coordinator at {address}"
        else:
            what = f"could not reach the coordinator at {address}"
        raise UserError(
            f"{what} within {timeout_s:g} s ({group.describe()}); start all processes with the same "
            "--coordinator_address and --num_processes, check that process 0 is running and that HOST:PORT is "
            "reachable from every host, or allow more time"
        )
    error = outcome.get("error")
    if error is not None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = "; the port is probably in use, pick another" if "RPC server" in first else ""
        raise UserError(f"could not join the processes at {address} ({group.describe()}): {first}{hint}") from error
