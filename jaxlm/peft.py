"""Lightweight fine-tuning (``config.peft``): LoRA, DoRA, IA3, BitFit, adapters, prefix and prompt tuning.

A PEFT run keeps the pretrained parameters (the *base*) frozen and trains a small tree::

    trainable = {"delta":  {<kernel path>: {"lora_a", "lora_b", "magnitude", "scale"}},  # nested by path
                 "params": {<base paths kept trainable: the task head, BitFit's biases>}}

The model is applied to :func:`effective_params` ``(base, trainable)``, which rebuilds a full
parameter tree, so the models know nothing about PEFT and every model switch (``fuse_qkv``
concatenates the already-transformed query/key/value kernels, ``scan_layers`` stacks carry a
leading layer axis that the deltas carry too, the custom matmul, ``bfloat16``) works unchanged.
Only ``trainable`` is differentiated and only it has optimizer state: frozen means free.

Kernels are ``DenseGeneral`` shaped: ``[D, N, H]`` for query/key/value, ``[N, H, D]`` for the
attention output, ``[D, F]`` / ``[F, D]`` for the MLP, with a leading ``L`` under ``scan_layers``.
Each targeted kernel is viewed as a matrix ``[in, out]`` (input axes flattened, output axes
flattened) and transformed as in Hugging Face ``peft``:

* LoRA: ``W' = W + (alpha / r) * A @ B`` with ``A [in, r]`` (normal, std ``init_scale``) and
  ``B [r, out]`` zero, so training starts from the base model.
* DoRA: ``W' = m * V / ||V||`` with ``V = W + (alpha / r) * A @ B``, the norm per output feature
  over the input axis, ``m [out]`` initialized to ``||W||``; as ``peft``, the norm is not
  differentiated (Liu et al. 2024, sec. 4.3).
* IA3: a learned vector ``l`` initialized to ones scales a kernel's outputs (and its bias, as
  ``peft`` scales the layer's result) or, for the MLP's output projection (``mlp/wo``, ``peft``'s
  ``feedforward_modules``), its inputs.
* BitFit: every bias stays trainable (a path selection; no delta).

Bottleneck adapters, prefix tuning and prompt tuning change the forward pass, so they are model
modules: ``config_lib.validate`` derives ``config.model``'s ``adapter_dim`` / ``adapter_kind`` /
``prefix_tokens`` / ``prompt_tokens`` from ``config.peft``, the models then grow
``.../adapter_attn/...``, ``.../adapter_mlp/...`` (:mod:`jaxlm.nn.adapters`),
``.../attn/prefix/{key, value}`` or ``prompt/embedding`` (:mod:`jaxlm.nn.virtual_tokens`), and
here they are a path selection like BitFit (``MODULE_PATHS``): their fresh initialization is
part of the base (``init_from`` reports them as initialized), copied into ``trainable["params"]``
and trained; the rest stays frozen. They compose with the weight transforms (e.g.
``adapter,lora``, ``prompt,bitfit``). ``jaxlm merge`` cannot fold them (they are not weights of
the base model).

LoRA dropout: a weight transform cannot drop per token; dropout here zeroes input features of
``A`` per step (shared by the batch), an approximation of ``peft``'s per-token input dropout.

Shapes: L layers (scan), D model dim, N heads, H head dim, F mlp dim, r rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import param_paths
from jaxlm.common_types import CheckpointError, ConfigError
from jaxlm.config_lib import PeftConfig

# Methods realised as weight transforms on targeted kernels, and methods that only select paths.
DELTA_METHODS = ("lora", "dora", "ia3")
SELECT_METHODS = ("bitfit",)
# Methods that change the model's forward pass itself (bottleneck adapters, virtual tokens): the model
# grows their parameters (config.model's derived fields) and they train as a path selection.
MODEL_METHODS = ("adapter", "prefix", "prompt")
# Method -> the parameter paths it adds (jaxlm.nn.adapters, jaxlm.nn.virtual_tokens).
MODULE_PATHS: dict[str, str] = {
    "adapter": r"(^|/)adapter_(attn|mlp)/",
    "prefix": r"(^|/)attn/prefix/",
    "prompt": r"^prompt/",
}
# IA3 scales the *inputs* of these kernels (the MLP's output projection), the outputs of all others.
IA3_FEEDFORWARD = r"mlp/wo/"
# Names of the kernel-matrix leaves a target may select (the RNN cells' recurrent kernels too).
KERNEL_NAMES = ("kernel", "recurrent_kernel")


def enabled(cfg: PeftConfig) -> bool:
    """Whether ``config.peft`` asks for lightweight fine-tuning."""
    return bool(cfg.methods)


def _layer_axes(path: str) -> int:
    """Leading stacked-layer axes of a parameter (``scan_layers`` puts them under ``.../layers/...``)."""
    return 1 if "/layers/" in f"/{path}" else 0


def _in_axes(path: str, ndim: int) -> int:
    """How many (non-layer) leading axes of a kernel are its inputs.

    ``DenseGeneral`` kernels are ``[in..., out...]``: the attention output projection ``[N, H, D]``
    has two input axes, query/key/value ``[D, N, H]`` and every 2-D kernel have one.
    """
    module = path.rsplit("/", 2)[-2] if path.count("/") >= 1 else ""
    return 2 if ndim == 3 and module in ("out", "o") else 1


def _matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """``(layer dims, in size, out size)`` of a kernel viewed as a matrix."""
    lead = _layer_axes(path)
    core = shape[lead:]
    k = _in_axes(path, len(core))
    return tuple(shape[:lead]), math.prod(core[:k]), math.prod(core[k:])


def targets(cfg: PeftConfig, params: Any) -> list[str]:
    """Paths of the kernels that LoRA / DoRA / IA3 adapt; an error lists the kernels when none match."""
    if not any(m in DELTA_METHODS for m in cfg.methods):
        return []
    patterns = param_paths.compile_patterns(cfg.targets)
    kernels = [
        p for p, x in param_paths.flatten(params).items() if p.rsplit("/", 1)[-1] in KERNEL_NAMES and x.ndim >= 2
    ]
    found = [p for p in kernels if param_paths.matches(p, patterns)]
    if not found:
        shown = sorted({_strip_layer(p) for p in kernels})
        raise ConfigError(
            f"config.peft.targets={cfg.targets!r} matches no kernel; the model's kernels are: {', '.join(shown)}"
        )
    return found


def _strip_layer(path: str) -> str:
    parts = path.split("/")
    return "/".join("layer_*" if p.startswith("layer_") else p for p in parts)


def trainable_paths(cfg: PeftConfig, params: Any) -> list[str]:
    """Base parameter paths that train as they are.

    ``config.peft.trainable``, with BitFit every bias, and the parameters the model grew for
    adapters, prefixes or prompts (``MODULE_PATHS``).
    """
    patterns = param_paths.compile_patterns(cfg.trainable)
    modules = [m for m in cfg.methods if m in MODULE_PATHS]
    module_patterns = param_paths.compile_patterns(",".join(MODULE_PATHS[m] for m in modules))
    bitfit = "bitfit" in cfg.methods
    out = []
    for path in param_paths.flatten(params):
        if (
            param_paths.matches(path, patterns)
            or (bitfit and path.rsplit("/", 1)[-1] == "bias")
            or (modules and param_paths.matches(path, module_patterns))
        ):
            out.append(path)
    if bitfit and not any(p.rsplit("/", 1)[-1] == "bias" for p in out):
        raise ConfigError("config.peft.method includes bitfit but the model has no biases (config.model.use_bias?)")
    for method in modules:
        if not any(param_paths.matches(p, param_paths.compile_patterns(MODULE_PATHS[method])) for p in out):
            raise ConfigError(
                f"config.peft.method includes {method} but the model has no {method} parameters; build the model "
                "from the config validated with this config.peft (its model fields derive from it)"
            )
    return out


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def init(rng: jax.Array, base: Any, cfg: PeftConfig) -> dict[str, Any]:
    """The trainable tree for ``base`` (jittable; the base is only read)."""
    flat = param_paths.flatten(base)
    delta: dict[str, Any] = {}
    methods = cfg.methods
    for i, path in enumerate(targets(cfg, base)):
        w = flat[path]
        layers, n_in, n_out = _matrix_shape(path, w.shape)
        entry: dict[str, jax.Array] = {}
        if "lora" in methods or "dora" in methods:
            key = jax.random.fold_in(rng, i)
            entry["lora_a"] = cfg.init_scale * jax.random.normal(key, layers + (n_in, cfg.rank), jnp.float32)
            entry["lora_b"] = jnp.zeros(layers + (cfg.rank, n_out), jnp.float32)
        if "dora" in methods:
            entry["magnitude"] = _column_norm(w.astype(jnp.float32).reshape(layers + (n_in, n_out)))
        if "ia3" in methods:
            size = n_in if _ia3_on_inputs(path) else n_out
            entry["scale"] = jnp.ones(layers + (size,), jnp.float32)
        delta[path] = entry
    keep = {p: flat[p] for p in trainable_paths(cfg, base)}
    return {"delta": _nested(delta), "params": _nested(keep)}


def _ia3_on_inputs(path: str) -> bool:
    return param_paths.matches(path, param_paths.compile_patterns([IA3_FEEDFORWARD]))


def _column_norm(w: jax.Array) -> jax.Array:
    """L2 norm of each output column of ``[..., in, out]`` (``peft``'s per-output-feature weight norm)."""
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=-2))


def _transform(path: str, w: jax.Array, entry: dict[str, jax.Array], cfg: PeftConfig, rng: jax.Array | None) -> Any:
    """The effective kernel ``W'`` of one targeted kernel (same shape and dtype as ``w``)."""
    layers, n_in, n_out = _matrix_shape(path, w.shape)
    m = w.astype(jnp.float32).reshape(layers + (n_in, n_out))
    if "lora_a" in entry:
        a = entry["lora_a"]
        if rng is not None and cfg.dropout > 0:
            keep = jax.random.bernoulli(rng, 1.0 - cfg.dropout, a.shape[:-1] + (1,))
            a = jnp.where(keep, a / (1.0 - cfg.dropout), 0.0)
        m = m + (cfg.alpha / cfg.rank) * jnp.einsum("...ir,...ro->...io", a, entry["lora_b"])
    if "magnitude" in entry:
        m = m * (entry["magnitude"] / jax.lax.stop_gradient(_column_norm(m)))[..., None, :]
    if "scale" in entry:
        s = entry["scale"]
        m = m * (s[..., :, None] if _ia3_on_inputs(path) else s[..., None, :])
    return m.reshape(w.shape).astype(w.dtype)


def _scaled_bias(path: str, b: jax.Array, scale: jax.Array) -> jax.Array:
    """IA3 on outputs scales the layer's whole result, bias included (as ``peft``)."""
    layers = b.shape[: _layer_axes(path)]
    return (b.astype(jnp.float32).reshape(layers + (-1,)) * scale).reshape(b.shape).astype(b.dtype)


def effective_params(base: Any, trainable: dict[str, Any], cfg: PeftConfig, rng: jax.Array | None = None) -> Any:
    """The full parameter tree the model is applied with: ``base`` with the trainable paths and deltas applied.

    ``rng`` enables LoRA dropout (training); ``None`` is the deterministic (eval / merge) form.
    """
    overrides = param_paths.flatten(trainable["params"])
    flat_delta = param_paths.flatten(trainable["delta"])
    entries: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in flat_delta.items():
        kernel, _, name = path.rpartition("/")
        entries.setdefault(kernel, {})[name] = leaf
    biases: dict[str, jax.Array] = {}
    for kernel, entry in entries.items():
        if "scale" in entry and not _ia3_on_inputs(kernel):
            biases[kernel.rpartition("/")[0] + "/bias"] = entry["scale"]
    order = {k: i for i, k in enumerate(entries)}

    def apply(path: str, leaf: Any) -> Any:
        value = overrides.get(path, leaf)
        if path in entries:
            key = None if rng is None else jax.random.fold_in(rng, order[path])
            value = _transform(path, value, entries[path], cfg, key)
        if path in biases:
            value = _scaled_bias(path, value, biases[path])
        return value

    return param_paths.map_with_path(apply, base)


def merge(base: Any, trainable: dict[str, Any], cfg: PeftConfig) -> Any:
    """Fold the deltas into the base: an ordinary parameter tree (``jaxlm merge``)."""
    return effective_params(base, trainable, cfg, rng=None)


def frozen_paths(cfg: PeftConfig, base: Any) -> list[str]:
    """Base paths that never change in a PEFT run (the content the base hash covers)."""
    keep = set(trainable_paths(cfg, base))
    return [p for p in param_paths.flatten(base) if p not in keep]


def content_hash(base: Any, paths: list[str] | None = None, fetch: Callable[[Any], np.ndarray] | None = None) -> str:
    """sha256 over the paths, shapes, dtypes and bytes of a parameter tree's leaves (``paths`` only, if given)."""
    fetch = fetch or (lambda x: np.asarray(jax.device_get(x)))
    digest = hashlib.sha256()
    for path, leaf in param_paths.flatten(base).items():
        if paths is not None and path not in paths:
            continue
        array = np.ascontiguousarray(fetch(leaf))
        digest.update(f"{path}:{array.shape}:{array.dtype}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def count(tree: Any) -> int:
    """Number of scalars in a (possibly abstract) tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def nbytes(tree: Any) -> int:
    """Bytes of a (possibly abstract) tree's array leaves."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---- The base a PEFT run's checkpoints belong to: written beside them as JSON.

BASE_REFERENCE_FILE = "peft_base.json"


def base_reference(base: Any, cfg: PeftConfig, *, init_from: str, step: int | None, fetch: Any = None) -> dict:
    """What identifies the frozen base: its source workdir and step, and a hash of its frozen parameters."""
    return {
        "init_from": init_from,
        "step": step,
        "sha256": content_hash(base, frozen_paths(cfg, base), fetch),
        "method": cfg.method,
    }


def write_base_reference(workdir: str, reference: dict) -> None:
    """Record the base of the checkpoints in ``workdir`` (process 0 only)."""
    path = os.path.join(workdir, BASE_REFERENCE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(reference, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_base_reference(workdir: str) -> dict | None:
    """The base reference of ``workdir``'s checkpoints, or None when it has none."""
    path = os.path.join(workdir, BASE_REFERENCE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_base_reference(workdir: str, reference: dict) -> None:
    """Refuse to resume PEFT checkpoints onto a base other than the one they were trained on."""
    saved = read_base_reference(workdir)
    if saved is None:
        raise CheckpointError(
            f"{workdir} has PEFT checkpoints but no {BASE_REFERENCE_FILE}; they cannot be matched to a base"
        )
    if saved["sha256"] != reference["sha256"]:
        raise CheckpointError(
            f"the PEFT checkpoints in {workdir} were trained on base {saved['init_from'] or '(random init)'} "
            f"step {saved['step']} (sha256 {saved['sha256'][:12]}), but this run's base hashes to "
            f"{reference['sha256'][:12]}; set config.checkpoint.init_from to that base or use a new workdir"
        )
