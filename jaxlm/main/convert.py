"""``jaxlm convert``: import a Hugging Face checkpoint into a workdir, or export one back.

``run_from_hf`` turns a ``save_pretrained`` directory (``config.json``, ``model.safetensors``
or ``pytorch_model.bin``, ``tokenizer.json`` when present) into a workdir that ``jaxlm eval``,
``jaxlm generate`` and ``jaxlm train`` (fine-tuning, which resumes from it) use directly:
``config.json``, the tokenizer, and an Orbax checkpoint at step 0 holding a full train state
(the imported parameters and a fresh optimizer state). ``run_to_hf`` writes a workdir's
latest parameters back as a Hugging Face directory that ``from_pretrained`` loads.

The name and shape mapping lives in :mod:`jaxlm.interop.hf`: GPT-2 (``decoder_only``,
``causal_lm``), BERT (``encoder_only``, ``masked_lm``; heads the checkpoint lacks are freshly
initialized and named in the output) and T5 v1.0 / v1.1 (``encoder_decoder``,
``span_corruption``). Imported blocks are unrolled (``config.model.scan_layers=false``) unless
``--config.model.scan_layers=true`` is given; both layouts export.

Task models (``BertForSequenceClassification``, ``BertForTokenClassification``,
``BertForQuestionAnswering``, ``GPT2ForSequenceClassification`` and GPT-2's token
classification and QA heads; :mod:`jaxlm.interop.hf_heads`) import with their head: the
workdir's ``config.data.objective`` is ``classification`` / ``token_classification`` / ``qa``,
``config.task.num_labels`` and ``config.task.labels`` come from ``id2label``. A workdir with a
task head exports as the matching architecture with its labels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import flax.linen as nn
import jax
import numpy as np

from jaxlm import checkpoint, config_lib
from jaxlm.common_types import CheckpointError, ConfigError, DataError
from jaxlm.config_lib import Config
from jaxlm.data import tokenizers, tokenizers_hf
from jaxlm.interop import hf, hf_heads
from jaxlm.main import experiment, lock, restore, task_data
from jaxlm.main import workdir as workdir_lib
from jaxlm.models import vocab
from jaxlm.train_state import TrainState


def run_from_hf(
    hf_dir: str, workdir: str, *, overrides: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> Config:
    """Import the Hugging Face model in ``hf_dir`` into a new ``workdir``; returns its config.

    ``overrides`` (``{'optim.lr': '1e-4', ...}``) are applied to the config after the model
    fields taken from ``config.json``; those fields cannot be overridden, but how the model
    runs can (``model.dtype``, ``param_dtype``, ``attention``, ``remat``, ``scan_layers``,
    ``dropout_rate``, and ``max_len`` of a model without a position table, such as T5).
    """
    stream = stream or sys.stdout

    # ---- Input: refuse a bad directory before anything is read in full or written.
    if not hf_dir:
        raise DataError(
            "--from hf needs the Hugging Face model directory; e.g. jaxlm convert --from hf DIR --workdir OUT"
        )
    source = os.path.abspath(os.path.expanduser(hf_dir))
    if not os.path.isdir(source):
        raise DataError(f"{hf_dir} is not a directory; give a Hugging Face model directory (save_pretrained)")
    hf_config = hf.read_config(source)
    config_path = os.path.join(hf_dir, hf.CONFIG_FILE)
    arch = hf.architecture(hf_config, config_path)
    model_fields = hf.model_fields_from_hf(hf_config, config_path)
    weights_path = hf.weights_file(source)

    # ---- Workdir: never overwrite a checkpoint (nor the input).
    workdir = workdir_lib.check_path(workdir)
    if os.path.isdir(workdir) and os.path.samefile(workdir, source):
        raise CheckpointError(f"--workdir {workdir} is the input directory; convert into a new --workdir")
    if workdir_lib.has_checkpoint(workdir):
        raise CheckpointError(f"--workdir {workdir} already has a checkpoint; convert into a new --workdir")

    # ---- Tokenizer: the model's tokenizer.json, else bytes.
    tokenizer_path = os.path.join(source, hf.TOKENIZER_FILE)
    tokenizer_name = "hf" if os.path.isfile(tokenizer_path) else "byte"
    tokenizer = tokenizers.build(tokenizer_name, tokenizer_path if tokenizer_name == "hf" else None)
    if tokenizer.vocab_size > model_fields["vocab_size"]:
        where = f"{tokenizer_path} has" if tokenizer_name == "hf" else f"{hf_dir} has no tokenizer.json and bytes need"
        raise DataError(
            f"{where} {tokenizer.vocab_size} ids but the model's vocab_size is {model_fields['vocab_size']}; "
            "put the model's own tokenizer.json beside its config.json"
        )

    # ---- Weights, read in full; some model fields (a tied head) and the task head are read off them.
    state_dict = hf.load_state_dict(source)
    model_fields = hf.model_fields_from_hf(hf_config, config_path, state_dict)
    task = hf.task_from_hf(hf_config, state_dict, config_path)

    # ---- Config: the defaults, the model from config.json, then the user's overrides.
    raw = config_lib.base_config()
    for key, value in model_fields.items():
        raw.model[key] = value
    raw.data.objective = arch.objective
    for key, value in (task.config_fields() if task else {}).items():
        section, name = key.split(".")
        raw[section][name] = value
    raw.data.tokenizer = tokenizer_name
    if tokenizer_name == "hf":  # the workdir carries it (saved below); a new run may start from there too
        raw.data.tokenizer_path = workdir
    config_lib.apply_overrides(raw, dict(overrides or {}))
    if "data.seq_len" not in (overrides or {}):
        raw.data.seq_len = min(raw.data.seq_len, raw.model.max_len)
    config = config_lib.validate(raw)
    free = {"dropout_rate"} | ({"max_len"} if model_fields["position"] != "learned" else set())
    for key, value in model_fields.items():
        if key not in free and getattr(config.model, key) != value:
            raise ConfigError(
                f"--config.model.{key}={getattr(config.model, key)!r} contradicts {hf.CONFIG_FILE} of {hf_dir} "
                f"({value!r}); drop that override"
            )
    want_head = task.kind if task else "none"
    if config_lib.task_head(config) != want_head:
        what = f"a {task.head.architecture} ({want_head} head)" if task else "a model without a task head"
        raise ConfigError(
            f"--config.data.objective={config.data.objective!r} / --config.task.head={config.task.head!r}: "
            f"{hf_dir} holds {what}; drop those overrides (fine-tune a new head with config.checkpoint.init_from)"
        )
    if task is not None and not hf_heads.pooling_fits(task.head, config.task.pooling):
        raise ConfigError(
            f"--config.task.pooling={config.task.pooling!r}: {task.head.architecture} pools with "
            f"{hf_heads.POOLED_BY[task.head.model_type]}; drop that override"
        )
    if config.data.tokenizer != tokenizer_name:
        raise ConfigError(
            f"--config.data.tokenizer={config.data.tokenizer!r}: the import uses {tokenizer_name!r} "
            f"({'the model' if tokenizer_name == 'hf' else 'no'} tokenizer.json in {hf_dir}); drop that override"
        )

    # The ids the objective needs (T5's span corruption adds sentinels past the tokenizer's).
    needed = experiment.model_vocab_size(config, tokenizer.vocab_size, tokenizer)
    if needed > config.model.vocab_size:
        raise DataError(
            f"config.data.objective={config.data.objective!r} needs {needed} ids ({tokenizer.vocab_size} of the "
            f"{tokenizer_name} tokenizer + {needed - tokenizer.vocab_size} span-corruption sentinels past them) but "
            f"the model's vocab_size is {config.model.vocab_size}; "
            + (
                "its tokenizer.json holds no <extra_id_0> ... <extra_id_99> to use as sentinels"
                if tokenizer_name == "hf"
                else "put the model's own tokenizer.json beside its config.json"
            )
        )

    # ---- Weights -> a full train state on the mesh.
    params = hf.params_from_hf(hf_config, state_dict, dataclasses.asdict(config.model), source=weights_path)
    fresh = hf.fresh_parameters(hf_config, state_dict, dataclasses.asdict(config.model))
    del state_dict
    exp = experiment.build(config, needed)
    config = exp.config  # model.vocab_multiple resolved: config.json keeps the padding the checkpoint has
    # Hugging Face holds the real vocabulary; jaxlm's arrays are padded (jaxlm.models.vocab): zero rows.
    params = vocab.resize(params, exp.vocab_axes, exp.model_cfg.padded_vocab_size)
    params = _match_abstract(params, exp.abstract_state.params)
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        params = jax.device_put(params, exp.state_shardings.params)
        state = jax.jit(lambda p: TrainState.create(p, exp.tx), out_shardings=exp.state_shardings)(params)
    if jax.process_count() == 1:
        # Saved from host memory (the weights were all there already): Orbax then writes each
        # array once instead of slicing it out of every device it is replicated on. Restores
        # onto any mesh as before.
        state = jax.tree.map(np.asarray, jax.device_get(state))

    # ---- Write: config, tokenizer and checkpoint into a staging sibling, then rename it into
    # place, so a kill at any moment leaves no workdir that eval, generate or train could take
    # for a finished import (the next convert clears the leftover and starts again).
    staging = _staging_dir(workdir)
    try:
        workdir_lib.write_config(staging, config)
        tokenizer.save(staging)
        manager = checkpoint.make_manager(staging, config.checkpoint)
        checkpoint.save(manager, 0, state, None)
        manager.wait_until_finished()
        manager.close()
        _move_into_place(staging, workdir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    head = f"{task.head.architecture}, {task.kind} head with {task.num_labels} outputs, " if task else ""
    print(
        f"imported {hf_config.get('model_type')} ({head}{experiment.param_count(exp.abstract_state.params):,} "
        f"params, tokenizer {tokenizer_name}) from {hf_dir} into {workdir} at step 0"
        + (f"; not in the checkpoint, freshly initialized: {', '.join(fresh)}" if fresh else ""),
        file=stream,
        flush=True,
    )
    return config


def run_to_hf(workdir: str, hf_dir: str, *, stream: TextIO | None = None) -> str:
    """Export the latest parameters of ``workdir`` as a new Hugging Face directory ``hf_dir``.

    Writes ``config.json``, ``model.safetensors`` (tied weights stored once, as
    ``save_pretrained`` does) and, for an ``hf`` tokenizer, ``tokenizer.json`` with
    ``special_tokens_map.json``. Returns the absolute output path.
    """
    stream = stream or sys.stdout

    # ---- Input and output checks, before the checkpoint is read.
    workdir, config = workdir_lib.existing_run_config(workdir, "train or convert there first")
    if not hf_dir:
        raise DataError("--to hf needs an output directory; e.g. jaxlm convert --to hf --workdir OUT DIR")
    out = os.path.abspath(os.path.expanduser(hf_dir))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{hf_dir} already exists and is not an empty directory; give a new output directory")
    # Refuse a model (or task head) Hugging Face cannot hold before restoring anything.
    head_kind, labels = config_lib.task_head(config), config.task.label_list
    task = hf.export_task(dataclasses.asdict(config.model), head_kind, len(labels) or 2, labels, config.task.pooling)
    hf.hf_config_from_model(dataclasses.asdict(config.model), {}, task)

    # ---- Restore and map.
    exp, params, tokenizer, step = restore.open_trained(config, workdir)
    # The padded vocabulary rows (jaxlm.models.vocab) are dropped: Hugging Face holds the real vocabulary.
    params = vocab.resize(jax.device_get(params), exp.vocab_axes, exp.model_cfg.vocab_size)
    model = dataclasses.asdict(exp.model_cfg)
    if task is not None:  # the head's size is the trained one (num_labels may have come from the dataset)
        outputs = _head_outputs(params)
        if not labels and head_kind in ("classification", "token_classification"):
            # The dataset's own label names; plain class ids 0..N-1 stay Hugging Face's LABEL_i.
            names = task_data.resolve(config).label_names
            plain = tuple(str(i) for i in range(outputs))
            labels = list(names) if len(names) == outputs and tuple(names) != plain else []
        task = hf.export_task(model, head_kind, outputs, labels, config.task.pooling)
    hf_config = hf.hf_config_from_model(model, tokenizer.special_ids, task)
    state_dict = hf.params_to_hf(params, model, task)

    # ---- Write into a temporary sibling, then move it into place whole.
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, hf.CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        hf.save_state_dict(state_dict, os.path.join(tmp, hf.SAFETENSORS_FILE))
        wrote_tokenizer = _export_tokenizer(workdir, tokenizer, tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"exported step {step} of {workdir} to {out} as {hf_config['model_type']} "
        f"({', '.join(hf_config.get('architectures', []))})"
        + ("" if wrote_tokenizer else f" (no tokenizer.json: the workdir's tokenizer is {tokenizer.name!r})"),
        file=stream,
        flush=True,
    )
    return out


def _head_outputs(params: Mapping[str, Any]) -> int:
    """The output count of a task head's layer (the last axis of ``head/<layer>/kernel``)."""
    layers = list(params.get("head", {}).values())
    return int(np.shape(layers[0]["kernel"])[-1]) if layers else 0


STAGING_MARK = ".converting-"


def _staging_dir(workdir: str) -> str:
    """A new empty ``.NAME.converting-PID`` beside ``workdir``, after removing those of dead converts."""
    parent, name = os.path.split(workdir)
    try:
        os.makedirs(parent, exist_ok=True)
        for entry in os.listdir(parent):
            prefix = f".{name}{STAGING_MARK}"
            pid = entry[len(prefix) :]
            if entry.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        path = os.path.join(parent, f".{name}{STAGING_MARK}{os.getpid()}")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    except OSError as e:
        raise CheckpointError(lock.writable_dir_message(f"--workdir {workdir}", parent, e)) from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging: str, workdir: str) -> None:
    """Rename ``staging`` to ``workdir`` (new or empty); into an existing one, move the checkpoints last."""
    if os.path.isdir(workdir) and not os.listdir(workdir):
        os.rmdir(workdir)
    if not os.path.exists(workdir):
        os.rename(staging, workdir)
        return
    names = sorted(os.listdir(staging), key=lambda n: n == checkpoint.CHECKPOINT_DIR)  # the marker goes last
    for entry in names:
        target = os.path.join(workdir, entry)
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        os.replace(os.path.join(staging, entry), target)


def _match_abstract(params: Any, abstract: Any) -> Any:
    """``params`` cast to the abstract state's dtypes, after checking both trees agree."""
    got = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    if got != want:
        diff = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
        raise ConfigError(
            f"the imported weights do not fit config.model (first difference: {diff[0]}); "
            "drop the --config.model.* overrides that change shapes"
        )
    return jax.tree.map(lambda a, s: np.asarray(a, dtype=s.dtype), params, abstract)


def _export_tokenizer(workdir: str, tokenizer: tokenizers.Tokenizer, out: str) -> bool:
    """Copy a Hugging Face tokenizer (and its special-token roles) to ``out``; False for other kinds."""
    if tokenizer.name != "hf":
        return False
    with open(os.path.join(workdir, tokenizers.TOKENIZER_FILE), encoding="utf-8") as f:
        state = json.load(f)
    shutil.copyfile(
        os.path.join(workdir, str(state.get("file", tokenizers_hf.SAVED_FILE))), os.path.join(out, "tokenizer.json")
    )
    special = {f"{role}_token": token for role, token in (state.get("special_tokens") or {}).items() if token}
    with open(os.path.join(out, hf.SPECIAL_TOKENS_FILE), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return True
