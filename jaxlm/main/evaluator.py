"""Evaluate parameters on a split with the objective's eval step and metrics: one pass, padded, every metric.

The split is read once (``num_epochs=1``); its last, partial batch is padded with rows of
weight 0 (``valid``), so every example counts exactly once and no row counts twice. A whole-split
pass reads source order; a capped one (``max_steps``, the trainer's periodic evaluation) reads the
documents in one order shuffled by ``config.data.seed``, so its batches sample the whole split
(the same rows at every evaluation) rather than its first documents, which in a corpus of files
all come from one or two files. Processes whose shard runs out first feed all-padding batches
until every process is done. Pairs are reduced and host metrics computed by :func:`jaxlm.evaluation.summarize`;
every name is returned with the ``eval_`` prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxlm import evaluation, sharding
from jaxlm.config_lib import Config
from jaxlm.data import pipeline
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.main import experiment, task_data
from jaxlm.steps import lm, objectives


def eval_options(config: Config) -> dict[str, Any]:
    """Keyword options of the objective's eval step (static under jit)."""
    d, t = config.data, config.task
    if d.objective == "qa":
        return {"max_answer_len": t.max_answer_len}
    if d.objective == "seq2seq":
        tokens = t.targets_len or (d.seq_len if config.model.kind == "encoder_decoder" else max(2, d.seq_len // 4))
        return {"num_tokens": tokens}
    return {}


def make_eval_fn(exp: experiment.Experiment) -> Callable[..., Any]:
    """The jitted eval step of the experiment's objective on its parameter shardings."""
    objective = objectives.get(exp.config.data.objective)
    fn = functools.partial(lm.eval_step, model=exp.model, evaluate=objective.evaluate, **eval_options(exp.config))
    # A PEFT run evaluates the full parameters (base + deltas), sharded like the base.
    params = exp.state_shardings.params if exp.base_shardings is None else exp.base_shardings
    return jax.jit(fn, in_shardings=(params, None))


def _one_pass(
    config: Config, source: Any, tokenizer: Tokenizer, rows: int, data: task_data.TaskData, *, sample: bool
) -> Iterator:
    count = jax.process_count()
    shard = len(source) >= count
    ds = pipeline.objective_builder(config.data.objective)(
        source,
        tokenizer,
        seq_len=config.data.seq_len,
        batch_size=rows,
        seed=config.data.seed,
        shuffle=sample,  # one epoch: the documents' order only, fixed by the seed
        prefetch=0,
        num_epochs=1,
        shard_index=jax.process_index() if shard else 0,
        shard_count=count if shard else 1,
        **data.options,
    )
    if not shard and jax.process_index() > 0:
        return iter(())  # a split smaller than the process count is read by process 0 alone
    return iter(ds)


def pad_batch(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The batch with ``valid`` and, when short, zero rows (weight 0) up to ``rows``."""
    n = len(next(iter(batch.values())))
    out = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out["valid"] = (np.arange(rows) < n).astype(np.float32)
    return out


def _all_done(done: bool) -> bool:
    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(done))))


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(
    exp: experiment.Experiment,
    params: Any,
    source: Any,
    tokenizer: Tokenizer,
    eval_fn: Callable[..., Any],
    *,
    max_steps: int = 0,
) -> dict[str, Any]:
    """Every metric of the objective over the split (``max_steps > 0`` caps the batches), as ``eval_*``."""
    cfg = exp.config
    data = task_data.resolve(cfg)
    rows = cfg.data.batch_size // jax.process_count()
    it = _one_pass(cfg, source, tokenizer, rows, data, sample=max_steps > 0)
    template: dict[str, np.ndarray] | None = None
    pairs: list[dict] = []
    outputs: dict[str, list[np.ndarray]] = {}
    steps = 0
    while not max_steps or steps < max_steps:
        batch = next(it, None)
        if _all_done(batch is None):
            break
        if batch is None:  # this process is done, others are not: an all-padding batch
            batch = {k: v[:0] for k, v in template.items() if k != "valid"}
        template = template or pad_batch(batch, rows)
        step_pairs, step_outputs = eval_fn(params, sharding.host_to_global(pad_batch(batch, rows), exp.mesh, exp.rules))
        pairs.append(jax.device_get(step_pairs))
        for k, v in step_outputs.items():
            outputs.setdefault(k, []).append(_gather(v))
        steps += 1
    if not pairs:
        return {}
    ctx = evaluation.Context(decode=tokenizer.decode, eos_id=tokenizer.eos_id, labels=data.label_names)
    summary = evaluation.summarize(cfg.data.objective, pairs, {k: np.concatenate(v) for k, v in outputs.items()}, ctx)
    return {f"eval_{k}": v for k, v in summary.items()} | {"eval_batches": steps}
