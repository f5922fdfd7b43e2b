"""The ``jaxlm`` command line: ``jaxlm train|eval|generate ...``.

Every error a user can cause (config, data, paths, flags) is printed as one line,
``error: <what> ; <fix>``, with exit status 2; nothing in the workdir is overwritten.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from jaxlm import config_lib
from jaxlm.common_types import ConfigError, UserError

EXIT_USER_ERROR = 2
# OS errors that are the machine's state, not a bug: reported as one line like user errors.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on one line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxlm", description="JAX research framework for language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, *, config_required: bool) -> None:
        p.add_argument(
            "--config",
            default=None,
            help="config file and argument, e.g. configs/gpt.py:size=small"
            + ("" if config_required else " (default: the workdir's config.json)"),
        )
        p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, config, tokenizer")

    train = sub.add_parser("train", help="train a model (resumes if the workdir has a checkpoint)")
    common(train, config_required=True)
    train.add_argument("--coordinator_address", default=None, help="multi-host: HOST:PORT of process 0")
    train.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    train.add_argument("--process_id", type=int, default=None, help="multi-host: index of this process")
    train.add_argument(
        "--distributed_timeout_s", type=float, default=300.0, help="multi-host: seconds to wait for all processes"
    )

    ev = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    common(ev, config_required=False)
    ev.add_argument(
        "--lengths", default="", help="length extrapolation: comma-separated evaluation lengths, e.g. 128,256,512"
    )

    gen = sub.add_parser("generate", help="sample text from the latest checkpoint of a workdir")
    common(gen, config_required=False)
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--temperature", type=float, default=None, help="0 is greedy (config.decode.temperature)")
    gen.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (0: off)")
    gen.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--max_new_tokens", type=int, default=None, help="tokens to generate")
    gen.add_argument("--num_samples", type=int, default=None, help="samples to draw (beam search: best beams to print)")
    gen.add_argument("--beam_size", type=int, default=None, help="> 1: beam search with this many beams")
    gen.add_argument(
        "--format",
        choices=("ids", "text"),
        default="text",
        help="text GAN workdirs: one sequence of token ids per line (Texygen's format) or detokenized text",
    )
    gen.add_argument(
        "--length_penalty", type=float, default=None, help="beam search: divide log p by length ** this (default 1)"
    )
    gen.add_argument(
        "--early_stopping",
        choices=("true", "false"),
        default=None,
        help="beam search: stop once beam_size beams finished (true) or when none can improve (false)",
    )
    att = sub.add_parser("attention", help="attention heatmaps, entropy and distance per layer and head for a text")
    common(att, config_required=False)
    att.add_argument("--text", required=True, help="the text to read (the encoder input of an encoder-decoder)")
    att.add_argument("--out", required=True, help="directory for the PNGs, index.html and attention_stats.json")
    att.add_argument("--target", default=None, help="encoder-decoder: decoder text (default: its greedy output)")
    att.add_argument(
        "--max_new_tokens", type=int, default=32, help="encoder-decoder without --target: tokens to generate"
    )
    plot = sub.add_parser("plot", help="draw loss, eval loss and logged metrics against step for one or more workdirs")
    plot.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directories (one line each)")
    plot.add_argument("--out", required=True, help="image file to write, e.g. curves.png (.pdf and .svg work too)")
    plot.add_argument("--metrics", default="", help="comma-separated metrics to draw (default: all logged)")
    pred = sub.add_parser("predict", help="labels, tags, answers or targets for new inputs (JSONL in, JSONL out)")
    common(pred, config_required=False)
    pred.add_argument("--input", required=True, help="JSONL file: one record per line, with the task's input fields")
    pred.add_argument("--output", required=True, help="JSONL file to write: each record with its prediction added")
    info = sub.add_parser("info", help="parameter counts, FLOPs per token and logical axes of a config")
    info.add_argument("--config", required=True, help="config file and argument, e.g. configs/gpt.py:size=small")
    info.set_defaults(workdir=None)

    merge = sub.add_parser("merge", help="fold a PEFT run's LoRA/DoRA/IA3 into its base: an ordinary workdir")
    merge.add_argument("--workdir", required=True, help="the PEFT run directory to read")
    merge.add_argument("--out", required=True, help="the new run directory to write")

    conv = sub.add_parser(
        "convert",
        help="import a Hugging Face checkpoint into a workdir (--from hf DIR) or export one (--to hf DIR); "
        "a Hugging Face PEFT LoRA adapter likewise (--from hf-peft DIR --base BASE, --to hf-peft DIR)",
    )
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from", dest="from_format", choices=("hf", "hf-peft"), help="import the model (or adapter) directory DIR"
    )
    direction.add_argument("--to", dest="to_format", choices=("hf", "hf-peft"), help="export to the new directory DIR")
    conv.add_argument("--workdir", required=True, help="the jaxlm run directory to create (--from) or read (--to)")
    conv.add_argument(
        "--base", default="", help="--from hf-peft: the jaxlm workdir holding the model the adapter was trained on"
    )
    conv.add_argument("path", metavar="DIR", help="Hugging Face model or PEFT adapter directory (save_pretrained)")
    return parser


def load_config(args: argparse.Namespace, overrides: dict[str, str], *, required: bool) -> config_lib.Config:
    """Config from ``--config`` (or the workdir's config.json), with ``--config.*`` overrides."""
    from jaxlm.main import workdir as workdir_lib

    if args.config:
        config = config_lib.load_config_file(args.config)
    else:
        path = workdir_lib.check_path(args.workdir, must_exist=not required)
        config = workdir_lib.saved_config(path) if os.path.isdir(path) else None
        if config is None:
            if required:
                raise ConfigError("--config is required for a new workdir; e.g. --config configs/gpt.py:size=small")
            raise ConfigError(f"--workdir {args.workdir} has no config.json; train there first or pass --config")
    config_lib.apply_overrides(config, overrides)
    return config_lib.validate(config)


def _lengths(text: str) -> list[int]:
    """``--lengths 128,256`` as integers; anything else is one line."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths {text!r}: give comma-separated integers, e.g. --lengths 128,256,512") from None
    if not lengths:
        raise UserError("--lengths is empty; give comma-separated integers, e.g. --lengths 128,256,512")
    return lengths


def _maybe_init_distributed(args: argparse.Namespace) -> None:
    """Join the other processes: from the flags, else SLURM / TPU VM environments, else alone."""
    from jaxlm import distributed

    distributed.initialize(
        args.coordinator_address, args.num_processes, args.process_id, timeout_s=args.distributed_timeout_s
    )


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` (without the program name) and run the command; returns the exit status."""
    overrides, rest = config_lib.overrides_from_argv(list(argv))
    args = _parser().parse_args(rest)
    if args.command == "train":
        config = load_config(args, overrides, required=True)
        _maybe_init_distributed(args)
        if config.gan.mode != "none":  # text GANs: their own program (jaxlm/main/gan.py)
            from jaxlm.main import gan

            gan.run(config, args.workdir)
        else:
            from jaxlm.main import train

            train.run(config, args.workdir)
    elif args.command == "predict":
        config = load_config(args, overrides, required=False)
        from jaxlm.main import predict

        count = predict.run(config, args.workdir, args.input, args.output)
        print(f"wrote {count} predictions to {args.output}")
    elif args.command == "info":
        config = load_config(args, overrides, required=True)
        from jaxlm.main import info

        info.run(config)
    elif args.command == "eval":
        config = load_config(args, overrides, required=False)
        from jaxlm.main import evaluate

        # The whole split unless --config.train.eval_steps is given here (the saved value caps training's evals).
        max_steps = config.train.eval_steps if "train.eval_steps" in overrides else 0
        if args.lengths:
            evaluate.run_lengths(config, args.workdir, _lengths(args.lengths), max_steps=max_steps)
        else:
            evaluate.run(config, args.workdir, max_steps=max_steps)
    elif args.command == "generate":
        for flag in (
            "temperature",
            "top_k",
            "top_p",
            "seed",
            "max_new_tokens",
            "num_samples",
            "beam_size",
            "length_penalty",
            "early_stopping",
        ):
            value = getattr(args, flag)
            if value is not None:
                overrides[f"decode.{flag}"] = str(value)
        config = load_config(args, overrides, required=False)
        if config.gan.mode != "none":  # a text GAN's generator: one sample per line
            from jaxlm.main import gan

            for line in gan.generate(config, args.workdir, args.format):
                print(line)
            return 0
        from jaxlm.main import generate

        for text in generate.run(config, args.workdir, args.prompt):
            print(text)
            print("-" * 40)
    elif args.command == "attention":
        config = load_config(args, overrides, required=False)
        from jaxlm.main import attention

        stats = attention.run(
            config, args.workdir, args.text, args.out, target=args.target, max_new_tokens=args.max_new_tokens
        )
        count = sum(len(s["maps"]) for s in stats["stacks"].values())
        print(f"wrote {count} heatmaps, {attention.INDEX_FILE} and {attention.STATS_FILE} to {args.out}")
    elif args.command == "plot":
        if overrides:
            raise UserError("jaxlm plot takes no --config.* overrides; it reads each workdir's metrics.jsonl")
        from jaxlm.main import plot

        names = plot.run(args.workdirs, args.out, metrics=[m for m in args.metrics.split(",") if m])
        print(f"wrote {args.out}: {', '.join(names)}")
    elif args.command == "merge":
        if overrides:
            raise UserError("--config.* overrides do not apply to merge; it uses the workdir's config")
        from jaxlm.main import merge

        merge.run(args.workdir, args.out)
    elif args.command == "convert":
        from jaxlm.main import convert

        if args.base and args.from_format != "hf-peft":
            raise UserError("--base applies to convert --from hf-peft only (the adapter's base workdir)")
        if args.from_format == "hf-peft":
            from jaxlm.main import convert_peft

            convert_peft.run_from_hf_peft(args.path, args.base, args.workdir, overrides=overrides)
        elif args.from_format:
            convert.run_from_hf(args.path, args.workdir, overrides=overrides)
        else:
            if overrides:
                raise UserError("--config.* overrides apply to convert --from only; export uses the workdir's config")
            if args.to_format == "hf-peft":
                from jaxlm.main import convert_peft

                convert_peft.run_to_hf_peft(args.workdir, args.path)
            else:
                convert.run_to_hf(args.workdir, args.path)
    return 0


def execute(argv: Sequence[str]) -> int:
    """Run ``argv`` and return the exit status, printing a user error as one line on stderr."""
    try:
        return run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        # Out of disk space, a permission lost mid-run, a cache directory under a file: name the path, no traceback.
        where = f" ({e.filename})" if e.filename else ""
        fix = {
            errno.ENOTDIR: "a part of that path is a file, not a directory; pick another path",
            errno.EROFS: "that filesystem is read-only; pick a path on a writable one",
            errno.EACCES: "fix its permissions or pick another path",
            errno.EPERM: "fix its permissions or pick another path",
        }.get(e.errno or 0, "free space or fix permissions")
        print(f"error: {e.strerror or e}{where}; {fix}, then rerun to resume", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # Ctrl-C; after a saved stop (preempt.Interrupted) it says how to resume
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point."""
    status = execute(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: background threads of prefetchers and async checkpointers
    # have been joined by now, and their finalizers only print noise at exit.
    os._exit(status)
