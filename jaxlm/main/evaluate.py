"""``jaxlm eval``: every metric of a workdir's objective on its whole validation split.

The newest checkpoint is evaluated on the validation split (or ``config.data.eval_files``),
all of it unless ``max_steps`` caps the batches (the CLI passes ``--config.train.eval_steps``
only when it is given on the command line: the value saved with a run caps the trainer's
periodic evaluations, not this one). Results are printed and appended to ``metrics.jsonl``
with the metric implementations and versions.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import flax.linen as nn
import jax

from jaxlm.config_lib import Config
from jaxlm.data import sources
from jaxlm.main import evaluator, restore
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
