"""The layout of a workdir: ``config.json``, ``tokenizer.json``, ``checkpoints/``, metrics.

Everything that a later ``jaxlm eval`` / ``generate`` / resumed ``train`` needs to rebuild a
run lives in the workdir, written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TextIO

import ml_collections

from jaxlm import checkpoint, config_lib
from jaxlm.common_types import CheckpointError, ConfigError
from jaxlm.config_lib import Config
from jaxlm.data import sources, tokenizers, tokenizers_sp

CONFIG_FILE = "config.json"

# Fields that must not change between the run that wrote a checkpoint and the one reading it.
COMPATIBILITY_FIELDS = ("model", "data.tokenizer", "data.tokenizer_vocab_size")


def check_path(workdir: str, *, must_exist: bool = False) -> str:
    """Return the absolute workdir, rejecting a path that is a file (or missing, if required)."""
    if not workdir:
        raise CheckpointError("--workdir is required; give a directory such as runs/gpt-small")
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"--workdir {workdir} is a file, not a directory; give a directory path")
    if must_exist and not os.path.isdir(path):
        raise CheckpointError(f"--workdir {workdir} does not exist; train first with: jaxlm train --workdir {workdir}")
    if must_exist:
        return path
    parent = path
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CheckpointError(
            f"--workdir {workdir} cannot be created: {parent} is a file, not a directory; pick another path"
        )
    if not os.access(parent, os.W_OK):
        if _read_only(parent):
            raise CheckpointError(
                f"--workdir {workdir} cannot be created or written: {parent} is on a read-only filesystem; "
                "pick a path on a writable one"
            )
        raise CheckpointError(f"--workdir {workdir} is not writable (no write permission on {parent}); pick another")
    return path


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def existing_run_config(workdir: str, missing: str) -> tuple[str, Config]:
    """``(checked workdir, its validated saved config)`` for programs that read a finished run.

    ``missing`` ends the one-line error when the workdir has no ``config.json``.
    """
    workdir = check_path(workdir, must_exist=True)
    saved = saved_config(workdir)
    if saved is None:
        raise CheckpointError(f"--workdir {workdir} has no config.json; {missing}")
    return workdir, config_lib.validate(saved)


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The ConfigDict saved by the run that owns ``workdir``, or None."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return config_lib.from_json(f.read())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); fix it or use a new workdir") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_compatible(workdir: str, config: Config) -> Config:
    """Refuse to resume from a workdir whose model (or tokenizer) differs from ``config``.

    Returns ``config`` with the saved run's ``model.vocab_multiple``: the saved config wins, since
    its checkpoints hold vocabulary arrays padded by it (a ``config.json`` written before padding
    existed reads as 1, unpadded; see ``jaxlm.models.vocab``).
    """
    saved = saved_config(workdir)
    if saved is None:
        return config
    saved_cfg = config_lib.validate(saved)
    multiple = saved_cfg.model.vocab_multiple
    if multiple and multiple != config.model.vocab_multiple:
        if config.model.vocab_multiple:  # set explicitly (0 is auto)
            print(
                f"notice: config.model.vocab_multiple={config.model.vocab_multiple} ignored: the run in {workdir} "
                f"pads its vocabulary to a multiple of {multiple}",
                file=sys.stderr,
                flush=True,
            )
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_multiple=multiple))
    config = _saved_packing(workdir, saved_cfg, config)
    old = config_lib.flatten(_asdict(saved_cfg))
    new = config_lib.flatten(_asdict(config))
    for key in sorted(new):
        if any(key == f or key.startswith(f + ".") for f in COMPATIBILITY_FIELDS) and old.get(key) != new[key]:
            if key in ("model.vocab_size", "data.tokenizer_vocab_size") and 0 in (old.get(key), new[key]):
                continue  # 0 = automatic: the workdir's tokenizer decides
            raise CheckpointError(
                f"--workdir {workdir} holds a run with {key}={old.get(key)!r} but the config says {new[key]!r}; "
                "use a new --workdir or the same model config"
            )
    return config


def _saved_packing(workdir: str, saved: Config, config: Config) -> Config:
    """``config`` with the saved run's ``data.packing``: its checkpoints hold that pipeline's data state.

    Runs written before ``packing='auto'`` existed say ``'concat'`` and keep reading that way.
    """
    packing = saved.data.packing
    if packing == config.data.packing:
        return config
    if config.data.packing != "auto":  # set explicitly
        print(
            f"notice: config.data.packing={config.data.packing!r} ignored: the run in {workdir} "
            f"reads its data with packing={packing!r}",
            file=sys.stderr,
            flush=True,
        )
    return dataclasses.replace(config, data=dataclasses.replace(config.data, packing=packing))


def _asdict(config: Config) -> dict:
    return dataclasses.asdict(config)


def write_config(workdir: str, config: Config) -> None:
    """Write ``config.json`` atomically."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config_lib.to_json(config))
    os.replace(tmp, path)


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds at least one complete checkpoint."""
    return checkpoint.latest_step(workdir) is not None


def open_tokenizer(
    config: Config, workdir: str, train_source: sources.TextSource, *, stream: TextIO | None = None
) -> tokenizers.Tokenizer:
    """The workdir's tokenizer, else the given one (``tokenizer_path``), else a new one.

    A new tokenizer is trained on the training split in memory; the caller saves it into the
    workdir (``tokenizer.save``) once everything else has been checked, so a run that fails
    its checks leaves the workdir as it was. A default-sized SentencePiece vocabulary capped
    at what the corpus supports is said in one line on ``stream`` (stderr). Then the training
    split must hold at least one row (``seq_len + 1`` tokens) of the causal LM objective.
    """
    tok = _open_tokenizer(config, workdir, train_source)
    d = config.data
    if (
        d.tokenizer.startswith("sentencepiece")
        and d.tokenizer_vocab_size == 0
        and not d.tokenizer_path
        and tok.vocab_size < tokenizers_sp.DEFAULT_VOCAB_SIZE
        and not os.path.isfile(os.path.join(workdir, tokenizers.TOKENIZER_FILE))
    ):
        print(
            f"notice: the training text supports {tok.vocab_size} {d.tokenizer} ids, fewer than the default "
            f"{tokenizers_sp.DEFAULT_VOCAB_SIZE}; using {tok.vocab_size} (config.data.tokenizer_vocab_size sets it)",
            file=stream or sys.stderr,
            flush=True,
        )
    if d.objective == "causal_lm":
        sources.check_tokens(train_source, tok, d.seq_len + 1, "training")
    return tok


def _open_tokenizer(config: Config, workdir: str, train_source: sources.TextSource) -> tokenizers.Tokenizer:
    d = config.data
    if os.path.isfile(os.path.join(workdir, tokenizers.TOKENIZER_FILE)):
        tok = tokenizers.load(workdir)
        if tok.name != d.tokenizer:
            raise CheckpointError(
                f"--workdir {workdir} holds a {tok.name!r} tokenizer but config.data.tokenizer={d.tokenizer!r}; "
                "use a new --workdir or the same tokenizer"
            )
        return tok
    if d.tokenizer_path:
        return tokenizers.build(d.tokenizer, os.path.expanduser(d.tokenizer_path))
    if d.tokenizer == "byte":
        return tokenizers.build("byte")

    return tokenizers.train(d.tokenizer, sources.record_texts(train_source), None, d.tokenizer_vocab_size)
