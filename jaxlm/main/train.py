"""``jaxlm train``: train a language model from a config, resuming from the workdir if possible."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any, TextIO

import flax.linen as nn
import jax
import numpy as np

from jaxlm import checkpoint, hardware, optim, sharding
from jaxlm.common_types import ConfigError, UserError
from jaxlm.config_lib import Config
from jaxlm.data import hosts, pipeline, sources
from jaxlm.main import data_state as data_state_lib
from jaxlm.main import experiment, lock, preempt
from jaxlm.main import workdir as workdir_lib
from jaxlm.metric_writer import MetricWriter
from jaxlm.models import config as model_config
from jaxlm.steps import lm, objectives


class NonFiniteError(UserError):
    """Training produced non-finite losses or gradients more often than the policy allows."""


def _shard_dataset(shard: int, num_shards: int, rows: int, *, config: Config, source: Any, tokenizer: Any) -> Any:
    """The training batches of one data shard (``rows`` per batch)."""
    return pipeline.objective_builder(config.data.objective)(
        source,
        tokenizer,
        seq_len=config.data.seq_len,
        batch_size=rows,
        seed=config.data.seed,
        shuffle=True,
        shard_index=shard,
        shard_count=num_shards,
        **objective_options(config),
    )


def objective_options(config: Config) -> dict[str, Any]:
    """The config's options for its objective's batch builder."""
    d = config.data
    if d.objective == "causal_lm":
        return {"packing": d.packing, "long_documents": d.long_documents}
    if d.objective == "masked_lm":
        return {"long_documents": d.long_documents}
    return {}


def _data_iterator(build_shard: Any, num_shards: int, config: Config) -> hosts.ShardedBatches:
    return hosts.ShardedBatches(
        build_shard,
        num_shards=num_shards,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        global_batch=config.data.batch_size,
    )


def global_batch_spec(ds: Any, global_batch: int, exp: experiment.Experiment) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of a global batch, read off one host batch."""
    example = next(iter(ds))
    out = {}
    for key, value in example.items():
        shape = (global_batch,) + value.shape[1:]
        out[key] = jax.ShapeDtypeStruct(
            shape, value.dtype, sharding=sharding.batch_sharding(exp.mesh, exp.rules, value.ndim)
        )
    return out


def evaluate(exp: experiment.Experiment, params: Any, source: Any, tokenizer: Any, eval_fn: Any) -> dict[str, float]:
    """Mean token loss and perplexity over the first ``eval_steps`` validation batches."""
    cfg = exp.config
    ds = pipeline.objective_builder(cfg.data.objective)(
        source,
        tokenizer,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size // jax.process_count(),
        seed=cfg.data.seed,
        shuffle=False,
        prefetch=0,
        shard_index=jax.process_index() if len(source) >= jax.process_count() else 0,
        shard_count=jax.process_count() if len(source) >= jax.process_count() else 1,
        **objective_options(cfg),
    )
    it = iter(ds)
    totals = None
    for _ in range(cfg.train.eval_steps):
        out = eval_fn(params, sharding.host_to_global(next(it), exp.mesh, exp.rules))
        totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    totals = jax.device_get(totals)
    loss = float(totals["loss_sum"]) / max(float(totals["weight_sum"]), 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def run(config: Config, workdir: str, *, stop_at: int | None = None, stream: TextIO | None = None) -> dict[str, Any]:
    """Train ``config`` in ``workdir``; returns the last logged and eval metrics.

    ``stop_at`` ends the run after that step (with a checkpoint), as an interruption would.
    """
    # ---- Workdir: one writer at a time (jaxlm/main/lock.py), held until the run ends.
    workdir_lock = lock.acquire(workdir_lib.check_path(workdir))
    try:
        metrics = _run(config, workdir, stop_at=stop_at, stream=stream)
    finally:
        workdir_lock.release()
    preempt.exit_if_interrupted()  # stopped by Ctrl-C (saved): the command exits 130
    return metrics


def _run(config: Config, workdir: str, *, stop_at: int | None, stream: TextIO | None) -> dict[str, Any]:
    stream = stream or sys.stdout
    lead = jax.process_index() == 0

    # ---- Workdir and config: refuse bad input before anything is written.
    workdir = workdir_lib.check_path(workdir)
    workdir_lib.check_compatible(workdir, config)

    # ---- Data. Process 0 prepares the dataset first, so processes sharing a filesystem do
    # not write the same files at once; the others then open what it wrote.
    if jax.process_count() > 1 and not lead:
        _barrier("jaxlm:data-prepared")
    split_sources = sources.open_sources(config.data)
    if jax.process_count() > 1 and lead:
        _barrier("jaxlm:data-prepared")
    tokenizer = workdir_lib.open_tokenizer(config, workdir, split_sources["train"])
    processes = jax.process_count()
    if config.data.batch_size % processes:
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} must be divisible by {processes} processes")
    build_shard = functools.partial(_shard_dataset, config=config, source=split_sources["train"], tokenizer=tokenizer)

    # ---- Mesh, model, optimizer, abstract sharded state.
    exp = experiment.build(config, experiment.model_vocab_size(config, tokenizer.vocab_size, tokenizer))
    divisor = sharding.batch_divisor(exp.mesh, exp.rules)
    if config.data.batch_size % (divisor * config.optim.grad_accum_steps):
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by the {divisor} batch shards "
            f"x config.optim.grad_accum_steps={config.optim.grad_accum_steps}"
        )

    # Shapes of a global batch, read off one batch of a throwaway pipeline.
    abstract_batch = global_batch_spec(build_shard(0, 1, config.data.batch_size), config.data.batch_size, exp)

    # ---- State: restore the latest checkpoint, else initialize directly sharded.
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    restored = checkpoint.restore_latest_good(
        manager, exp.abstract_state, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    if restored is not None:
        start, state, saved_data = restored
        data_iter = _data_iterator(build_shard, data_state_lib.num_shards(saved_data, config.data.num_shards), config)
        if saved_data:
            data_iter.set_state(saved_data)
        print(f"resumed from {workdir} at step {start}", file=stream, flush=True)
    else:
        start = 0
        state = experiment.init_state(exp, config.seed)
        data_iter = _data_iterator(build_shard, data_state_lib.num_shards(None, config.data.num_shards), config)
    if lead:
        workdir_lib.write_config(workdir, config)
        tokenizer.save(workdir)

    # ---- Compile the step with explicit shardings (from the persistent cache when a previous
    # run compiled it); the state buffers are donated.
    batch_shardings = {k: v.sharding for k, v in abstract_batch.items()}
    repl = sharding.replicated(exp.mesh)
    step_fn = experiment.train_step_fn(exp)
    rng = jax.random.key(config.seed + 1)
    eval_fn = jax.jit(
        functools.partial(lm.eval_step, model=exp.model, objective=objectives.LOSSES[exp.model_cfg.kind]),
        in_shardings=(exp.state_shardings.params, batch_shardings),
    )
    experiment.enable_compile_cache(config.train.compile_cache_dir)
    t0 = time.perf_counter()
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        train_step = (
            jax.jit(
                step_fn,
                donate_argnums=0,
                in_shardings=(exp.state_shardings, batch_shardings, repl),
                out_shardings=(exp.state_shardings, repl),
            )
            .lower(exp.abstract_state, abstract_batch, jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=repl))
            .compile()
        )
    compile_s = time.perf_counter() - t0

    # ---- Loop.
    writer = MetricWriter(workdir, write=lead, stream=stream)
    flops_per_token = model_config.flops_per_token(exp.model_cfg, config.data.seq_len)
    device_kind = jax.devices()[0].device_kind
    peak = hardware.peak_flops(config.train.peak_flops, device_kind, config.model.dtype)
    schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
    num_steps = config.train.num_steps
    end = num_steps if stop_at is None else min(stop_at, num_steps)
    if lead:
        n_params = experiment.param_count(exp.abstract_state.params)
        print(
            f"training {config.model.kind}: {n_params:,} params, {exp.mesh.size} devices {dict(exp.mesh.shape)}, "
            f"steps {start}->{end}, compile {compile_s:.1f}s, "
            + (
                f"MFU vs {peak:.3g} FLOP/s per device"
                if peak
                else f"no MFU (unknown device kind {device_kind!r}: set config.train.peak_flops)"
            ),
            file=stream,
            flush=True,
        )
    progress = _progress(start, end, lead and config.train.progress)
    preemption = preempt.Preemption(config.checkpoint.preemption_grace_s)
    nonfinite_run = 0
    pending: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    interval_start, interval_steps = time.perf_counter(), 0
    step = start
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        while step < end:
            batch = sharding.host_to_global(next(data_iter), exp.mesh, exp.rules)
            state, metrics = train_step(state, batch, rng)
            pending.append(metrics)
            step += 1
            interval_steps += 1
            progress.update(1)
            stopping = preemption.requested(step, config.train.log_every)
            if step % config.train.log_every == 0 or step == end or stopping:
                fetched = jax.device_get(pending)  # the only host sync, once per log interval
                elapsed = time.perf_counter() - interval_start
                # Throughput counts input positions (what the FLOPs formula is per), not targets.
                tokens_per_s = interval_steps * config.data.batch_size * config.data.seq_len / elapsed
                last = writer.write(
                    step,
                    {
                        "loss": float(np.mean([m["loss"] for m in fetched])),
                        "grad_norm": float(fetched[-1]["grad_norm"]),
                        "param_norm": float(fetched[-1]["param_norm"]),
                        "lr": float(schedule(step - 1)),
                        "step_time_s": elapsed / interval_steps,
                        "tokens_per_s": tokens_per_s,
                        "nonfinite_steps": int(sum(m["nonfinite"] for m in fetched)),
                    }
                    | ({"mfu": tokens_per_s * flops_per_token / (peak * jax.device_count())} if peak else {}),
                )
                progress.set_postfix(loss=f"{last['loss']:.3f}")
                pending, interval_start, interval_steps = [], time.perf_counter(), 0
                nonfinite_run = _check_numerics(fetched, step, nonfinite_run, config)
            if stopping:
                checkpoint.save(manager, step, state, data_state_lib.gather(data_iter.get_state()))
                print(f"preempted: saved step {step}; rerun the same command to resume", file=stream, flush=True)
                break
            if config.train.eval_every and step % config.train.eval_every == 0 and step != end:
                last.update(
                    writer.write(step, evaluate(exp, state.params, split_sources["validation"], tokenizer, eval_fn))
                )
                interval_start = time.perf_counter()
            if step % config.checkpoint.every_steps == 0 or step == end:
                checkpoint.save(manager, step, state, data_state_lib.gather(data_iter.get_state()))
        final = (
            None
            if preemption.triggered
            else evaluate(exp, state.params, split_sources["validation"], tokenizer, eval_fn)
        )
    progress.close()
    if final is not None:
        last.update(writer.write(step, final))
    manager.wait_until_finished()
    preemption.done()
    manager.close()
    writer.close()
    del data_iter
    return last


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _check_numerics(fetched: list[dict[str, Any]], step: int, run: int, config: Config) -> int:
    """Apply ``config.train.nonfinite_policy`` to the steps of one log interval.

    Returns the length of the current run of non-finite steps; raises when the policy says stop.
    The state itself never takes a non-finite update (see ``steps.lm.train_step``), so every
    checkpoint already written, and the one the run resumes from, is finite.
    """
    first = step - len(fetched) + 1
    for i, m in enumerate(fetched):
        if float(m["nonfinite"]) == 0.0:
            run = 0
            continue
        run += 1
        limit = 1 if config.train.nonfinite_policy == "stop" else config.train.max_nonfinite_steps
        if run >= limit:
            raise NonFiniteError(
                f"training stopped at step {first + i}: non-finite loss or gradients in {run} step(s) in a row "
                f"(config.train.nonfinite_policy={config.train.nonfinite_policy!r}); lower config.optim.lr, "
                "check the data, or resume from the last checkpoint"
            )
    return run


def _progress(start: int, end: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(
        total=end,
        initial=start,
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not os.isatty(2) and os.environ.get("JAXLM_PROGRESS", "") != "1",
    )
