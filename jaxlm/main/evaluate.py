"""``jaxlm eval``: every metric of a workdir's objective on its whole validation split.

The newest checkpoint is evaluated on the validation split (or ``config.data.eval_files``),
all of it unless ``max_steps`` caps the batches (the CLI passes ``--config.train.eval_steps``
only when it is given on the command line: the value saved with a run caps the trainer's
periodic evaluations, not this one). Results are printed and appended to ``metrics.jsonl``
with the metric implementations and versions.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import flax.linen as nn
import jax

from jaxlm.common_types import UserError
from jaxlm.config_lib import Config
from jaxlm.data import sources
from jaxlm.main import evaluator, experiment, restore
from jaxlm.metric_writer import MetricWriter


def run(config: Config, workdir: str, *, max_steps: int = 0, stream: TextIO | None = None) -> dict[str, Any]:
    """Evaluate the newest checkpoint of ``workdir``; print and log the metrics, and return them."""
    stream = stream or sys.stdout
    exp, params, tokenizer, step = restore.open_trained(config, workdir)
    validation = sources.open_sources(config.data)["validation"]
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        eval_fn = evaluator.make_eval_fn(exp)
        metrics = evaluator.evaluate(exp, params, validation, tokenizer, eval_fn, max_steps=max_steps)
    writer = MetricWriter(workdir, write=jax.process_index() == 0, stream=stream)
    writer.write(step, metrics)
    writer.close()
    return metrics


def run_lengths(
    config: Config, workdir: str, lengths: Sequence[int], *, max_steps: int = 0, stream: TextIO | None = None
) -> dict[int, dict[str, Any]]:
    """Length extrapolation: the newest checkpoint's metrics on validation rows of each length.

    Each length ``L`` evaluates non-overlapping rows of ``L`` tokens (``data.seq_len = L``); the
    model's ``max_len`` is raised to ``L`` where needed, which changes no parameter for
    sinusoidal, rope, relative, alibi and no positions (RoPE scaling keeps the trained length as
    its ``original_max_len``). Learned positions have no embedding past ``max_len``: such a
    length is a one-line error. Logged as ``eval_len{L}_{metric}``.
    """
    stream = stream or sys.stdout
    exp, params, tokenizer, step = restore.open_trained(config, workdir)
    config = exp.config  # with the saved run's vocabulary padding (model.vocab_multiple)
    m = config.model
    for length in lengths:
        if length < 2:
            raise UserError(f"--lengths {length}: an evaluation length must be >= 2 tokens")
        if length > m.max_len and m.position == "learned":
            raise UserError(
                f"--lengths {length} exceeds config.model.max_len={m.max_len} and the model has learned positions "
                "(no embedding past max_len); give lengths up to max_len"
            )
    validation = sources.open_sources(config.data)["validation"]
    results: dict[int, dict[str, Any]] = {}
    for length in lengths:
        model = dataclasses.replace(
            m, max_len=max(m.max_len, length), rope_original_max_len=m.rope_original_max_len or m.max_len
        )
        cfg = dataclasses.replace(config, model=model, data=dataclasses.replace(config.data, seq_len=length))
        exp_l = experiment.build(cfg, exp.model_cfg.vocab_size)
        with jax.set_mesh(exp_l.mesh), nn.logical_axis_rules(exp_l.rules):
            eval_fn = evaluator.make_eval_fn(exp_l)
            metrics = evaluator.evaluate(exp_l, params, validation, tokenizer, eval_fn, max_steps=max_steps)
        if not metrics:
            raise UserError(
                f"--lengths {length}: the validation split holds no row of {length + 1} tokens; give shorter lengths"
            )
        results[length] = metrics
    writer = MetricWriter(workdir, write=jax.process_index() == 0, stream=stream)
    writer.write(
        step,
        {f"eval_len{n}_{k.removeprefix('eval_')}": v for n, r in results.items() for k, v in r.items()},
        echo=False,
    )
    writer.close()
    print(f"{'length':>8} {'loss':>10} {'perplexity':>12} {'batches':>8}", file=stream)
    for n, r in results.items():
        print(
            f"{n:>8} {r.get('eval_loss', float('nan')):>10.4f} {r.get('eval_perplexity', float('nan')):>12.3f} "
            f"{r.get('eval_batches', 0):>8}",
            file=stream,
        )
    return results
