"""``jaxlm convert --from hf-peft`` / ``--to hf-peft``: Hugging Face PEFT LoRA adapters <-> PEFT workdirs.

Import (``jaxlm convert --from hf-peft ADAPTER_DIR --base BASE --workdir OUT``) reads a ``peft``
``save_pretrained`` directory (``adapter_config.json`` + ``adapter_model.safetensors``) trained
on the model that the jaxlm workdir ``BASE`` holds (e.g. written by ``jaxlm convert --from hf``)
and writes a PEFT workdir: ``BASE``'s config with ``config.peft`` set from the adapter
(``method`` lora / dora, ``rank``, ``alpha``, ``dropout``, ``targets``; ``trainable`` for a saved
task head) and ``config.checkpoint.init_from=BASE``, its tokenizer, ``peft_base.json`` (the
base's hash) and a checkpoint at step 0 holding the adapter and a fresh optimizer state. ``jaxlm
train`` continues from it, ``jaxlm merge`` folds it into an ordinary workdir.

Export (``jaxlm convert --to hf-peft --workdir PEFT_RUN OUT_DIR``) writes a PEFT run's latest
LoRA / DoRA (and task head) as an adapter directory that ``PeftModel.from_pretrained`` loads
onto the base exported by ``jaxlm convert --to hf`` (``GPT2LMHeadModel`` / ``BertForPreTraining``
names; a task head loads onto the matching ``*ForSequenceClassification`` ... model).
The name and array mapping is :mod:`jaxlm.interop.hf_peft`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import checkpoint, config_lib, param_paths, peft
from jaxlm.common_types import CheckpointError, ConfigError, DataError
from jaxlm.data import tokenizers
from jaxlm.interop import hf, hf_peft
from jaxlm.main import convert, experiment, init_from, merge
from jaxlm.main import workdir as workdir_lib
from jaxlm.train_state import TrainState

# jaxlm head kind -> peft task_type (what PeftModel.from_pretrained wraps the model as).
TASK_TYPES = {
    "classification": "SEQ_CLS",
    "regression": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "qa": "QUESTION_ANS",
}


def run_from_hf_peft(
    adapter_dir: str,
    base_dir: str,
    workdir: str,
    *,
    overrides: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> config_lib.Config:
    """Import the ``peft`` adapter in ``adapter_dir``, trained on the model of workdir ``base_dir``, into ``workdir``.

    ``overrides`` (``--config.*``) apply after the base's config and the adapter's fields (e.g.
    ``data.objective`` and ``task.num_labels`` for an adapter that carries a task head).
    """
    stream = stream or sys.stdout

    # ---- Inputs: the adapter, and the base workdir it belongs to.
    if not adapter_dir:
        raise DataError("--from hf-peft needs the adapter directory; e.g. jaxlm convert --from hf-peft DIR --base B")
    source = os.path.abspath(os.path.expanduser(adapter_dir))
    if not os.path.isdir(source):
        raise DataError(f"{adapter_dir} is not a directory; give the directory peft's save_pretrained wrote")
    if not base_dir:
        raise ConfigError(
            "--from hf-peft needs --base: the jaxlm workdir holding the model the adapter was trained on "
            "(e.g. written by jaxlm convert --from hf)"
        )
    base_dir = workdir_lib.check_path(base_dir, must_exist=True)
    raw = workdir_lib.saved_config(base_dir)
    if raw is None or not workdir_lib.has_checkpoint(base_dir):
        raise CheckpointError(f"--base {base_dir} is not a jaxlm workdir with a checkpoint; convert or train it first")
    if raw.peft.method != "none":
        raise ConfigError(f"--base {base_dir} is itself a PEFT run; merge it first (jaxlm merge) and use the result")
    adapter_config, state_dict = hf_peft.read_adapter(source)
    where = os.path.join(adapter_dir, hf_peft.ADAPTER_CONFIG_FILE)
    adapter = hf_peft.adapter_from_peft(adapter_config, state_dict, raw.model.to_dict(), where)
    del state_dict

    workdir = workdir_lib.check_path(workdir)
    if workdir_lib.has_checkpoint(workdir):
        raise CheckpointError(f"--workdir {workdir} already has a checkpoint; convert into a new --workdir")

    # ---- Config: the base's, with config.peft from the adapter, then the user's overrides.
    raw.peft.method = adapter.method
    raw.peft.rank = adapter.rank
    raw.peft.alpha = adapter.alpha
    raw.peft.dropout = adapter.dropout
    raw.peft.targets = adapter.targets()
    raw.peft.trainable = ",".join(sorted({_group_pattern(p) for p in adapter.params}))
    raw.checkpoint.init_from = base_dir
    config_lib.apply_overrides(raw, dict(overrides or {}))
    config = config_lib.validate(raw)
    if config.model.scan_layers and "blocks/layer_(" in config.peft.targets:
        raise ConfigError(
            f"{where} adapts only some blocks, which config.peft.targets cannot select under "
            "config.model.scan_layers=true; import onto an unrolled base"
        )

    # ---- The base (checked against the adapter's own record of it, when it has one) and the trainable tree.
    tokenizer = tokenizers.load(base_dir)
    exp = merge._build(config, tokenizer)  # noqa: SLF001 (the same build merge and restore use)
    base = experiment.init_params(exp, config.seed)
    base, report = init_from.load(base_dir, base)
    fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
    ref = peft.base_reference(base, config.peft, init_from=base_dir, step=report.step, fetch=fetch)
    recorded = peft.read_base_reference(source)
    if recorded is not None and recorded["sha256"] != ref["sha256"]:
        raise CheckpointError(
            f"{adapter_dir} was exported from a run on a base hashing to {recorded['sha256'][:12]}, but --base "
            f"{base_dir} hashes to {ref['sha256'][:12]}; give the base it was trained on"
        )
    fresh = jax.device_get(experiment.init_peft_state(exp, base, config.seed).params)
    trainable = _fill(fresh, adapter, config, where)
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        trainable = jax.device_put(trainable, exp.state_shardings.params)
        state = jax.jit(lambda p: TrainState.create(p, exp.tx), out_shardings=exp.state_shardings)(trainable)

    # ---- Write into a staging sibling, then move it into place (as convert --from hf).
    staging = convert._staging_dir(workdir)  # noqa: SLF001 (one staging scheme for every import)
    try:
        workdir_lib.write_config(staging, config)
        tokenizer.save(staging)
        peft.write_base_reference(staging, ref)
        manager = checkpoint.make_manager(staging, config.checkpoint)
        checkpoint.save(manager, 0, state, None)
        manager.wait_until_finished()
        manager.close()
        convert._move_into_place(staging, workdir)  # noqa: SLF001
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"imported {adapter.method} adapter (r={adapter.rank}, alpha={adapter.alpha:g}, targets "
        f"{config.peft.targets}; {peft.count(trainable):,} trainable params) from {adapter_dir} onto base "
        f"{base_dir} (step {report.step}) into {workdir} at step 0",
        file=stream,
        flush=True,
    )
    return config


def _group_pattern(path: str) -> str:
    """The ``config.peft.trainable`` regex for a saved module's path (``head/`` or ``pooler/``)."""
    return path.split("/")[0] + "/"


def _fill(fresh: Any, adapter: hf_peft.Adapter, config: config_lib.Config, source: str) -> Any:
    """The trainable tree ``fresh`` (``peft.init``'s, on host) with the adapter's arrays put in by path."""
    flat = param_paths.flatten(fresh)
    given: dict[str, np.ndarray] = {}
    for kernel, entry in adapter.delta.items():
        for name, value in entry.items():
            given[f"delta/{kernel}/{name}"] = value
    for path, value in adapter.params.items():
        given[f"params/{path}"] = value
    if config.model.scan_layers:
        given = _stack_layers(given)
    missing = sorted(k for k in flat if k.startswith("delta/") and k not in given)
    extra = sorted(set(given) - set(flat))
    if extra or missing:
        what = f"no place for {extra[0]}" if extra else f"nothing for {missing[0]}"
        raise ConfigError(
            f"{source} does not fit the PEFT config (config.peft.targets={config.peft.targets!r}, "
            f"trainable={config.peft.trainable!r}): {what}; drop the --config.peft.* overrides"
        )
    out = {}
    for path, leaf in flat.items():
        value = given.get(path, leaf)
        if np.shape(value) != np.shape(leaf):
            raise DataError(f"{source}: {path} has shape {np.shape(value)} but the base model needs {np.shape(leaf)}")
        out[path] = np.asarray(value, dtype=np.asarray(leaf).dtype)
    return jax.tree.unflatten(jax.tree.structure(fresh), [out[p] for p in flat])


def _stack_layers(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unrolled ``.../blocks/layer_i/...`` paths -> the ``scan_layers`` stack ``.../blocks/layers/block/...``."""
    return hf._stack_flat(flat)  # noqa: SLF001 (the interop's one stacking rule)


def run_to_hf_peft(workdir: str, out_dir: str, *, stream: TextIO | None = None) -> str:
    """Export the latest LoRA / DoRA of the PEFT run in ``workdir`` as a ``peft`` adapter directory ``out_dir``."""
    stream = stream or sys.stdout

    # ---- Input and output checks, before the checkpoint is read.
    workdir, config = workdir_lib.existing_run_config(workdir, "train or convert there first")
    if not peft.enabled(config.peft):
        raise ConfigError(
            f"--workdir {workdir} is not a PEFT run (config.peft.method=none); export it with convert --to hf"
        )
    other = [m for m in config.peft.methods if m not in ("lora", "dora")]
    if other:
        raise ConfigError(
            f"config.peft.method={config.peft.method!r}: {', '.join(other)} has no Hugging Face PEFT LoRA "
            f"equivalent; convert --to hf-peft exports {hf_peft.SUPPORTED} (jaxlm merge, then convert --to hf, "
            "exports any method)"
        )
    model = dataclasses.asdict(config.model)
    hf_peft.model_type(model)
    if not out_dir:
        raise DataError("--to hf-peft needs an output directory; e.g. jaxlm convert --to hf-peft --workdir RUN DIR")
    out = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out_dir} already exists and is not an empty directory; give a new output directory")

    # ---- The run, checked against its base; host copies, unrolled.
    exp, base, state, _, step = merge.open_peft(config, workdir)
    trainable = jax.tree.map(np.asarray, jax.device_get(state.params))
    base_flat = hf._unstack_flat(param_paths.flatten(jax.tree.map(np.asarray, jax.device_get(base))))  # noqa: SLF001
    delta_flat = hf._unstack_flat(param_paths.flatten(trainable["delta"]))  # noqa: SLF001
    delta: dict[str, dict[str, np.ndarray]] = {}
    for path, value in delta_flat.items():
        kernel, _, name = path.rpartition("/")
        delta.setdefault(kernel, {})[name] = value
    # Whole parameters kept trainable: those training left as the base had them need no place.
    params = {
        p: v
        for p, v in hf._unstack_flat(param_paths.flatten(trainable["params"])).items()  # noqa: SLF001
        if not np.array_equal(v, base_flat.get(p))
    }
    adapter = hf_peft.Adapter(
        "dora" if "dora" in config.peft.methods else "lora",
        config.peft.rank,
        config.peft.alpha,
        config.peft.dropout,
        delta,
        params,
        num_layers=config.model.num_layers,
    )
    head_kind = config_lib.task_head(config)
    task_type = TASK_TYPES.get(head_kind) or ("CAUSAL_LM" if hf_peft.model_type(model) == "gpt2" else None)
    adapter_config, state_dict, notes = hf_peft.adapter_to_peft(adapter, model, base_flat, task_type=task_type)

    # ---- Write into a temporary sibling, then move it into place whole.
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        hf_peft.write_adapter(tmp, adapter_config, state_dict)
        shutil.copyfile(os.path.join(workdir, peft.BASE_REFERENCE_FILE), os.path.join(tmp, peft.BASE_REFERENCE_FILE))
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del exp
    saved_modules = adapter_config["modules_to_save"]
    print(
        f"exported the {adapter.method} adapter of {workdir} at step {step} to {out} (peft LoRA, r={adapter.rank}"
        + (f", modules_to_save {saved_modules}" if saved_modules else "")
        + ")"
        + "".join(f"; {n}" for n in notes),
        file=stream,
        flush=True,
    )
    return out
