"""``jaxlm train`` for text GANs (``config.gan.mode`` = seqgan | gumbel), and sampling from a GAN workdir.

The run is one sequence of global steps, each one jitted update on one real batch:

    [0, P_g)              MLE pre-training of G     (gan.pretrain_g_steps, or pretrain_g_epochs passes)
    [P_g, P_g + P_d)      D pre-training            (gan.pretrain_d_steps, each d_epochs updates)
    then adv_rounds x     g_steps G updates (SeqGAN policy gradient or Gumbel-softmax), then
                          d_steps D batches (each d_epochs updates on one real/fake pair)

Which update a step is follows from its number alone, so the state (``steps.gan.GanState``:
G, D, the rollout copy, both AdamW states, the RNG) plus the data position is everything a
checkpoint needs, and a run killed anywhere resumes bitwise. Logging, evaluation and checkpoint
cadence, preemption and the non-finite policy are the shared helpers of ``jaxlm.main.loop`` and
``jaxlm.main.preempt``; ``config.train.log_every``, ``eval_every`` and ``checkpoint.every_steps``
count these global steps.

Data: ``data.source='oracle'`` draws ``gan.oracle_num_train`` training and ``oracle_num_test``
held-out sequences of ``data.seq_len`` tokens from the SeqGAN oracle (vocabulary 5,000, start id
0); ``builtin`` / ``files`` use the lines that fit ``seq_len`` tokens (with an end id and pads).
Evaluation logs NLL_oracle (oracle data), NLL_test, distinct-n and, with
``gan.eval_bleu_samples``, BLEU-2..5 / Self-BLEU-2..5 with their implementation string.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import checkpoint, evaluation_gan, param_paths, sharding
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import Config
from jaxlm.data import oracle as oracle_data
from jaxlm.data import oracle_sequences, sources, tokenizers
from jaxlm.main import experiment, lock, loop, preempt
from jaxlm.main import workdir as workdir_lib
from jaxlm.metric_writer import MetricWriter
from jaxlm.models import gan as gan_models
from jaxlm.models.gan import oracle as oracle_model
from jaxlm.steps import gan as gan_steps

MLE, D, G = "mle", "d", "g"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which update each global step is, from the config and the data size."""

    pretrain_g: int
    pretrain_d: int
    g_steps: int
    d_steps: int
    rounds: int

    @classmethod
    def from_config(cls, config: Config, batches_per_epoch: int) -> Schedule:
        g = config.gan
        pretrain_g = g.pretrain_g_steps or g.pretrain_g_epochs * batches_per_epoch
        return cls(pretrain_g, g.pretrain_d_steps, g.g_steps, g.d_steps, g.adv_rounds)

    @property
    def total(self) -> int:
        """Number of global steps."""
        return self.pretrain_g + self.pretrain_d + self.rounds * (self.g_steps + self.d_steps)

    def kind(self, step: int) -> str:
        """The update global step ``step`` (0-based) makes."""
        if step < self.pretrain_g:
            return MLE
        if step < self.pretrain_g + self.pretrain_d:
            return D
        return G if self.position(step)[1] < self.g_steps else D

    def position(self, step: int) -> tuple[int, int]:
        """``(round, index within the round)`` of an adversarial step (round -1 before them)."""
        adv = step - self.pretrain_g - self.pretrain_d
        if adv < 0:
            return -1, 0
        return divmod(adv, self.g_steps + self.d_steps)


@dataclasses.dataclass
class Data:
    """The training and held-out sequences, and how to show them."""

    train: np.ndarray  # [N, T] int32
    test: np.ndarray
    vocab_size: int
    start_id: int
    tokenizer: tokenizers.Tokenizer | None  # None for the oracle (its ids are the text)


@dataclasses.dataclass
class Gan:
    """Models, optimizers, mesh and the abstract sharded state of a GAN run."""

    gen: gan_models.Generator
    disc: gan_models.Discriminator
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    abstract_state: gan_steps.GanState
    state_shardings: gan_steps.GanState
    # The optimizers' numbers (:func:`hyperparameters`) that the compiled updates take as inputs.
    hyper: dict[str, np.float32] = dataclasses.field(default_factory=dict)


def _oracle_params() -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in oracle_data.load_oracle().items()}


def load_data(config: Config, workdir: str, *, stream: TextIO) -> Data:
    """The run's sequences: oracle samples (jitted sampler, fixed by ``data.seed``) or lines of text."""
    d, g = config.data, config.gan
    if d.source == "oracle":
        params = _oracle_params()
        draw = jax.jit(oracle_model.sample, static_argnums=(2, 3))
        train = np.asarray(draw(params, jax.random.key(d.seed), g.oracle_num_train, d.seq_len))
        test = np.asarray(draw(params, jax.random.key(d.seed + 1_000_003), g.oracle_num_test, d.seq_len))
        return Data(train, test, oracle_data.VOCAB_SIZE, oracle_data.START_TOKEN, None)
    split = sources.open_sources(d)
    tokenizer = workdir_lib.open_tokenizer(config, workdir, split["train"], stream=stream)
    train = oracle_sequences.encode_lines(oracle_sequences.source_lines(split["train"]), tokenizer, d.seq_len)
    test = oracle_sequences.encode_lines(oracle_sequences.source_lines(split["validation"]), tokenizer, d.seq_len)
    return Data(train, test, tokenizer.vocab_size, tokenizer.bos_id, tokenizer)


def hyperparameters(config: Config, pretrain_g: int) -> dict[str, np.float32]:
    """The numbers the compiled updates take as inputs, as float32 scalars (as ``jaxlm.optim.hyperparameters``).

    Runs that differ only in the learning rates, the MLE pre-training length, weight decay or the
    clipping norm then share their compiled programs through the persistent cache. Adam's betas
    stay constants (optax computes ``1 - b1`` inside the update).
    """
    g = config.gan
    values = {
        "g_lr": g.g_lr,
        "adv_g_lr": g.adv_g_lr,
        "d_lr": g.d_lr,
        "pretrain_g": pretrain_g,
        "weight_decay": g.weight_decay,
        "clip_norm": g.clip_norm,
    }
    return {k: np.float32(v) for k, v in values.items()}


def optimizers(
    config: Config, hyper: dict[str, Any]
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """G's and D's AdamW from ``hyper`` (:func:`hyperparameters`, possibly traced).

    MLE pre-training and adversarial G updates share one AdamW state (its count orders them): G's
    learning rate is ``g_lr`` for the first ``pretrain_g`` G updates, ``adv_g_lr`` after (optax's
    ``join_schedules`` of two constants). Clipping and weight decay exist when the config's values
    are above 0 (clipping shapes the optimizer state).
    """
    g = config.gan

    def adamw(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        parts = [optax.clip_by_global_norm(hyper["clip_norm"])] if g.clip_norm > 0 else []
        decay = hyper["weight_decay"] if g.weight_decay else 0.0
        parts.append(optax.adamw(lr, b1=g.b1, b2=g.b2, weight_decay=decay))
        return optax.chain(*parts)

    g_lr = lambda count: jnp.where(count < hyper["pretrain_g"], hyper["g_lr"], hyper["adv_g_lr"])  # noqa: E731
    return adamw(g_lr), adamw(hyper["d_lr"])


def _subtree_specs(tree: Any, abstract_params: Any, param_specs: Any) -> Any:
    """Logical specs of ``tree`` (params or an optimizer state).

    A leaf takes the spec of the parameter whose path ends its own path and whose rank it has
    (optimizer moments mirror their parameter); other leaves are replicated.
    """
    flat = {
        tuple(param_paths.key_str(p) for p in path): spec
        for (path, _), spec in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        )
    }

    def spec_for(path: tuple, leaf: Any) -> jax.sharding.PartitionSpec:
        key = tuple(param_paths.key_str(p) for p in path)
        for n in range(len(key), 0, -1):
            spec = flat.get(key[-n:])
            if spec is not None and len(spec) == len(leaf.shape):
                return spec
        return jax.sharding.PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def build(config: Config, vocab_size: int, start_id: int, pretrain_g: int) -> Gan:
    """Models, optimizers, mesh, and the abstract state with its shardings (nothing materialized)."""
    g = config.gan
    seq_len = config.data.seq_len
    gen = gan_models.build_generator(g, config.model, vocab_size, seq_len, start_id)
    disc = gan_models.build_discriminator(g, config.model, vocab_size, seq_len)
    hyper = hyperparameters(config, pretrain_g)
    g_tx, d_tx = optimizers(config, hyper)
    mesh = sharding.make_mesh(config.mesh)
    rules = config.sharding.as_tuples()
    g_boxed = jax.eval_shape(gen.init, jax.random.key(0))
    d_boxed = jax.eval_shape(disc.init, jax.random.key(0))
    g_abs, d_abs = nn.unbox(g_boxed), nn.unbox(d_boxed)
    abstract = jax.eval_shape(lambda gp, dp: gan_steps.GanState.create(gp, dp, g_tx, d_tx, 0), g_abs, d_abs)
    g_specs, d_specs = sharding.logical_specs(g_boxed), sharding.logical_specs(d_boxed)
    specs = gan_steps.GanState(
        step=jax.sharding.PartitionSpec(),
        g_params=_subtree_specs(abstract.g_params, g_abs, g_specs),
        d_params=_subtree_specs(abstract.d_params, d_abs, d_specs),
        rollout_params=_subtree_specs(abstract.rollout_params, g_abs, g_specs),
        g_opt_state=_subtree_specs(abstract.g_opt_state, g_abs, g_specs),
        d_opt_state=_subtree_specs(abstract.d_opt_state, d_abs, d_specs),
        rng=jax.sharding.PartitionSpec(),
    )
    shardings = sharding.logical_to_sharding(specs, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Gan(gen, disc, g_tx, d_tx, mesh, rules, abstract, shardings, hyper)


def init_state(gan: Gan, seed: int) -> gan_steps.GanState:
    """A fresh state, initialized directly into its shardings."""

    def init(rng: jax.Array) -> gan_steps.GanState:
        k_g, k_d = jax.random.split(rng)
        gp, dp = nn.unbox(gan.gen.init(k_g)), nn.unbox(gan.disc.init(k_d))
        return gan_steps.GanState.create(gp, dp, gan.g_tx, gan.d_tx, seed + 1)

    num_params = experiment.param_count((gan.abstract_state.g_params, gan.abstract_state.d_params))
    with jax.set_mesh(gan.mesh), nn.logical_axis_rules(gan.rules):
        return experiment.run_init(init, num_params, jax.random.key(seed), out_shardings=gan.state_shardings)


def step_functions(gan: Gan, config: Config) -> dict[str, Callable[..., Any]]:
    """The three updates as pure functions ``(state, batch, temperature, hyper) -> (state, metrics)``.

    ``hyper`` is :func:`hyperparameters` (``gan.hyper``): the optimizers are built from it inside
    the update, so their numbers are inputs of the compiled program rather than constants in it.
    """
    g = config.gan

    def with_optimizer(update: Callable[..., Any], tx_name: str, **kw: Any) -> Callable[..., Any]:
        def step(state: gan_steps.GanState, batch: Any, temperature: jax.Array, hyper: Any) -> Any:
            txs = dict(zip(("g_tx", "d_tx"), optimizers(config, hyper)))
            return update(state, batch, temperature, **{tx_name: txs[tx_name]}, **kw)

        return step

    adversarial_g = (
        with_optimizer(
            gan_steps.seqgan_g_step,
            "g_tx",
            gen=gan.gen,
            disc=gan.disc,
            loss=g.loss,
            num_rollouts=g.num_rollouts,
            rollout_update_rate=g.rollout_update_rate,
        )
        if g.mode == "seqgan"
        else with_optimizer(
            gan_steps.gumbel_g_step, "g_tx", gen=gan.gen, disc=gan.disc, loss=g.loss, feed=g.gumbel_feed
        )
    )
    return {
        MLE: with_optimizer(gan_steps.mle_step, "g_tx", gen=gan.gen),
        D: with_optimizer(
            gan_steps.d_step,
            "d_tx",
            gen=gan.gen,
            disc=gan.disc,
            mode=g.mode,
            loss=g.loss,
            gp_weight=g.gp_weight,
            d_epochs=g.d_epochs,
            feed=g.gumbel_feed,
        ),
        G: adversarial_g,
    }


def _temperature(config: Config, schedule: Schedule, step: int) -> float:
    g = config.gan
    if g.mode != "gumbel":
        return 1.0
    r, _ = schedule.position(step)
    return gan_steps.temperature_at(g.temperature_schedule, g.max_temperature, max(r, 0), schedule.rounds)


def _average(fetched: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One interval's metrics: ``loop.average`` per kind of update (their keys differ), merged."""
    out: dict[str, Any] = {}
    nonfinite = 0
    for kind in (MLE, D, G):
        group = [m for k, m in fetched if k == kind]
        if group:
            averaged = loop.average(group)
            nonfinite += averaged.pop("nonfinite_steps", 0)
            out.update(averaged)
    out["nonfinite_steps"] = nonfinite
    return out


def run(config: Config, workdir: str, *, stop_at: int | None = None, stream: TextIO | None = None) -> dict[str, Any]:
    """Train the GAN of ``config`` in ``workdir`` (resuming from its checkpoint); returns the last metrics.

    ``stop_at`` ends the run after that global step (with a checkpoint), as an interruption would.
    """
    workdir_lock = lock.acquire(workdir_lib.check_path(workdir))
    try:
        metrics = _run(config, workdir, stop_at=stop_at, stream=stream or sys.stdout)
    finally:
        workdir_lock.release()
    preempt.exit_if_interrupted()
    return metrics


def _run(config: Config, workdir: str, *, stop_at: int | None, stream: TextIO) -> dict[str, Any]:
    lead = jax.process_index() == 0
    g = config.gan

    # ---- Workdir and data (every process computes the same arrays).
    workdir = workdir_lib.check_path(workdir)
    workdir_lib.check_compatible(workdir, config)
    if jax.process_count() > 1 and not lead:
        loop.barrier("jaxlm:gan-data")
    data = load_data(config, workdir, stream=stream)
    if jax.process_count() > 1 and lead:
        loop.barrier("jaxlm:gan-data")
    batch_size = config.data.batch_size
    data_iter = oracle_sequences.SequenceBatches(
        data.train,
        batch_size,
        config.data.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    schedule = Schedule.from_config(config, data_iter.batches_per_epoch)

    # ---- Models, optimizers, mesh and the abstract sharded state.
    gan = build(config, data.vocab_size, data.start_id, schedule.pretrain_g)
    divisor = sharding.batch_divisor(gan.mesh, gan.rules)
    if batch_size % divisor:
        raise ConfigError(f"config.data.batch_size={batch_size} must be divisible by the {divisor} batch shards")

    # ---- State: the latest checkpoint, else a fresh one (its init is compiled too: cache it).
    experiment.enable_compile_cache(config.train.compile_cache_dir)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    restored = checkpoint.restore_latest_good(
        manager, gan.abstract_state, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    if restored is not None:
        start, state, saved_data = restored
        if saved_data:
            data_iter.set_state(saved_data)
        print(f"resumed from {workdir} at step {start}", file=stream, flush=True)
    else:
        start, state = 0, init_state(gan, config.seed)
    if lead:
        workdir_lib.write_config(workdir, config)
        if data.tokenizer is not None:
            data.tokenizer.save(workdir)

    # ---- Compiled updates (donated state, explicit shardings) and evaluation.
    repl = sharding.replicated(gan.mesh)
    batch_sharding = {"tokens": sharding.batch_sharding(gan.mesh, gan.rules, 2)}
    compiled = {
        kind: jax.jit(
            fn,
            donate_argnums=0,
            in_shardings=(gan.state_shardings, batch_sharding, repl, repl),
            out_shardings=(gan.state_shardings, repl),
        )
        for kind, fn in step_functions(gan, config).items()
    }
    hyper = jax.device_put(gan.hyper, repl)
    evaluate = _evaluator(config, gan, data)

    # ---- Loop.
    writer = MetricWriter(workdir, write=lead, stream=stream)
    end = schedule.total if stop_at is None else min(stop_at, schedule.total)
    cadence = loop.Cadence.from_config(config, end)
    if lead:
        print(
            f"training a text GAN ({g.mode}, {g.generator} generator, {g.discriminator} discriminator, {g.loss} loss): "
            f"G {experiment.param_count(gan.abstract_state.g_params):,} params, "
            f"D {experiment.param_count(gan.abstract_state.d_params):,} params, {gan.mesh.size} devices, "
            f"{len(data.train)} training sequences of {config.data.seq_len}; steps {start}->{end} "
            f"(MLE {schedule.pretrain_g}, D pre-training {schedule.pretrain_d}, {schedule.rounds} rounds of "
            f"{schedule.g_steps} G + {schedule.d_steps} D)",
            file=stream,
            flush=True,
        )
    progress = loop.progress(start, end, lead and config.train.progress, desc="gan")
    preemption = preempt.Preemption(config.checkpoint.preemption_grace_s)
    interval = loop.Interval()
    kinds: list[str] = []
    nonfinite_run = 0
    last: dict[str, Any] = {}
    step = start
    with jax.set_mesh(gan.mesh), nn.logical_axis_rules(gan.rules):
        while step < end:
            kind = schedule.kind(step)
            temperature = jnp.asarray(_temperature(config, schedule, step), jnp.float32)
            batch = sharding.host_to_global(next(data_iter), gan.mesh, gan.rules)
            state, metrics = compiled[kind](state, batch, temperature, hyper)
            interval.add(metrics)
            kinds.append(kind)
            step += 1
            progress.update(1)
            stopping = preemption.requested(step, config.train.log_every)
            if cadence.log_due(step) or stopping:
                fetched, step_time = interval.close()  # the only host sync, once per log interval
                logged = _average(list(zip(kinds, fetched))) | {"step_time_s": step_time}
                last = writer.write(step, logged)
                nonfinite_run = loop.check_numerics(fetched, step, nonfinite_run, config)
                kinds = []
            if stopping:
                checkpoint.save(manager, step, state, data_iter.get_state())
                print(f"preempted: saved step {step}; rerun the same command to resume", file=stream, flush=True)
                break
            if cadence.eval_due(step):
                last.update(writer.write(step, evaluate(state)))
                interval.restart_clock()
            if cadence.checkpoint_due(step):
                checkpoint.save(manager, step, state, data_iter.get_state())
        final = None if preemption.triggered else evaluate(state)
    progress.close()
    if final is not None:
        last.update(writer.write(step, final))
    manager.wait_until_finished()
    preemption.done()
    manager.close()
    writer.close()
    return last


def _evaluator(config: Config, gan: Gan, data: Data) -> Callable[[gan_steps.GanState], dict[str, Any]]:
    """``evaluate(state) -> metrics``: NLL_oracle, NLL_test, distinct-n and optionally BLEU / Self-BLEU.

    Samples come from a fixed key, so evaluations at different steps differ only by G.
    """
    g = config.gan
    repl = sharding.replicated(gan.mesh)
    sample = jax.jit(
        lambda params, rng: gan_steps.sample_tokens(gan.gen, params, rng, g.eval_num_samples),
        in_shardings=(gan.state_shardings.g_params, repl),
        out_shardings=repl,
    )
    nll = jax.jit(
        functools.partial(gan_steps.nll_sums, gen=gan.gen),
        in_shardings=(gan.state_shardings.g_params, {"tokens": sharding.batch_sharding(gan.mesh, gan.rules, 2)}),
        out_shardings=repl,
    )
    oracle_nll = jax.jit(oracle_model.nll) if config.data.source == "oracle" else None
    oracle_params = _oracle_params() if oracle_nll is not None else None
    batch_size = config.data.batch_size
    test_batches = max(len(data.test) // batch_size, 0)
    if test_batches == 0:
        raise ConfigError(
            f"the held-out set has {len(data.test)} sequences, fewer than config.data.batch_size={batch_size}; "
            "raise config.gan.oracle_num_test or config.data.eval_fraction"
        )
    rows = batch_size // jax.process_count()
    lo = jax.process_index() * rows

    def evaluate(state: gan_steps.GanState) -> dict[str, Any]:
        samples = np.asarray(jax.device_get(sample(state.g_params, jax.random.key(config.seed + 7))))
        out: dict[str, Any] = {}
        if oracle_nll is not None:
            out["nll_oracle"] = float(oracle_nll(oracle_params, jnp.asarray(samples)))
        totals = np.zeros(2)
        for i in range(test_batches):
            block = data.test[i * batch_size : (i + 1) * batch_size][lo : lo + rows]
            sums = jax.device_get(nll(state.g_params, sharding.host_to_global({"tokens": block}, gan.mesh, gan.rules)))
            totals += (float(sums["nll_sum"]), float(sums["count"]))
        out["nll_test"] = evaluation_gan.nll_from_sums(*totals)
        out.update(evaluation_gan.diversity_metrics(samples))
        if g.eval_bleu_samples:
            refs = data.test[: g.eval_bleu_references]
            out.update(evaluation_gan.bleu_metrics(samples[: g.eval_bleu_samples], refs))
        return out

    return evaluate


# ---- ``jaxlm generate`` for a GAN workdir.


def generate(config: Config, workdir: str, fmt: str = "ids") -> list[str]:
    """``config.decode.num_samples`` sequences from the latest G of ``workdir``: ids (Texygen) or text lines.

    Text samples are one per line: a line break G samples inside a sequence is written as a space.
    """
    from jaxlm.common_types import CheckpointError, UserError

    workdir = workdir_lib.check_path(workdir, must_exist=True)
    workdir_lib.check_compatible(workdir, config)
    if config.data.source == "oracle":
        tokenizer, vocab, start_id = None, oracle_data.VOCAB_SIZE, oracle_data.START_TOKEN
    else:
        tokenizer = tokenizers.load(workdir)
        vocab, start_id = tokenizer.vocab_size, tokenizer.bos_id
    if fmt == "text" and tokenizer is None:
        fmt = "ids"  # the oracle's tokens have no text: its ids are the sequences
    elif fmt not in ("ids", "text"):
        raise UserError(f"--format={fmt!r} is not one of: ids, text")
    manager = checkpoint.make_manager(workdir, config.checkpoint, read_only=True)
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"--workdir {workdir} has no checkpoint yet; train first with jaxlm train")
    # The rollout/MLE split of the learning rate does not change the state's shapes.
    gan = build(config, vocab, start_id, 0)
    state, _ = checkpoint.restore(manager, step, gan.abstract_state)
    manager.close()
    d = config.decode
    sample = jax.jit(
        lambda params, rng: gan_steps.sample_tokens(gan.gen, params, rng, d.num_samples, temperature=d.temperature)
    )
    ids = np.asarray(jax.device_get(sample(state.g_params, jax.random.key(d.seed))))
    if fmt == "ids":
        return [" ".join(str(int(t)) for t in row) for row in ids]
    texts = (tokenizer.decode(row[: _length(row, tokenizer.eos_id)]) for row in ids)
    return [" ".join(t.splitlines()) for t in texts]


def _length(row: np.ndarray, eos_id: int) -> int:
    hits = np.nonzero(row == eos_id)[0]
    return int(hits[0]) if len(hits) else len(row)
