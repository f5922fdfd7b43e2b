"""Orbax checkpointing of {train state, data-iterator state} in ``WORKDIR/checkpoints``."""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from jaxlm.common_types import CheckpointError
from jaxlm.config_lib import CheckpointConfig

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: str, cfg: CheckpointConfig, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest ``max_to_keep`` steps, saving asynchronously."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep,
        enable_async_checkpointing=cfg.async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None) -> None:
    """Start saving ``state`` (and the data iterator's state) at ``step``; returns at once if async."""
    items = {"state": ocp.args.StandardSave(state)}
    items["data"] = ocp.args.JsonSave(data_state or {})
    manager.save(step, args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore the state onto the shardings of ``abstract_state`` (any mesh) and the data state."""
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint step {step} in {manager.directory} does not match this config "
            f"({str(e).splitlines()[0][:200]}); use a new --workdir or the config it was trained with"
        ) from e
    return restored["state"], dict(restored["data"] or {})


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step in ``workdir``, or None."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return None
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    ).latest_step()
