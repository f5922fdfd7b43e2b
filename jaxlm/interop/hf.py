"""Hugging Face checkpoints <-> jaxlm parameter trees and config fields, as plain NumPy.

Supported architectures (``model_type`` in ``config.json``):

* ``gpt2``: the weights of ``GPT2LMHeadModel`` or ``GPT2Model`` <-> jaxlm ``decoder_only`` with
  learned positions, pre-LayerNorm (any eps), tanh-approximated GELU (GPT-2's ``gelu_new``),
  biases everywhere and tied (or untied) embeddings. Mapped below.
* ``bert``: ``BertForPreTraining`` / ``BertForMaskedLM`` / ``BertModel`` <-> ``encoder_only``
  (:mod:`jaxlm.interop.hf_bert`).
* ``t5``: ``T5ForConditionalGeneration`` v1.0 and v1.1 <-> ``encoder_decoder``
  (:mod:`jaxlm.interop.hf_t5`).

Task heads: ``BertForSequenceClassification`` / ``TokenClassification`` / ``QuestionAnswering``
and ``GPT2ForSequenceClassification`` / ``TokenClassification`` / ``QuestionAnswering`` <-> the
same bodies with a jaxlm task head (:mod:`jaxlm.interop.hf_heads`); :func:`task_from_hf` finds
the head, and ``params_from_hf`` / ``params_to_hf`` / ``hf_config_from_model`` map it with the body.

BERT and T5 are table-driven: their modules list one :class:`Rule` per tensor, which this
module applies in both directions. Blocks are either unrolled (``layer_i``) or stacked for
``scan_layers`` (``layers/block``).

This module maps names, shapes and config fields; it builds no model, so it imports nothing
from jaxlm above L0. Weight files are read and written with ``safetensors`` (NumPy flavour);
``torch`` is needed only for ``pytorch_model.bin`` (and bfloat16 files, where NumPy lacks
``ml_dtypes``). Both
are imported inside the functions that need them: ``pip install 'jaxlm[hf]'``.

Shapes: D model dim, N heads, H head dim (D = N * H), F mlp dim, V vocab, P positions,
L layers. Hugging Face's ``Conv1D`` (GPT-2) stores its weight as ``[in, out]`` (the transpose
of ``nn.Linear``), which is jaxlm's kernel layout, so only the fused ``c_attn`` needs
splitting; BERT and T5 use ``nn.Linear`` (``[out, in]``), transposed on the way in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from jaxlm.common_types import DataError
from jaxlm.interop import hf_bert, hf_heads, hf_t5

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SAFETENSORS_FILE = "model.safetensors"
# In the order Hugging Face prefers them when a directory holds several.
WEIGHT_FILES = (SAFETENSORS_FILE, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
INSTALL_HINT = "pip install 'jaxlm[hf]'"
PAD_ID = 0  # GPT-2 pad_token_id when the tokenizer names no pad (jaxlm's own tokenizers pad with 0)

Params = dict[str, Any]  # a nested dict of np.ndarray, the shape of a jaxlm 'params' collection
StateDict = dict[str, np.ndarray]  # Hugging Face tensor name -> array


# ------------------------------------------------------------------------------------------
# Files.


def read_config(hf_dir: str) -> dict[str, Any]:
    """``hf_dir/config.json`` as a dict; a :class:`DataError` if it is missing or not JSON."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{hf_dir} has no {CONFIG_FILE}; give a Hugging Face model directory (save_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); fix or re-save the model") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a JSON object; give a Hugging Face config.json")
    return raw


def weights_file(hf_dir: str) -> str:
    """The path of the weights in ``hf_dir`` (safetensors preferred); a :class:`DataError` if none."""
    for name in WEIGHT_FILES:
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"{hf_dir} has no weights; expected one of: {', '.join(WEIGHT_FILES)}")


def load_state_dict(hf_dir: str) -> StateDict:
    """Read every tensor of the checkpoint in ``hf_dir`` (sharded ``*.index.json`` included)."""
    path = weights_file(hf_dir)
    if not path.endswith(".index.json"):
        return _load_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a weight index with a 'weight_map' ({e}); re-save the model") from e
    state: StateDict = {}
    for shard in shards:
        shard_path = os.path.join(hf_dir, shard)
        if not os.path.isfile(shard_path):
            raise DataError(f"{path} names the shard {shard} that is not in {hf_dir}; copy the whole model")
        state.update(_load_file(shard_path))
    return state


def _load_file(path: str) -> StateDict:
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise DataError(f"reading {path} needs the 'safetensors' package: {INSTALL_HINT}") from e
        try:
            return dict(load_file(path))
        except TypeError:  # a dtype NumPy lacks (bfloat16): read through torch
            return _load_torch(path, safetensors=True)
        except Exception as e:  # the Rust side raises SafetensorError, a plain Exception
            raise DataError(f"{path} is not a readable safetensors file ({e}); re-save the model") from e
    return _load_torch(path, safetensors=False)


def _load_torch(path: str, *, safetensors: bool) -> StateDict:
    try:
        import torch
    except ImportError as e:
        why = "bfloat16 tensors" if safetensors else "a PyTorch state dict"
        raise DataError(f"{path} holds {why}; reading it needs torch: {INSTALL_HINT}") from e
    try:
        if safetensors:
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and deserialization raise many types
        raise DataError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:200]}); re-save it") from e
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise DataError(f"{path} is not a state dict of tensors; save it with model.save_pretrained()")

    def to_numpy(t: Any) -> np.ndarray:
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    return {str(k): to_numpy(v) for k, v in raw.items()}


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """Write ``state`` as a safetensors file that ``from_pretrained`` reads (``format: pt``)."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise DataError(f"writing {path} needs the 'safetensors' package: {INSTALL_HINT}") from e
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------
# Dispatch by architecture.


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` maps onto jaxlm.

    ``model_fields(hf_config, source, state)`` gives the ``config.model`` fields (``state``,
    the weights, may be None: some fields, such as whether the head is tied, are read off the
    weights when they are there); ``params_from_hf(state, model, hf_config, source)`` the
    parameter tree; ``params_to_hf(params, model, skip)`` the state dict, leaving out the
    top-level parameter groups in ``skip`` (language-model heads a task model lacks);
    ``fresh(state, model, hf_config)`` the parameters the checkpoint lacks and the import
    initializes.
    """

    kind: str  # jaxlm config.model.kind
    objective: str  # jaxlm config.data.objective of the imported workdir
    model_fields: Callable[[Mapping[str, Any], str, Mapping[str, np.ndarray] | None], dict[str, Any]]
    params_from_hf: Callable[[Mapping[str, np.ndarray], Mapping[str, Any], Mapping[str, Any], str], Params]
    params_to_hf: Callable[[Mapping[str, Any], Mapping[str, Any], Collection[str]], StateDict]
    hf_config: Callable[[Mapping[str, Any], Mapping[str, int | None]], dict[str, Any]]
    fresh: Callable[[Mapping[str, np.ndarray], Mapping[str, Any], Mapping[str, Any]], list[str]] = (
        lambda state, model, hf_config: []
    )


def architecture(hf_config: Mapping[str, Any], source: str = CONFIG_FILE) -> Architecture:
    """The :class:`Architecture` for a Hugging Face config's ``model_type``."""
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise DataError(
            f"{source}: model_type={model_type!r} is not supported; jaxlm convert imports: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def export_architecture(model: Mapping[str, Any]) -> Architecture:
    """The :class:`Architecture` a jaxlm ``config.model`` (as a dict) exports to."""
    for arch in ARCHITECTURES.values():
        if arch.kind == model.get("kind"):
            return arch
    kinds = sorted({a.kind for a in ARCHITECTURES.values()})
    raise DataError(f"config.model.kind={model.get('kind')!r} cannot be exported to Hugging Face; exportable: {kinds}")


def model_fields_from_hf(
    hf_config: Mapping[str, Any], source: str = CONFIG_FILE, state: Mapping[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """The jaxlm ``config.model`` fields (a dict) that reproduce a Hugging Face config.

    Give the checkpoint's ``state`` where it is loaded: BERT's and T5's tying is read off it.
    """
    return architecture(hf_config, source).model_fields(hf_config, source, state)


def task_from_hf(
    hf_config: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None, source: str = CONFIG_FILE
) -> hf_heads.Task | None:
    """The task head of a Hugging Face checkpoint (:mod:`jaxlm.interop.hf_heads`); None for a base model."""
    architecture(hf_config, source)
    return hf_heads.detect(hf_config, state, source)


def params_from_hf(
    hf_config: Mapping[str, Any], state: Mapping[str, np.ndarray], model: Mapping[str, Any], source: str = ""
) -> Params:
    """A jaxlm float32 parameter tree from a Hugging Face state dict, for ``config.model`` fields ``model``.

    A task-head checkpoint gives the body without language-model heads plus ``head/...``.
    """
    arch, source = architecture(hf_config), source or "the checkpoint"
    task = hf_heads.detect(hf_config, state, source)
    if task is None:
        return arch.params_from_hf(state, model, hf_config, source)
    body, head = hf_heads.split_state(state, task, task.num_labels, model["embed_dim"], source)
    # A task model has no LM head, so whether it would be tied does not matter: read none.
    params = arch.params_from_hf(body, {**model, "tie_embeddings": True}, hf_config, source)
    for group in task.dropped_groups():
        params.pop(group, None)
    params["head"] = head
    return params


def fresh_parameters(
    hf_config: Mapping[str, Any], state: Mapping[str, np.ndarray], model: Mapping[str, Any]
) -> list[str]:
    """The top-level parameter groups (``pooler``, ``nsp`` ...) the checkpoint lacks and the import initializes."""
    arch = architecture(hf_config)
    task = hf_heads.detect(hf_config, state, CONFIG_FILE)
    if task is None:
        return arch.fresh(state, model, hf_config)
    body = {k: v for k, v in state.items() if not k.startswith(task.head.layer + ".")}
    fresh = arch.fresh(body, {**model, "tie_embeddings": True}, hf_config)
    return [group for group in fresh if group not in task.dropped_groups()]


def export_task(
    model: Mapping[str, Any], kind: str, num_labels: int, labels: Sequence[str] = (), pooling: str = "auto"
) -> hf_heads.Task | None:
    """The Hugging Face task head a jaxlm head exports as (None for ``kind='none'``); a DataError if none fits."""
    if kind == "none":
        return None
    arch = export_architecture(model)
    model_type = next(name for name, a in ARCHITECTURES.items() if a is arch)
    if model_type not in hf_heads.LM_HEADS:
        raise DataError(f"config.task.head={kind!r} on a {model_type} model has no Hugging Face equivalent")
    return hf_heads.for_export(model_type, kind, num_labels, labels, pooling)


def params_to_hf(params: Mapping[str, Any], model: Mapping[str, Any], task: hf_heads.Task | None = None) -> StateDict:
    """A Hugging Face state dict (tied weights left out) from a jaxlm parameter tree (with ``task``: its head)."""
    arch = export_architecture(model)
    if task is None:
        return arch.params_to_hf(params, model, ())
    body = dict(params)
    if "head" not in body:
        raise DataError(f"the checkpoint has no task head to export as {task.head.architecture}")
    head = body.pop("head")
    out = arch.params_to_hf(body, {**model, "tie_embeddings": True}, task.dropped_groups())
    out.update(hf_heads.head_to_hf(head, task))
    return out


def hf_config_from_model(
    model: Mapping[str, Any], special_ids: Mapping[str, int | None], task: hf_heads.Task | None = None
) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for jaxlm ``config.model`` fields (``vocab_size`` resolved).

    ``special_ids`` gives ``bos`` / ``eos`` / ``pad`` ids for the generation defaults; ``task``
    the head's architecture and labels.
    """
    out = export_architecture(model).hf_config(model, special_ids)
    if task is not None:
        out.update(hf_heads.hf_config_fields(task, special_ids, pad_default=PAD_ID))
    return out


# ------------------------------------------------------------------------------------------
# GPT-2.

# GPT2Config's defaults, used where config.json leaves a field out (as from_pretrained does).
_GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the same function, to rounding
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older checkpoints


def _gpt2_model_fields(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    c = {**_GPT2_DEFAULTS, **cfg}
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = c[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(f"{source}: {name}={value!r} must be a positive integer; fix the config")
    d, n = c["n_embd"], c["n_head"]
    if d % n:
        raise DataError(f"{source}: n_head={n} does not divide n_embd={d}; fix the config")
    mlp = c["n_inner"] if c["n_inner"] is not None else 4 * d
    if isinstance(mlp, bool) or not isinstance(mlp, int) or mlp <= 0:
        raise DataError(f"{source}: n_inner={mlp!r} must be a positive integer or null; fix the config")
    if c["activation_function"] not in _TANH_GELUS:
        raise DataError(
            f"{source}: activation_function={c['activation_function']!r} is not supported; "
            f"jaxlm's gelu is the tanh approximation ({', '.join(_TANH_GELUS)})"
        )
    eps = c["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise DataError(f"{source}: layer_norm_epsilon={eps!r} must be a positive number; fix the config")
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if bool(c[name]) != want:
            raise DataError(f"{source}: {name}={c[name]!r} is not supported; jaxlm needs {want}")
    if c["add_cross_attention"]:
        raise DataError(f"{source}: add_cross_attention=true is not supported; jaxlm imports decoder-only GPT-2")
    return {
        "kind": "decoder_only",
        "num_layers": c["n_layer"],
        "num_heads": n,
        "num_kv_heads": 0,
        "embed_dim": d,
        "mlp_dim": mlp,
        "max_len": c["n_positions"],
        "vocab_size": c["vocab_size"],
        "dropout_rate": 0.0,
        "position": "learned",
        "norm": "layernorm",
        "norm_eps": float(eps),
        "pre_norm": True,
        "use_bias": True,
        "activation": "gelu",
        "tie_embeddings": bool(c["tie_word_embeddings"]),
    }


def _gpt2_params_from_hf(state: Mapping[str, np.ndarray], model: Mapping[str, Any], source: str) -> Params:
    d, n, f = model["embed_dim"], model["num_heads"], model["mlp_dim"]
    h, v, p = d // n, model["vocab_size"], model["max_len"]
    tied = model["tie_embeddings"]
    # GPT2LMHeadModel prefixes the body with "transformer."; a bare GPT2Model (the hub's gpt2) does not.
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...], *, top: bool = False) -> np.ndarray:
        key = name if top else prefix + name
        if key not in state:
            raise DataError(f"{source} has no tensor {key!r}; is it a GPT-2 checkpoint matching its config.json?")
        arr = np.asarray(state[key])
        if arr.shape != shape:
            raise DataError(f"{source}: {key} has shape {arr.shape} but config.json implies {shape}; fix the config")
        used.add(key)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def norm(name: str) -> Params:
        return {"scale": take(f"{name}.weight", (d,)), "bias": take(f"{name}.bias", (d,))}

    def layer(i: int) -> Params:
        pre = f"h.{i}."
        qkv_w = np.split(take(pre + "attn.c_attn.weight", (d, 3 * d)), 3, axis=1)  # [D, 3D] = q | k | v
        qkv_b = np.split(take(pre + "attn.c_attn.bias", (3 * d,)), 3)
        attn: Params = {
            name: {"kernel": np.ascontiguousarray(w.reshape(d, n, h)), "bias": b.reshape(n, h)}
            for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b)
        }
        attn["out"] = {
            "kernel": take(pre + "attn.c_proj.weight", (d, d)).reshape(n, h, d),
            "bias": take(pre + "attn.c_proj.bias", (d,)),
        }
        mlp = {
            "wi": {"kernel": take(pre + "mlp.c_fc.weight", (d, f)), "bias": take(pre + "mlp.c_fc.bias", (f,))},
            "wo": {"kernel": take(pre + "mlp.c_proj.weight", (f, d)), "bias": take(pre + "mlp.c_proj.bias", (d,))},
        }
        return {"attn_norm": norm(pre + "ln_1"), "attn": attn, "mlp_norm": norm(pre + "ln_2"), "mlp": mlp}

    layers = [layer(i) for i in range(model["num_layers"])]
    blocks = _stack_layers(layers) if model.get("scan_layers") else {f"layer_{i}": x for i, x in enumerate(layers)}
    params: Params = {
        "token_embed": {"embedding": take("wte.weight", (v, d))},
        "pos_embed": {"embedding": take("wpe.weight", (p, d))},
        "blocks": blocks,
        "final_norm": norm("ln_f"),
    }
    if not tied:
        params["lm_head"] = {"kernel": np.ascontiguousarray(take("lm_head.weight", (v, d), top=True).T)}
    extra = sorted(
        k for k in state if k not in used and not k.endswith(_GPT2_BUFFERS) and not (tied and k == "lm_head.weight")
    )
    if extra:
        raise DataError(
            f"{source} has tensors GPT-2 does not use ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); "
            "jaxlm convert imports GPT2LMHeadModel or GPT2Model weights"
        )
    return params


def _gpt2_params_to_hf(params: Mapping[str, Any], model: Mapping[str, Any]) -> StateDict:
    flat = _flatten(params)

    def pop(path: str) -> np.ndarray:
        if path not in flat:
            raise DataError(f"the checkpoint has no parameter {path}; only GPT-2-shaped jaxlm models can be exported")
        return np.asarray(flat.pop(path), dtype=np.float32)

    d = model["embed_dim"]
    num_layers = model["num_layers"]
    scanned = any(k.startswith("blocks/layers/") for k in flat)
    out: StateDict = {
        "transformer.wte.weight": pop("token_embed/embedding"),
        "transformer.wpe.weight": pop("pos_embed/embedding"),
    }
    stacked = {k: flat.pop(k) for k in [k for k in flat if k.startswith("blocks/layers/block/")]} if scanned else {}
    for i in range(num_layers):
        if scanned:
            flat.update({k.replace("blocks/layers/block/", "blocks/"): np.asarray(a)[i] for k, a in stacked.items()})
            src = "blocks/"
        else:
            src = f"blocks/layer_{i}/"
        dst = f"transformer.h.{i}."
        qkv = [pop(f"{src}attn/{name}/kernel").reshape(d, d) for name in ("query", "key", "value")]
        qkv_b = [pop(f"{src}attn/{name}/bias").reshape(d) for name in ("query", "key", "value")]
        out[dst + "ln_1.weight"] = pop(f"{src}attn_norm/scale")
        out[dst + "ln_1.bias"] = pop(f"{src}attn_norm/bias")
        out[dst + "attn.c_attn.weight"] = np.concatenate(qkv, axis=1)
        out[dst + "attn.c_attn.bias"] = np.concatenate(qkv_b)
        out[dst + "attn.c_proj.weight"] = pop(f"{src}attn/out/kernel").reshape(d, d)
        out[dst + "attn.c_proj.bias"] = pop(f"{src}attn/out/bias")
        out[dst + "ln_2.weight"] = pop(f"{src}mlp_norm/scale")
        out[dst + "ln_2.bias"] = pop(f"{src}mlp_norm/bias")
        out[dst + "mlp.c_fc.weight"] = pop(f"{src}mlp/wi/kernel")
        out[dst + "mlp.c_fc.bias"] = pop(f"{src}mlp/wi/bias")
        out[dst + "mlp.c_proj.weight"] = pop(f"{src}mlp/wo/kernel")
        out[dst + "mlp.c_proj.bias"] = pop(f"{src}mlp/wo/bias")
    out["transformer.ln_f.weight"] = pop("final_norm/scale")
    out["transformer.ln_f.bias"] = pop("final_norm/bias")
    if not model["tie_embeddings"]:
        out["lm_head.weight"] = np.ascontiguousarray(pop("lm_head/kernel").T)
    if flat:
        raise DataError(
            f"parameters GPT-2 has no place for: {', '.join(sorted(flat)[:3])}; "
            "only GPT-2-shaped jaxlm models can be exported"
        )
    return {k: np.ascontiguousarray(a) for k, a in out.items()}


def _gpt2_hf_config(model: Mapping[str, Any], special_ids: Mapping[str, int | None]) -> dict[str, Any]:
    # GPT-2 is exactly this; a field the config lacks counts as having the value that was fixed then.
    needs = {"position": "learned", "norm": "layernorm", "activation": "gelu", "pre_norm": True, "use_bias": True}
    for name, want in needs.items():
        if model.get(name, want) != want:
            raise DataError(f"config.model.{name}={model.get(name)!r} has no GPT-2 equivalent; GPT-2 needs {want!r}")
    if model.get("num_kv_heads") not in (0, model["num_heads"]):
        raise DataError(
            f"config.model.num_kv_heads={model.get('num_kv_heads')} (grouped-query attention) has no GPT-2 equivalent"
        )
    rate = float(model.get("dropout_rate", 0.0))
    out: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model["vocab_size"],
        "n_positions": model["max_len"],
        "n_embd": model["embed_dim"],
        "n_layer": model["num_layers"],
        "n_head": model["num_heads"],
        "n_inner": model["mlp_dim"],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": model["norm_eps"],
        "resid_pdrop": rate,
        "embd_pdrop": rate,
        "attn_pdrop": rate,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "use_cache": True,
    }
    for role in ("bos", "eos", "pad"):
        if special_ids.get(role) is not None:
            out[f"{role}_token_id"] = int(special_ids[role])
    return out


# ------------------------------------------------------------------------------------------
# Table-driven architectures (BERT, T5): one Rule per tensor, applied in both directions.


class Rule(NamedTuple):
    """One tensor: where it lives in jaxlm and in Hugging Face, and how its values map.

    The architecture modules give rules as plain tuples in this field order.
    """

    path: str  # jaxlm parameter path, unrolled layout ('blocks/layer_0/attn/query/kernel')
    key: str  # Hugging Face tensor name
    shape: tuple[int, ...]  # jaxlm shape
    # 0: the same values in the same shape; -1: Hugging Face stores them flattened to 1-D;
    # k > 0: an nn.Linear weight [out, in], transposed, whose input is the first k jaxlm axes.
    in_axes: int = 0
    scale: float = 1.0  # jaxlm = Hugging Face * scale
    init: str = ""  # '' if required; else how a tensor the checkpoint lacks starts: normal, zeros, ones

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of the Hugging Face tensor."""
        if self.in_axes > 0:
            return (math.prod(self.shape[self.in_axes :]), math.prod(self.shape[: self.in_axes]))
        return (math.prod(self.shape),) if self.in_axes < 0 else tuple(self.shape)

    def to_jaxlm(self, value: np.ndarray) -> np.ndarray:
        """The jaxlm float32 array of the Hugging Face tensor ``value``."""
        a = np.asarray(value, dtype=np.float32)
        a = (a.T if self.in_axes > 0 else a).reshape(self.shape)
        return np.ascontiguousarray(a * np.float32(self.scale) if self.scale != 1.0 else a)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """The Hugging Face float32 tensor of the jaxlm array ``value``."""
        a = np.asarray(value, dtype=np.float32)
        a = a / np.float32(self.scale) if self.scale != 1.0 else a
        if self.in_axes > 0:
            a = a.reshape(math.prod(self.shape[: self.in_axes]), -1).T
        return np.ascontiguousarray(a.reshape(self.hf_shape))


_INIT_STD = 0.02  # BERT's initializer_range: what from_pretrained gives a missing head


def _table(module: ModuleType, model_type: str) -> Architecture:
    """The :class:`Architecture` of a table module (``rules``, ``aliases``, ``ignored``, ``model_fields``...)."""
    name = model_type.upper()

    def rules(model: Mapping[str, Any], state: Any = None, hf_cfg: Any = None) -> list[Rule]:
        return [Rule(*r) for r in module.rules(model, state, hf_cfg)]

    def params_from_hf(
        state: Mapping[str, np.ndarray], model: Mapping[str, Any], hf_cfg: Mapping[str, Any], source: str
    ) -> Params:
        rng = np.random.default_rng(0)  # fresh heads are the same on every import
        flat: dict[str, np.ndarray] = {}
        used: set[str] = set()
        for rule in rules(model, state, hf_cfg):
            if rule.key not in state:
                if not rule.init:
                    raise DataError(
                        f"{source} has no tensor {rule.key!r}; is it a {name} checkpoint matching its config.json?"
                    )
                flat[rule.path] = _initial(rule, rng)
                continue
            value = np.asarray(state[rule.key])
            if value.shape != rule.hf_shape:
                raise DataError(
                    f"{source}: {rule.key} has shape {value.shape} but config.json implies {rule.hf_shape}; "
                    "fix the config"
                )
            used.add(rule.key)
            flat[rule.path] = rule.to_jaxlm(value)
        for key, original in module.aliases(model, state).items():
            if key in state and key not in used:
                if original not in state or not np.array_equal(state[key], state[original]):
                    raise DataError(
                        f"{source}: {key} differs from {original}, which jaxlm ties it to; "
                        f"is it a {name} checkpoint matching its config.json?"
                    )
                used.add(key)
        extra = sorted(k for k in state if k not in used and not module.ignored(k))
        if extra:
            more = ", ..." if len(extra) > 3 else ""
            raise DataError(
                f"{source} has tensors {name} does not use ({', '.join(extra[:3])}{more}); "
                f"jaxlm convert imports {module.IMPORTS}"
            )
        return _unflatten(_stack_flat(flat) if model.get("scan_layers") else flat)

    def params_to_hf(params: Mapping[str, Any], model: Mapping[str, Any], skip: Collection[str] = ()) -> StateDict:
        flat = _unstack_flat(_flatten(params))
        table = [rule for rule in rules(model) if rule.path.split("/")[0] not in skip]
        out: StateDict = {}
        for rule in table:  # a parameter may be written under several keys
            if rule.path not in flat:
                raise DataError(
                    f"the checkpoint has no parameter {rule.path}; only {name}-shaped jaxlm models can be exported"
                )
            value = np.asarray(flat[rule.path])
            if value.shape != rule.shape:
                raise DataError(
                    f"parameter {rule.path} has shape {value.shape}, not {rule.shape}; it cannot be exported"
                )
            out[rule.key] = rule.to_hf(value)
        unused = sorted(set(flat) - {rule.path for rule in table})
        if unused:
            raise DataError(
                f"parameters {name} has no place for: {', '.join(unused[:3])}; "
                f"only {name}-shaped jaxlm models can be exported"
            )
        return out

    def fresh(state: Mapping[str, np.ndarray], model: Mapping[str, Any], hf_cfg: Mapping[str, Any]) -> list[str]:
        missing = [r.path.split("/")[0] for r in rules(model, state, hf_cfg) if r.init and r.key not in state]
        return list(dict.fromkeys(missing))

    return Architecture(
        kind=module.KIND,
        objective=module.OBJECTIVE,
        model_fields=module.model_fields,
        params_from_hf=params_from_hf,
        params_to_hf=params_to_hf,
        hf_config=module.hf_config,
        fresh=fresh,
    )


def _initial(rule: Rule, rng: np.random.Generator) -> np.ndarray:
    if rule.init == "normal":
        return (rng.standard_normal(rule.shape) * _INIT_STD).astype(np.float32)
    if rule.init in ("zeros", "ones"):
        return np.full(rule.shape, 1.0 if rule.init == "ones" else 0.0, np.float32)
    raise ValueError(f"unknown init {rule.init!r} for {rule.path}")


_LAYER = re.compile(r"^(.*blocks/)layer_(\d+)/(.*)$")
_SCANNED = re.compile(r"^(.*blocks/)layers/block/(.*)$")


def _stack_flat(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat unrolled paths (``.../blocks/layer_i/x``) -> the ``nn.scan`` layout (``.../blocks/layers/block/x``)."""
    out: dict[str, np.ndarray] = {}
    groups: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for path, value in flat.items():
        m = _LAYER.match(path)
        if m:
            groups.setdefault((m[1], m[3]), {})[int(m[2])] = value
        else:
            out[path] = value
    for (stack, rest), layers in groups.items():
        out[f"{stack}layers/block/{rest}"] = np.stack([layers[i] for i in range(len(layers))])
    return out


def _unstack_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_stack_flat` (unrolled paths pass through)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        m = _SCANNED.match(path)
        if m:
            for i, layer in enumerate(np.asarray(value)):
                out[f"{m[1]}layer_{i}/{m[2]}"] = layer
        else:
            out[path] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> Params:
    out: Params = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# ------------------------------------------------------------------------------------------
# Tree helpers (NumPy only: this layer builds no JAX arrays).


def _stack_layers(layers: list[Params]) -> Params:
    """Per-layer trees -> the ``nn.scan`` layout ``{'layers': {'block': tree of [L, ...]}}``."""

    def stack(trees: list[Any]) -> Any:
        if isinstance(trees[0], Mapping):
            return {k: stack([t[k] for t in trees]) for k in trees[0]}
        return np.stack(trees)

    return {"layers": {"block": stack(layers)}}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        kind="decoder_only",
        objective="causal_lm",
        model_fields=lambda cfg, source, state: _gpt2_model_fields(cfg, source),
        params_from_hf=lambda state, model, hf_cfg, source: _gpt2_params_from_hf(state, model, source),
        # A task model exports with tie_embeddings forced on, so there is no lm_head to skip.
        params_to_hf=lambda params, model, skip: _gpt2_params_to_hf(params, model),
        hf_config=_gpt2_hf_config,
    ),
    "bert": _table(hf_bert, "bert"),
    "t5": _table(hf_t5, "t5"),
}
