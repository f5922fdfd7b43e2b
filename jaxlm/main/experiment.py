"""What train, eval and generate build the same way: mesh, model, optimizer, sharded state.

The state is never materialized on one device: its shapes come from ``jax.eval_shape``, its
shardings from the parameters' logical axis names and ``config.sharding.rules``, and it is
either restored from a checkpoint onto those shardings or initialized by a jitted ``init``
whose ``out_shardings`` place every shard directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from jaxlm import hardware, models, optim, param_paths, peft, sharding
from jaxlm import logical_axes as ax
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import Config, ModelConfig
from jaxlm.data import objectives_t5, pipeline
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.models import heads, vocab
from jaxlm.nn import matmul
from jaxlm.steps import lm, objectives
from jaxlm.train_state import TrainState


@dataclasses.dataclass
class Experiment:
    """The pieces every program needs, built from a validated config."""

    config: Config
    model_cfg: ModelConfig
    model: nn.Module
    tx: optax.GradientTransformation
    mesh: Mesh
    rules: sharding.Rules
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    # Lightweight fine-tuning (config.peft): the state holds only the trainable tree; the frozen
    # base parameters travel beside it with these shapes and shardings (None otherwise).
    abstract_base: Any = None
    base_shardings: Any = None
    # {parameter path: axis} of the parameters whose axis holds the (padded) vocabulary (jaxlm.models.vocab).
    vocab_axes: dict[str, int] = dataclasses.field(default_factory=dict)
    # The optimizer's numbers (optim.hyperparameters) that the trainer's compiled step takes as inputs.
    hyper: optim.Hyper = dataclasses.field(default_factory=dict)


def enable_compile_cache(directory: str) -> str | None:
    """Turn on JAX's persistent compilation cache in ``directory``; returns the directory used.

    ``''`` is the directory JAX was already given (``JAX_COMPILATION_CACHE_DIR``), else
    ``~/.cache/jaxlm/xla``; ``'none'`` turns it off. Every compiled program is cached (no minimum
    compile time or size), so a resumed run's first step compiles from the cache.
    """
    if directory == "none":
        return None
    default = jax.config.jax_compilation_cache_dir or os.path.join("~", ".cache", "jaxlm", "xla")
    path = os.path.expanduser(directory or default)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def model_vocab_size(config: Config, tokenizer_vocab: int, tokenizer: Tokenizer | None = None) -> int:
    """Ids the model needs: the tokenizer's, plus T5 sentinels for span corruption.

    No sentinels are added when ``tokenizer`` already holds T5's own (``<extra_id_*>``).
    """
    if config.data.objective != "span_corruption":
        return tokenizer_vocab
    n = pipeline.SPAN_CORRUPTION_SENTINELS
    if tokenizer is not None and objectives_t5.own_sentinel_start(tokenizer, n) is not None:
        return tokenizer_vocab
    return tokenizer_vocab + n


# config.model.vocab_multiple=0 (auto): what the matmuls' tiles divide. GPU/TPU: 128 (tensor cores, MXU).
# CPU: the f32 SIMD width; padding further only adds work there (263 -> 384 made the quick-start step
# slower; bench/README.md "Vocabulary padding").
ACCELERATOR_VOCAB_MULTIPLE = 128
CPU_VOCAB_MULTIPLE: dict[str, int] = {"amx": 16, "avx512_bf16": 16, "avx512": 16, "avx2": 8, "other": 8}


def resolve_vocab_multiple(config: Config, mesh_shape: dict[str, int] | None = None) -> Config:
    """``config`` with a concrete ``model.vocab_multiple`` (auto resolved, times the vocabulary's mesh axes).

    Auto (0) becomes the hardware's multiple, which is then raised to a multiple of the mesh
    axes that shard the vocabulary (the ``vocab`` and ``act_vocab`` rules).
    ``mesh_shape`` (axis -> size) defaults to ``config.mesh``'s fixed sizes (a ``-1`` axis counts
    as 1: ``build`` passes the real mesh).
    Programs write the result into the workdir's ``config.json``, so a run resumed or evaluated
    elsewhere keeps the padded size its checkpoints hold. ``ModelConfig.padded_vocab_size``
    then computes the size.
    """
    m = config.model
    multiple = m.vocab_multiple
    if multiple == 0:
        on_cpu = jax.default_backend() == "cpu"
        multiple = CPU_VOCAB_MULTIPLE[hardware.cpu_info().isa] if on_cpu else ACCELERATOR_VOCAB_MULTIPLE
    if mesh_shape is None:
        mesh_shape = {a: max(s, 1) * config.mesh.dcn_shape[a] for a, s in config.mesh.shape.items()}
    for name, axes in config.sharding.as_tuples():
        if name in (ax.VOCAB, ax.ACT_VOCAB) and axes:
            multiple = math.lcm(multiple, math.prod(mesh_shape[a] for a in axes))
    if multiple == m.vocab_multiple:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(m, vocab_multiple=multiple))


def example_args(cfg: ModelConfig, seq_len: int, objective: str = "causal_lm") -> tuple[jax.Array, ...]:
    """Positional inputs that initialize a model for ``objective`` (shapes only matter)."""
    return objectives.get(objective).example_args(cfg, seq_len)


def build(config: Config, vocab_size: int, *, num_steps: int | None = None, num_labels: int = 0) -> Experiment:
    """Mesh, model (with the task head the config asks for), optimizer and the abstract sharded state.

    ``num_labels`` sizes a classification or tagging head when the config does not (the
    dataset's label count, see :mod:`jaxlm.main.task_data`). The vocabulary arrays are padded
    (:func:`resolve_vocab_multiple`; the returned ``Experiment.config`` holds the concrete multiple).
    """
    mesh = sharding.make_mesh(config.mesh)
    config = resolve_vocab_multiple(config, dict(mesh.shape))
    model_cfg = models.resolve(config.model, vocab_size)
    if model_cfg.vocab_size < vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size}; "
            "set it to 0 to follow the tokenizer"
        )
    if config.model.dtype == "float16" and jax.default_backend() == "cpu":
        # XLA:CPU has no float16 x float16 -> float32 matmul; it would fail at compile time.
        raise ConfigError("config.model.dtype=float16 does not run on the CPU backend; use bfloat16 or float32")
    # The matmuls' operand dtype (model.matmul_dtype) holds for everything traced from here on.
    matmul.set_operand_setting(config.model.matmul_dtype)
    rules = config.sharding.as_tuples()
    model = models.build(model_cfg, head=heads.from_config(config, num_labels or None))
    tx = optim.make_optimizer(config.optim, num_steps or config.train.num_steps)
    hyper = optim.hyperparameters(config.optim, num_steps or config.train.num_steps)

    def init_boxed(rng: jax.Array) -> Any:
        args = example_args(model_cfg, config.data.seq_len, config.data.objective)
        return model.init({"params": rng}, *args)["params"]

    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    param_specs = sharding.logical_specs(boxed)
    abstract_params = nn.unbox(boxed)
    abstract_base = base_shardings = None
    if peft.enabled(config.peft):
        base_shardings = sharding.logical_to_sharding(param_specs, mesh, rules)
        abstract_base = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, base_shardings
        )
        trainable = jax.eval_shape(lambda p: peft.init(jax.random.key(0), p, config.peft), abstract_params)
        abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx), trainable)
    else:
        abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx), abstract_params)
    # Optimizer moments mirror the parameters; scalars (counts) are replicated.
    state_specs = _state_specs(abstract_state, abstract_params, param_specs)
    state_shardings = sharding.logical_to_sharding(state_specs, mesh, rules)
    _check_divisible(abstract_state, state_shardings)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings
    )
    return Experiment(
        config,
        model_cfg,
        model,
        tx,
        mesh,
        rules,
        abstract_state,
        state_shardings,
        abstract_base,
        base_shardings,
        vocab.vocab_axes(boxed),
        hyper,
    )


def _state_specs(abstract_state: TrainState, abstract_params: Any, param_specs: Any) -> TrainState:
    """Logical PartitionSpecs for the whole state: moments take their parameter's spec."""
    flat_params = {
        _shape_path(path): spec
        for (path, _), spec in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        )
    }

    def spec_for(path: tuple, leaf: Any) -> jax.sharding.PartitionSpec:
        key = _shape_path(path)
        # An optimizer leaf's path ends with the parameter's path (e.g. opt_state/0/mu/<param path>).
        for n in range(len(key), 0, -1):
            spec = flat_params.get(key[-n:])
            if spec is not None and len(spec) == len(leaf.shape):
                return spec
        return jax.sharding.PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, abstract_state)


def _shape_path(path: tuple) -> tuple:
    return tuple(param_paths.key_str(p) for p in path)


def _check_divisible(abstract_state: TrainState, shardings: TrainState) -> None:
    def check(path: tuple, leaf: Any, s: jax.sharding.NamedSharding) -> None:
        for dim, axes in zip(leaf.shape, s.spec):
            if axes is None:
                continue
            names = (axes,) if isinstance(axes, str) else axes
            size = 1
            for a in names:
                size *= s.mesh.shape[a]
            if dim % size:
                raise ConfigError(
                    f"parameter {'/'.join(_shape_path(path))} has a dimension of {dim} that mesh axes "
                    f"{'x'.join(names)} (size {size}) do not divide; change config.mesh.shape or "
                    "config.sharding.rules, "
                    "or pad the size "
                    "(e.g. config.model.vocab_size to a multiple of it)"
                )

    jax.tree_util.tree_map_with_path(check, abstract_state, shardings)


def init_state(exp: Experiment, seed: int) -> TrainState:
    """Initialize the state directly into its shardings (never whole on one device)."""

    def init(rng: jax.Array) -> TrainState:
        args = example_args(exp.model_cfg, exp.config.data.seq_len, exp.config.data.objective)
        params = nn.unbox(exp.model.init({"params": rng}, *args)["params"])
        return TrainState.create(params, exp.tx)

    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        return run_init(
            init, param_count(exp.abstract_state.params), jax.random.key(seed), out_shardings=exp.state_shardings
        )


def run_init(fn: Callable[..., Any], num_params: int, *args: Any, **jit_kwargs: Any) -> Any:
    """``jax.jit(fn, **jit_kwargs)(*args)`` for a program that initializes ``num_params`` parameters once.

    Compiled with :func:`jaxlm.hardware.init_compiler_options`: on a CPU a small model's
    initializer compiles in 0.43-0.63x the time, a cost every run pays at start-up.
    """
    options = hardware.init_compiler_options(num_params)
    return jax.jit(fn, **jit_kwargs).lower(*args).compile(compiler_options=options)(*args)


def init_params(exp: Experiment, seed: int) -> Any:
    """Only the model's parameters, directly into their shardings (a PEFT run's base before ``init_from``)."""

    def init(rng: jax.Array) -> Any:
        args = example_args(exp.model_cfg, exp.config.data.seq_len, exp.config.data.objective)
        return nn.unbox(exp.model.init({"params": rng}, *args)["params"])

    base = exp.abstract_base if exp.abstract_base is not None else exp.abstract_state.params
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        return run_init(init, param_count(base), jax.random.key(seed), out_shardings=exp.base_shardings)


def init_peft_state(exp: Experiment, base: Any, seed: int) -> TrainState:
    """A PEFT run's fresh state: the trainable tree of ``base`` (``jaxlm.peft.init``) and its optimizer state."""

    def init(b: Any, rng: jax.Array) -> TrainState:
        return TrainState.create(peft.init(rng, b, exp.config.peft), exp.tx)

    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        return run_init(
            init,
            param_count(exp.abstract_state.params),
            base,
            jax.random.key(seed + 2),
            in_shardings=(exp.base_shardings, None),
            out_shardings=exp.state_shardings,
        )


def effective_params_fn(exp: Experiment) -> Callable[[Any, Any], Any]:
    """Jitted ``(base, trainable) -> full parameters`` (deterministic), sharded like the base: for evaluation."""
    return jax.jit(
        lambda b, t: peft.effective_params(b, t, exp.config.peft),
        in_shardings=(exp.base_shardings, exp.state_shardings.params),
        out_shardings=exp.base_shardings,
    )


def train_step_fn(exp: Experiment) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``steps.lm.train_step`` bound to the experiment's model, optimizer, objective and config.

    Called as ``(state, batch, rng)`` (PEFT: ``..., frozen``) it uses ``exp.tx``, whose numbers
    are constants; called with ``hyper=exp.hyper`` as well (the trainer does) it takes the
    optimizer's numbers as inputs, so runs that differ only in them share one compiled program.
    """
    return functools.partial(
        lm.train_step,
        model=exp.model,
        tx=exp.tx,
        make_tx=functools.partial(optim.make_optimizer, exp.config.optim, exp.config.train.num_steps),
        grad_accum_steps=exp.config.optim.grad_accum_steps,
        objective=objectives.get(exp.config.data.objective).loss,
        cond_update=hardware.cpu_auto(exp.config.train.cond_update, "cond_update"),
        assemble=(functools.partial(_assemble, cfg=exp.config.peft) if exp.abstract_base is not None else None),
    )


def _assemble(base: Any, trainable: Any, rng: jax.Array, *, cfg: Any) -> Any:
    return peft.effective_params(base, trainable, cfg, rng)


def param_count(abstract_params: Any) -> int:
    """Number of parameters in a (possibly abstract) parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(abstract_params))
