"""``jaxlm info``: parameter counts per module, FLOPs per token and every parameter's axes."""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

import flax.linen as nn
import jax

from jaxlm import config_lib, models, optim, peft
from jaxlm.config_lib import Config
from jaxlm.data import tokenizers, tokenizers_sp
from jaxlm.main import experiment, task_data
from jaxlm.models import config as model_config
from jaxlm.models import heads


def _path(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def describe(config: Config) -> dict[str, Any]:
    """Parameters (shape, dtype, logical axes), per-module counts and FLOPs per token."""
    if config.model.vocab_size:
        vocab = config.model.vocab_size
    else:  # a trained tokenizer reaches at most config.data.tokenizer_vocab_size ids
        byte = config.data.tokenizer == "byte"
        trained = config.data.tokenizer_vocab_size or tokenizers_sp.DEFAULT_VOCAB_SIZE  # 0: at most the default
        vocab = tokenizers.build("byte").vocab_size if byte else trained
        vocab = experiment.model_vocab_size(config, vocab)
    config = experiment.resolve_vocab_multiple(config)  # the padded vocabulary arrays (jaxlm/models/vocab.py)
    cfg = models.resolve(config.model, vocab)
    # A fine-tuning config's model carries its task head (sized by the task's labels).
    head = None
    if config_lib.task_head(config) != "none":
        head = heads.from_config(config, task_data.resolve(config).num_labels or None)
    model = models.build(cfg, head=head)
    args = experiment.example_args(cfg, config.data.seq_len, config.data.objective)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["params"])
    specs = nn.get_partition_spec(boxed)
    params = []
    for (path, leaf), spec in zip(
        jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0],
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
    ):
        params.append({"name": _path(path), "shape": tuple(leaf.shape), "dtype": str(leaf.dtype), "axes": tuple(spec)})
    per_module: dict[str, int] = {}
    for p in params:
        top = p["name"].split("/")
        key = "/".join(top[:2]) if top[0] == "blocks" else top[0]
        per_module[key] = per_module.get(key, 0) + math.prod(p["shape"])
    # What trains (all parameters, or config.peft's trainable tree) and its optimizer state.
    trainable = nn.unbox(boxed)
    if peft.enabled(config.peft):
        trainable = jax.eval_shape(lambda p: peft.init(jax.random.key(0), p, config.peft), trainable)
    opt_state = jax.eval_shape(optim.make_optimizer(config.optim, config.train.num_steps).init, trainable)
    return {
        "model": cfg,
        "params": params,
        "per_module": per_module,
        "total": sum(per_module.values()),
        "trainable": peft.count(trainable),
        "optimizer_state_bytes": peft.nbytes(opt_state),
        "flops_per_token": model_config.flops_per_token(cfg, config.data.seq_len),
    }


def run(config: Config, *, stream: TextIO | None = None) -> dict[str, Any]:
    """Print :func:`describe` as a readable report."""
    out = stream or sys.stdout
    info = describe(config)
    cfg = info["model"]
    print(
        f"model: {cfg.kind}  layers={cfg.num_layers} heads={cfg.num_heads} embed={cfg.embed_dim} "
        f"mlp={cfg.mlp_dim} vocab={cfg.vocab_size} max_len={cfg.max_len}",
        file=out,
    )
    print(
        f"vocabulary: {cfg.vocab_size} ids, arrays padded to {cfg.padded_vocab_size} "
        f"(a multiple of {cfg.vocab_multiple}; config.model.vocab_multiple)",
        file=out,
    )
    print(f"parameters: {info['total']:,}", file=out)
    print(
        f"trainable: {info['trainable']:,} ({100 * info['trainable'] / max(info['total'], 1):.3f}%"
        f"{', config.peft.method=' + config.peft.method if peft.enabled(config.peft) else ''}), "
        f"optimizer state {info['optimizer_state_bytes']:,} bytes",
        file=out,
    )
    for name, count in info["per_module"].items():
        print(f"  {name:<40} {count:>14,}", file=out)
    print(
        f"training FLOPs per token at seq_len={config.data.seq_len}: {info['flops_per_token']:.4e} "
        "(6 N + 12 L T D; jaxlm/models/config.py)",
        file=out,
    )
    print("parameter shapes and logical axes:", file=out)
    for p in info["params"]:
        axes = ", ".join(str(a) for a in p["axes"])
        print(f"  {p['name']:<48} {str(p['shape']):<20} {p['dtype']:<9} ({axes})", file=out)
    return info
