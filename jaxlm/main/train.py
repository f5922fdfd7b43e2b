"""``jaxlm train``: pre-train or fine-tune a model from a config, resuming from the workdir if possible.

One program for every objective of the registry (``steps.objectives.OBJECTIVES``): language
models, task fine-tuning (heads, ``config.checkpoint.init_from``). It reads top to bottom in
labelled phases; what happens every N steps comes from the shared helpers of
:mod:`jaxlm.main.loop`, and evaluation from :mod:`jaxlm.main.evaluator`.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, TextIO

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import checkpoint, hardware, optim, peft, sharding
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import Config
from jaxlm.data import hosts, pipeline, sources
from jaxlm.main import data_state as data_state_lib
from jaxlm.main import evaluator, experiment, init_from, lock, loop, preempt, task_data
from jaxlm.main import workdir as workdir_lib
from jaxlm.metric_writer import MetricWriter
from jaxlm.models import config as model_config

NonFiniteError = loop.NonFiniteError  # the trainer's numerics error (kept importable from here)


def _shard_dataset(
    shard: int, num_shards: int, rows: int, *, config: Config, source: Any, tokenizer: Any, options: dict
) -> Any:
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
        **options,
    )


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


def _peft_base(exp: experiment.Experiment, config: Config, stream: TextIO | None) -> tuple[Any, dict]:
    """The frozen base of a PEFT run (init, then init_from's parameters) and its reference (hash)."""
    base = experiment.init_params(exp, config.seed)
    step = None
    if config.checkpoint.init_from:
        base, report = init_from.load(
            config.checkpoint.init_from, base, vocab_axes=exp.vocab_axes, real_vocab=exp.model_cfg.vocab_size
        )
        step = report.step
        if stream is not None:
            print(report.summary(), file=stream, flush=True)
    fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
    ref = peft.base_reference(base, config.peft, init_from=config.checkpoint.init_from, step=step, fetch=fetch)
    return base, ref


def peft_summary(exp: experiment.Experiment) -> str:
    """Trainable / total parameters and optimizer-state bytes of a PEFT run (one line)."""
    trainable = peft.count(exp.abstract_state.params)
    total = peft.count(exp.abstract_base)
    opt = peft.nbytes(exp.abstract_state.opt_state)
    return (
        f"peft {exp.config.peft.method}: {trainable:,} trainable of {total:,} params "
        f"({100 * trainable / max(total, 1):.3f}%), optimizer state {opt:,} bytes"
    )


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
    config = workdir_lib.check_compatible(workdir, config)  # a resumed run keeps its vocabulary padding
    if lead:  # the first line: what the auto switches chose on this machine, and why
        m = config.model
        switches = hardware.describe_switches(
            m.grad_barrier, m.fuse_qkv, config.train.cond_update, m.matmul_dtype, m.dtype
        )
        print(f"jaxlm train on {switches}", file=stream, flush=True)
    # The persistent compilation cache before the first compilation (the sharded init), so that a
    # restarted run loads init from it too, and a bad cache directory is refused before any work.
    experiment.enable_compile_cache(config.train.compile_cache_dir)

    # ---- Data. Process 0 prepares the dataset first, so processes sharing a filesystem do
    # not write the same files at once; the others then open what it wrote.
    if jax.process_count() > 1 and not lead:
        loop.barrier("jaxlm:data-prepared")
    split_sources = sources.open_sources(config.data)
    if jax.process_count() > 1 and lead:
        loop.barrier("jaxlm:data-prepared")
    tokenizer = workdir_lib.open_tokenizer(config, workdir, split_sources["train"])
    task = task_data.resolve(config)
    processes = jax.process_count()
    if config.data.batch_size % processes:
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} must be divisible by {processes} processes")
    build_shard = functools.partial(
        _shard_dataset, config=config, source=split_sources["train"], tokenizer=tokenizer, options=task.options
    )

    # ---- Mesh, model (with its task head), optimizer, abstract sharded state.
    vocab = experiment.model_vocab_size(config, tokenizer.vocab_size, tokenizer)
    exp = experiment.build(config, vocab, num_labels=task.num_labels)
    config = exp.config  # model.vocab_multiple resolved for this hardware and mesh: config.json keeps it
    divisor = sharding.batch_divisor(exp.mesh, exp.rules)
    if config.data.batch_size % (divisor * config.optim.grad_accum_steps):
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by the {divisor} batch shards "
            f"x config.optim.grad_accum_steps={config.optim.grad_accum_steps}"
        )

    # Shapes of a global batch, read off one batch of a throwaway pipeline.
    abstract_batch = global_batch_spec(build_shard(0, 1, config.data.batch_size), config.data.batch_size, exp)

    # ---- State: restore the latest checkpoint (it takes precedence over init_from), else
    # initialize directly sharded, then load init_from's parameters by path.
    # PEFT (config.peft): the frozen base comes from init_from (else the seed's init) on every
    # start; the state holds only the trainable tree, and its checkpoints name the base by hash.
    base = base_ref = None
    if exp.abstract_base is not None:
        base, base_ref = _peft_base(exp, config, stream if lead else None)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    restored = checkpoint.restore_latest_good(
        manager, exp.abstract_state, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    if restored is not None:
        start, state, saved_data = restored
        data_iter = _data_iterator(build_shard, data_state_lib.num_shards(saved_data, config.data.num_shards), config)
        if saved_data:
            data_iter.set_state(saved_data)
        if base_ref is not None:
            peft.check_base_reference(workdir, base_ref)
        print(f"resumed from {workdir} at step {start}", file=stream, flush=True)
    elif base is not None:
        start = 0
        state = experiment.init_peft_state(exp, base, config.seed)
        if lead:
            peft.write_base_reference(workdir, base_ref)
        data_iter = _data_iterator(build_shard, data_state_lib.num_shards(None, config.data.num_shards), config)
    else:
        start = 0
        state = experiment.init_state(exp, config.seed)
        if config.checkpoint.init_from:
            real_vocab = exp.model_cfg.vocab_size
            params, report = init_from.load(
                config.checkpoint.init_from, state.params, vocab_axes=exp.vocab_axes, real_vocab=real_vocab
            )
            state = state.replace(params=params)
            if lead:
                print(report.summary(), file=stream, flush=True)
        data_iter = _data_iterator(build_shard, data_state_lib.num_shards(None, config.data.num_shards), config)
    if lead:
        workdir_lib.write_config(workdir, task_data.with_resolved_labels(config, task))
        tokenizer.save(workdir)

    # ---- Compile the step with explicit shardings (from the persistent cache when a previous
    # run compiled it); the state buffers are donated.
    batch_shardings = {k: v.sharding for k, v in abstract_batch.items()}
    repl = sharding.replicated(exp.mesh)
    step_fn = experiment.train_step_fn(exp)
    rng = jax.random.key(config.seed + 1)
    eval_fn = evaluator.make_eval_fn(exp)
    t0 = time.perf_counter()
    # A PEFT step also takes the frozen base (sharded like parameters, never donated; None otherwise).
    # The optimizer's numbers are inputs (optim.hyperparameters): runs that differ only in lr, steps,
    # warmup, weight decay or clipping compile one program, which the persistent cache then serves.
    hyper = jax.device_put(exp.hyper, repl)
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        train_step = (
            jax.jit(
                step_fn,
                donate_argnums=0,
                in_shardings=(exp.state_shardings, batch_shardings, repl, exp.base_shardings, repl),
                out_shardings=(exp.state_shardings, repl),
            )
            .lower(
                exp.abstract_state,
                abstract_batch,
                jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=repl),
                exp.abstract_base,
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), hyper),
            )
            .compile()
        )
    compile_s = time.perf_counter() - t0

    # ---- Loop.
    writer = MetricWriter(workdir, write=lead, stream=stream)
    # Per example, from the batch's own lengths: an encoder-decoder's targets are shorter than its inputs.
    targets_len = abstract_batch["targets"].shape[1] if "targets" in abstract_batch else 0
    flops_per_example = model_config.flops_per_example(exp.model_cfg, config.data.seq_len, targets_len)
    device_kind = jax.devices()[0].device_kind
    # The peak of the dtype the matmuls actually take (bf16 runs may use f32 operands on a CPU).
    matmul_dtype = hardware.matmul_operand_dtype(config.model.matmul_dtype, config.model.dtype).name
    peak = hardware.peak_flops(config.train.peak_flops, device_kind, matmul_dtype)
    # Jitted: one program for the logged learning rate, with the step's numbers as inputs. Eagerly,
    # each log line dispatched the schedule's ~10 ops over the whole mesh (3.6 ms a line on 8 CPU
    # devices, 0.2 ms jitted) and compiled each of them on first use.
    schedule = jax.jit(lambda i, h: optim.learning_rate_schedule(config.optim, 0, h)(i))
    num_steps = config.train.num_steps
    end = num_steps if stop_at is None else min(stop_at, num_steps)
    cadence = loop.Cadence.from_config(config, end)
    if lead:
        n_params = experiment.param_count(exp.abstract_state.params)
        if base is not None:
            print(peft_summary(exp), file=stream, flush=True)
            n_params = experiment.param_count(exp.abstract_base)
        print(
            f"training {config.model.kind} on {config.data.objective}"
            + (f" ({task.options['packing']} rows)" if "packing" in task.options else "")
            + f": {n_params:,} params, "
            f"{exp.mesh.size} devices {dict(exp.mesh.shape)}, steps {start}->{end}, compile {compile_s:.1f}s, "
            + (
                f"MFU vs {peak:.3g} FLOP/s per device"
                if peak
                else f"no MFU (unknown device kind {device_kind!r}: set config.train.peak_flops)"
            ),
            file=stream,
            flush=True,
        )
    progress = loop.progress(start, end, lead and config.train.progress)
    preemption = preempt.Preemption(config.checkpoint.preemption_grace_s)
    nonfinite_run = 0
    interval = loop.Interval()
    last: dict[str, Any] = {}
    step = start

    effective = None if base is None else experiment.effective_params_fn(exp)

    def evaluate() -> dict[str, Any]:
        params = state.params if base is None else effective(base, state.params)
        return evaluator.evaluate(
            exp, params, split_sources["validation"], tokenizer, eval_fn, max_steps=config.train.eval_steps
        )

    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        while step < end:
            batch = sharding.host_to_global(next(data_iter), exp.mesh, exp.rules)
            state, metrics = train_step(state, batch, rng, base, hyper)
            interval.add(metrics)
            step += 1
            progress.update(1)
            stopping = preemption.requested(step, config.train.log_every)
            if cadence.log_due(step) or stopping:
                fetched, step_time = interval.close()  # the only host sync, once per log interval
                # Throughput counts input positions (what the FLOPs formula is per), not targets.
                tokens_per_s = config.data.batch_size * config.data.seq_len / step_time
                logged = loop.average(fetched)
                logged.pop("tokens", None)
                last = writer.write(
                    step,
                    logged
                    | {"lr": float(schedule(step - 1, hyper)), "step_time_s": step_time, "tokens_per_s": tokens_per_s}
                    | (
                        {"mfu": config.data.batch_size / step_time * flops_per_example / (peak * exp.mesh.size)}
                        if peak
                        else {}
                    ),
                )
                progress.set_postfix(loss=f"{last['loss']:.3f}")
                nonfinite_run = loop.check_numerics(fetched, step, nonfinite_run, config)
            if stopping:
                checkpoint.save(manager, step, state, data_state_lib.gather(data_iter.get_state()))
                print(f"preempted: saved step {step}; rerun the same command to resume", file=stream, flush=True)
                break
            if cadence.eval_due(step):
                last.update(writer.write(step, evaluate()))
                interval.restart_clock()
            if cadence.checkpoint_due(step):
                checkpoint.save(manager, step, state, data_state_lib.gather(data_iter.get_state()))
        final = None if preemption.triggered else evaluate()
    progress.close()
    if final is not None:
        last.update(writer.write(step, final))
    manager.wait_until_finished()
    preemption.done()
    manager.close()
    writer.close()
    del data_iter
    return last
