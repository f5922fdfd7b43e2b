"""``jaxlm eval``: loss and perplexity of a workdir's latest checkpoint on held-out text."""

from __future__ import annotations

import functools
import sys
from typing import TextIO

import flax.linen as nn
import jax

from jaxlm.config_lib import Config
from jaxlm.data import sources
from jaxlm.main import restore, train
from jaxlm.metric_writer import MetricWriter
from jaxlm.steps import lm, objectives


def run(config: Config, workdir: str, *, stream: TextIO | None = None) -> dict[str, float]:
    """Evaluate on the validation split (or ``config.data.eval_files``); print and log the result."""
    stream = stream or sys.stdout
    exp, params, tokenizer, step = restore.open_trained(config, workdir)
    validation = sources.open_sources(config.data)["validation"]
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        eval_fn = jax.jit(
            functools.partial(lm.eval_step, model=exp.model, objective=objectives.LOSSES[exp.model_cfg.kind]),
            in_shardings=(exp.state_shardings.params, None),
        )
        metrics = train.evaluate(exp, params, validation, tokenizer, eval_fn)
    writer = MetricWriter(workdir, write=jax.process_index() == 0, stream=stream)
    writer.write(step, metrics)
    writer.close()
    return metrics
