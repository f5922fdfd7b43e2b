"""``jaxlm merge``: fold a PEFT run's LoRA / DoRA / IA3 deltas into its base and write an ordinary workdir.

A PEFT workdir holds only the trainable tree; its base is ``config.checkpoint.init_from`` (or
the seed's initialization), identified by the content hash in ``peft_base.json``. Merging
rebuilds that base, checks the hash, computes ``jaxlm.peft.merge(base, trainable)`` and writes
config (``peft.method=none``, no ``init_from``), tokenizer and a checkpoint at the same step,
which ``eval``, ``generate``, ``predict``, ``convert --to hf`` and ``train`` accept like any other.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, TextIO

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import checkpoint, config_lib, peft
from jaxlm.common_types import CheckpointError, ConfigError
from jaxlm.config_lib import Config
from jaxlm.data import tokenizers
from jaxlm.main import experiment, init_from, task_data
from jaxlm.main import workdir as workdir_lib
from jaxlm.train_state import TrainState


def open_peft(config: Config, workdir: str) -> tuple[experiment.Experiment, Any, Any, tokenizers.Tokenizer, int]:
    """A PEFT workdir's experiment, its checked base, its latest trainable state, tokenizer and step."""
    workdir = workdir_lib.check_path(workdir, must_exist=True)
    tokenizer = tokenizers.load(workdir)
    exp = _build(config, tokenizer)
    base = experiment.init_params(exp, config.seed)
    step = None
    if config.checkpoint.init_from:
        base, report = init_from.load(
            config.checkpoint.init_from, base, vocab_axes=exp.vocab_axes, real_vocab=exp.model_cfg.vocab_size
        )
        step = report.step
    fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
    ref = peft.base_reference(base, config.peft, init_from=config.checkpoint.init_from, step=step, fetch=fetch)
    peft.check_base_reference(workdir, ref)
    manager = checkpoint.make_manager(workdir, config.checkpoint, read_only=True)
    latest = manager.latest_step()
    if latest is None:
        raise CheckpointError(f"--workdir {workdir} has no checkpoint yet; train first with jaxlm train")
    state, _ = checkpoint.restore(manager, latest, exp.abstract_state)
    manager.close()
    return exp, base, state, tokenizer, latest


def _build(config: Config, tokenizer: tokenizers.Tokenizer) -> experiment.Experiment:
    num_labels = task_data.resolve(config).num_labels if config_lib.task_head(config) != "none" else 0
    vocab = experiment.model_vocab_size(config, tokenizer.vocab_size, tokenizer)
    return experiment.build(config, vocab, num_labels=num_labels)


def plain_config(workdir: str) -> Config:
    """The PEFT run's config as an ordinary run's: no PEFT method, no ``init_from``."""
    raw = workdir_lib.saved_config(workdir)
    raw.peft.method = "none"
    raw.checkpoint.init_from = ""
    return config_lib.validate(raw)


def run(workdir: str, out: str, *, stream: TextIO | None = None) -> dict[str, Any]:
    """Merge the PEFT run in ``workdir`` into the new workdir ``out``; returns a summary."""
    stream = stream or sys.stdout
    workdir, config = workdir_lib.existing_run_config(workdir, "it is not a jaxlm run")
    if not peft.enabled(config.peft):
        raise ConfigError(f"--workdir {workdir} is not a PEFT run (config.peft.method=none); there is nothing to merge")
    kinds = set(config.peft.methods) - set(peft.DELTA_METHODS) - set(peft.SELECT_METHODS)
    if kinds:
        raise ConfigError(f"jaxlm merge folds {', '.join(peft.DELTA_METHODS)} and bitfit, not {', '.join(kinds)}")
    out = workdir_lib.check_path(out)
    if os.path.exists(out) and os.listdir(out):
        raise CheckpointError(f"--out {out} exists and is not empty; give a new directory")

    # ---- The PEFT run, checked against its base, then folded.
    exp, base, state, tokenizer, step = open_peft(config, workdir)
    merged = experiment.effective_params_fn(exp)(base, state.params)

    # ---- An ordinary run's state (fresh optimizer) over the merged parameters.
    plain = plain_config(workdir)
    plain_exp = _build(plain, tokenizer)
    with jax.set_mesh(plain_exp.mesh), nn.logical_axis_rules(plain_exp.rules):
        merged = jax.device_put(merged, plain_exp.state_shardings.params)
        plain_state = jax.jit(lambda p: TrainState.create(p, plain_exp.tx), out_shardings=plain_exp.state_shardings)(
            merged
        )

    # ---- Write config, tokenizer and checkpoint into a staging sibling, then rename it into place.
    staging = out.rstrip("/") + ".merging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        workdir_lib.write_config(staging, plain)
        tokenizer.save(staging)
        manager = checkpoint.make_manager(staging, plain.checkpoint)
        checkpoint.save(manager, step, plain_state, None)
        manager.wait_until_finished()
        manager.close()
        if os.path.exists(out):
            os.rmdir(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "workdir": workdir,
        "out": out,
        "step": step,
        "method": config.peft.method,
        "params": peft.count(merged),
        "trainable": peft.count(state.params),
    }
    print(
        f"merged {config.peft.method} ({summary['trainable']:,} trainable params) of {workdir} at step {step} "
        f"into {out} ({summary['params']:,} params)",
        file=stream,
        flush=True,
    )
    return summary
