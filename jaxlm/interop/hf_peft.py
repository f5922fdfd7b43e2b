"""Hugging Face ``peft`` LoRA / DoRA adapters <-> jaxlm PEFT trainable trees, as plain NumPy.

``peft``'s ``save_pretrained`` writes ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``target_modules``, ``use_dora``, ``modules_to_save`` ...) and
``adapter_model.safetensors`` with one pair of tensors per adapted module::

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight    [r, in]
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight    [out, r]
    base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector   [out]   (DoRA)
    base_model.model.classifier.weight                            (modules_to_save: a task head)

and computes ``W' = W + (lora_alpha / r) * B @ A`` (``lora_alpha / sqrt(r)`` with ``use_rslora``),
whatever the layer's own weight layout (GPT-2's ``Conv1D`` stores ``[in, out]`` and sets
``fan_in_fan_out``). jaxlm's LoRA views each kernel as ``[in, out]`` with ``A [in, r]`` and
``B [r, out]`` (:mod:`jaxlm.peft`), so ``lora_a = lora_A.T`` and ``lora_b = lora_B.T``.

Modules that map (per block ``i``; jaxlm ``blocks/layer_i/...``, stacked under ``scan_layers``):

==========================  ====================================  =========================
jaxlm kernel                GPT-2 (``transformer.h.i.``)          BERT (``bert.encoder.layer.i.``)
==========================  ====================================  =========================
``attn/query|key|value``    ``attn.c_attn`` (fused, see below)    ``attention.self.query|key|value``
``attn/out``                ``attn.c_proj``                       ``attention.output.dense``
``mlp/wi``                  ``mlp.c_fc``                          ``intermediate.dense``
``mlp/wo``                  ``mlp.c_proj``                        ``output.dense``
==========================  ====================================  =========================

GPT-2's ``c_attn`` is one ``[D, 3D]`` projection for query, key and value, jaxlm's are three. A
``c_attn`` LoRA (``A [r, D]``, ``B [3D, r]``) imports exactly as three LoRAs that share ``A``
and take one third of ``B`` each (the same function; jaxlm then trains the three ``A`` apart).
jaxlm LoRAs on a subset of query/key/value, or with different ``A``, export exactly as one
``c_attn`` LoRA of rank ``k * r`` for ``k`` adapted projections: ``A`` stacked, ``B`` block
diagonal, declared through ``rank_pattern`` / ``alpha_pattern`` (``k * alpha``, so the scale
``alpha / r`` is unchanged); ``peft`` then counts (and would train) the zero blocks of ``B``.

Task heads (``config.peft.trainable``'s ``head/``, and BERT's ``pooler/``) travel as
``modules_to_save``. Other jaxlm methods (IA3, BitFit, adapters, prefix / prompt tuning) and
other adapted modules have no place in a ``peft`` LoRA adapter and are refused by name.

This module builds no model: it maps names and arrays, importing nothing above L0.
Shapes: D model dim, F mlp dim, r rank, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlm.common_types import DataError
from jaxlm.interop import hf, hf_heads

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_WEIGHT_FILES = (ADAPTER_WEIGHTS_FILE, "adapter_model.bin")
PREFIX = "base_model.model."  # what peft puts before the base model's own module names
# What jaxlm writes and reads; the other LoraConfig fields must keep their defaults.
SUPPORTED = "LoRA and DoRA (peft_type LORA, use_dora) on GPT-2 and BERT attention / MLP projections"

# model type -> (body prefix in the LM / task models, per-block module prefix, {HF module -> jaxlm kernels}).
BLOCK_PREFIX = {"gpt2": ("transformer.", "h"), "bert": ("bert.", "encoder.layer")}
MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt2": {
        "attn.c_attn": ("attn/query", "attn/key", "attn/value"),
        "attn.c_proj": ("attn/out",),
        "mlp.c_fc": ("mlp/wi",),
        "mlp.c_proj": ("mlp/wo",),
    },
    "bert": {
        "attention.self.query": ("attn/query",),
        "attention.self.key": ("attn/key",),
        "attention.self.value": ("attn/value",),
        "attention.output.dense": ("attn/out",),
        "intermediate.dense": ("mlp/wi",),
        "output.dense": ("mlp/wo",),
    },
}
# Non-block modules a peft adapter may carry whole (modules_to_save): jaxlm group -> HF module (body-relative).
SAVED_BODY_MODULES = {"bert": {"pooler": "pooler.dense"}, "gpt2": {}}
_MODEL_TYPES = {"decoder_only": "gpt2", "encoder_only": "bert"}
# LoraConfig fields jaxlm has no equivalent for, and the values that mean "not used".
_UNUSED = {
    "bias": ("none",),
    "lora_bias": (False, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}

StateDict = dict[str, np.ndarray]


@dataclasses.dataclass
class Adapter:
    """A LoRA / DoRA adapter in jaxlm's terms (unrolled block paths, float32 arrays).

    ``delta`` maps a jaxlm kernel path (``blocks/layer_0/attn/query/kernel``) to its entry
    ``{'lora_a': [in, r], 'lora_b': [r, out], 'magnitude': [out]}`` as :mod:`jaxlm.peft` keeps
    it; ``params`` holds whole parameters kept trainable (``head/...``, ``pooler/...``) by path.
    """

    method: str  # 'lora' | 'dora'
    rank: int
    alpha: float  # jaxlm's: the delta is scaled by alpha / rank
    dropout: float
    delta: dict[str, dict[str, np.ndarray]]
    params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    num_layers: int = 0  # the base model's blocks (targets name blocks only when some are left out)

    def targets(self) -> str:
        """A ``config.peft.targets`` value that selects exactly the adapted kernels (blocks' paths, any layout)."""
        by_layer: dict[str, set[int]] = {}
        for path in self.delta:
            m = re.fullmatch(r"blocks/layer_(\d+)/(.*)/kernel", path)
            if m is None:  # only block kernels are produced by adapter_from_peft
                raise ValueError(path)
            by_layer.setdefault(m[2], set()).add(int(m[1]))
        layers = {i for ids in by_layer.values() for i in ids}
        out = []
        for module, ids in sorted(by_layer.items()):
            if ids == layers and len(layers) == self.num_layers:
                out.append(f"/{module}/")
            else:  # only some blocks: name them (unrolled layout only; checked by the caller)
                out.append(f"blocks/layer_({'|'.join(str(i) for i in sorted(ids))})/{module}/")
        return ",".join(out)


def model_type(model: Mapping[str, Any]) -> str:
    """The Hugging Face model type a jaxlm ``config.model`` (a dict) adapts as; a DataError for others."""
    kind = model.get("kind")
    if kind not in _MODEL_TYPES:
        raise DataError(
            f"config.model.kind={kind!r} has no Hugging Face PEFT adapter mapping; jaxlm converts {SUPPORTED}"
        )
    return _MODEL_TYPES[kind]


def _sizes(mtype: str, model: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``{HF module: (in, out)}`` of the mappable per-block modules."""
    d, f = model["embed_dim"], model["mlp_dim"]
    if mtype == "gpt2":
        return {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, f), "mlp.c_proj": (f, d)}
    out = {name: (d, d) for name in MODULES["bert"]}
    out.update({"intermediate.dense": (d, f), "output.dense": (f, d)})
    return out


# ------------------------------------------------------------------------------------------
# Files.


def read_adapter(adapter_dir: str) -> tuple[dict[str, Any], StateDict]:
    """``(adapter_config.json as a dict, the adapter's tensors)`` of a ``peft`` ``save_pretrained`` directory."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{adapter_dir} has no {ADAPTER_CONFIG_FILE}; give the directory peft's save_pretrained wrote")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); re-save the adapter") from e
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object; give peft's adapter_config.json")
    for name in ADAPTER_WEIGHT_FILES:
        weights = os.path.join(adapter_dir, name)
        if os.path.isfile(weights):
            return config, hf._load_file(weights)  # noqa: SLF001 (the package's own reader)
    raise DataError(f"{adapter_dir} has no adapter weights; expected one of: {', '.join(ADAPTER_WEIGHT_FILES)}")


def write_adapter(adapter_dir: str, config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into the existing ``adapter_dir``."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    hf.save_state_dict(state, os.path.join(adapter_dir, ADAPTER_WEIGHTS_FILE))


# ------------------------------------------------------------------------------------------
# Import.


def _module_of(key: str) -> tuple[str, str]:
    """``(module name, tensor role)`` of an adapter tensor key (prefix and adapter name dropped)."""
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for role in ("lora_A", "lora_B"):
        m = re.fullmatch(rf"(.*)\.{role}(?:\.default)?\.weight", name)
        if m:
            return m[1], role
    m = re.fullmatch(r"(.*)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?", name)
    if m:
        return m[1], "magnitude"
    m = re.fullmatch(r"(.*)\.lora_embedding_[AB](?:\.default)?", name)
    if m:  # a LoRA on an embedding table: no jaxlm counterpart (refused by module name below)
        return m[1], "embedding"
    return name, "saved"


def _block_module(mtype: str, name: str) -> tuple[int, str] | None:
    """``(block index, module within the block)`` of a full module name, or None outside the blocks."""
    body, blocks = BLOCK_PREFIX[mtype]
    m = re.fullmatch(rf"(?:{re.escape(body)})?{re.escape(blocks)}\.(\d+)\.(.+)", name)
    return (int(m[1]), m[2]) if m else None


def _check_config(config: Mapping[str, Any], source: str) -> None:
    if config.get("peft_type") != "LORA":
        raise DataError(f"{source}: peft_type={config.get('peft_type')!r}; jaxlm converts {SUPPORTED}")
    for field, fine in _UNUSED.items():
        if field in config and config[field] not in fine and not (isinstance(fine[0], bool) and not config[field]):
            raise DataError(
                f"{source}: {field}={config[field]!r} has no jaxlm equivalent; jaxlm converts {SUPPORTED} "
                f"with {field}={fine[0]!r}"
            )
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise DataError(f"{source}: {field}={value!r} must be a positive number")


def adapter_from_peft(
    config: Mapping[str, Any], state: Mapping[str, np.ndarray], model: Mapping[str, Any], source: str = ""
) -> Adapter:
    """The :class:`Adapter` from a ``peft`` adapter config and tensors, for jaxlm ``config.model`` fields.

    A ``c_attn`` LoRA of GPT-2 becomes query / key / value LoRAs sharing ``A``; per-module
    ranks (``rank_pattern`` / ``alpha_pattern``) must equal ``r`` / ``lora_alpha``, as jaxlm
    has one rank for all kernels.
    """
    source = source or ADAPTER_CONFIG_FILE
    mtype = model_type(model)
    _check_config(config, source)
    rank, lora_alpha = int(config["r"]), float(config["lora_alpha"])
    for field, default in (("rank_pattern", rank), ("alpha_pattern", lora_alpha)):
        odd = {k: v for k, v in (config.get(field) or {}).items() if v != default}
        if odd:
            raise DataError(
                f"{source}: {field}={odd} gives some modules another rank or alpha; jaxlm has one "
                f"config.peft.rank / alpha for every kernel (re-save the adapter without {field})"
            )
    scale = lora_alpha / math.sqrt(rank) if config.get("use_rslora") else lora_alpha / rank
    method = "dora" if config.get("use_dora") else "lora"
    sizes = _sizes(mtype, model)
    body = BLOCK_PREFIX[mtype][0]
    saved_body = {v: k for k, v in SAVED_BODY_MODULES[mtype].items()}

    modules: dict[str, dict[str, np.ndarray]] = {}
    params: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name, role = _module_of(key)
        if role == "saved":
            params.update(_saved_tensor(name, np.asarray(value, np.float32), mtype, body, saved_body, source))
            continue
        modules.setdefault(name, {})[role] = np.asarray(value, np.float32)

    delta: dict[str, dict[str, np.ndarray]] = {}
    for name, tensors in sorted(modules.items()):
        where = _block_module(mtype, name)
        if where is None or where[1] not in sizes:
            raise DataError(
                f"{source}: a LoRA on {name!r} has no jaxlm equivalent; jaxlm maps the {mtype} modules "
                f"{', '.join(sizes)} of every block"
            )
        layer, module = where
        if layer >= model["num_layers"]:
            raise DataError(f"{source}: {name} is past the base model's {model['num_layers']} blocks")
        missing = {"lora_A", "lora_B"} | ({"magnitude"} if method == "dora" else set())
        missing -= set(tensors)
        if missing:
            raise DataError(f"{source} has no {', '.join(sorted(missing))} for {name}; re-save the adapter")
        n_in, n_out = sizes[module]
        a, b = tensors["lora_A"], tensors["lora_B"]
        if a.shape != (rank, n_in) or b.shape != (n_out, rank):
            raise DataError(
                f"{source}: {name} has lora_A {a.shape} and lora_B {b.shape}, but r={rank} on the base model "
                f"implies {(rank, n_in)} and {(n_out, rank)}; is --base the model the adapter was trained on?"
            )
        kernels = MODULES[mtype][module]
        # jaxlm's own scale is alpha / rank; fold any other scale (rsLoRA) into B.
        b = b * np.float32(scale / (lora_alpha / rank))
        parts = np.split(b, len(kernels), axis=0)
        mags = np.split(tensors["magnitude"], len(kernels)) if "magnitude" in tensors else [None] * len(kernels)
        for kernel, part, mag in zip(kernels, parts, mags):
            entry = {"lora_a": np.ascontiguousarray(a.T), "lora_b": np.ascontiguousarray(part.T)}
            if mag is not None:
                entry["magnitude"] = np.ascontiguousarray(mag.reshape(-1))
            delta[f"blocks/layer_{layer}/{kernel}/kernel"] = entry
    if not delta:
        raise DataError(f"{source} holds no LoRA tensors (lora_A / lora_B); is it a peft LoRA adapter?")
    dropout = float(config.get("lora_dropout") or 0.0)
    return Adapter(method, rank, lora_alpha, dropout, delta, params, num_layers=model["num_layers"])


def _saved_tensor(
    name: str, value: np.ndarray, mtype: str, body: str, saved_body: Mapping[str, str], source: str
) -> dict[str, np.ndarray]:
    """A ``modules_to_save`` tensor as ``{jaxlm path: array}``: a task head layer or BERT's pooler."""
    module, _, part = name.rpartition(".")
    if part not in ("weight", "bias"):
        raise DataError(f"{source}: tensor {name!r} is neither a LoRA tensor nor a saved module's weight or bias")
    leaf = "kernel" if part == "weight" else "bias"
    array = np.ascontiguousarray(value.T) if part == "weight" else value
    relative = module[len(body) :] if module.startswith(body) else module
    if relative in saved_body:
        return {f"{saved_body[relative]}/{leaf}": array}
    heads = {h.layer for h in hf_heads.HEADS.values() if h.model_type == mtype}
    if module in heads:
        return {f"head/{module}/{leaf}": array}
    raise DataError(
        f"{source}: modules_to_save tensor {name!r} has no jaxlm equivalent; jaxlm maps the task head "
        f"({', '.join(sorted(heads))}){' and ' + ', '.join(saved_body) if saved_body else ''}"
    )


# ------------------------------------------------------------------------------------------
# Export.


def adapter_to_peft(
    adapter: Adapter, model: Mapping[str, Any], base: Mapping[str, np.ndarray], *, task_type: str | None = None
) -> tuple[dict[str, Any], StateDict, list[str]]:
    """``(adapter_config.json dict, adapter tensors, notes)`` for a jaxlm :class:`Adapter`.

    ``base`` holds the base model's kernels by unrolled path: DoRA's magnitude of the ``c_attn``
    columns jaxlm leaves unadapted is their weight norm (the identity). ``notes`` says where the
    result differs from a plain export (``c_attn`` at a higher rank).
    """
    mtype = model_type(model)
    body, blocks = BLOCK_PREFIX[mtype]
    inverse = {kernels: module for module, kernels in MODULES[mtype].items()}
    by_kernel = {k: module for module, ks in MODULES[mtype].items() for k in ks}
    grouped: dict[tuple[int, str], dict[str, dict[str, np.ndarray]]] = {}
    for path, entry in adapter.delta.items():
        m = re.fullmatch(r"blocks/layer_(\d+)/(.*)/kernel", path)
        if m is None or m[2] not in by_kernel:
            supported = ", ".join(sorted(by_kernel))
            raise DataError(
                f"the LoRA on {path} has no Hugging Face PEFT equivalent on {mtype}; "
                f"convert --to hf-peft maps the block kernels {supported}"
            )
        bad = set(entry) - {"lora_a", "lora_b", "magnitude"}
        if bad:
            raise DataError(f"{path} carries {', '.join(sorted(bad))} (IA3?); convert --to hf-peft exports {SUPPORTED}")
        grouped.setdefault((int(m[1]), by_kernel[m[2]]), {})[m[2]] = entry

    r, alpha = adapter.rank, adapter.alpha
    state: StateDict = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    notes: list[str] = []
    targets: dict[str, set[int]] = {}
    for (layer, module), entries in sorted(grouped.items()):
        name = f"{body}{blocks}.{layer}.{module}"
        targets.setdefault(module, set()).add(layer)
        kernels = next(ks for ks in inverse if inverse[ks] == module)
        if len(kernels) == 1:
            e = entries[kernels[0]]
            a, b, mag = e["lora_a"].T, e["lora_b"].T, e.get("magnitude")
        else:
            a, b, mag = _fuse(kernels, entries, layer, base, r)
            if a.shape[0] != r:
                k = a.shape[0] // r
                rank_pattern[module] = a.shape[0]
                alpha_pattern[module] = k * alpha
                note = (
                    f"{module}: jaxlm's {'/'.join(x.split('/')[-1] for x in kernels if x in entries)} LoRAs "
                    f"exported as one rank-{a.shape[0]} LoRA (block-diagonal B, rank_pattern), the same function"
                )
                if note not in notes:
                    notes.append(note)
        state[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        state[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
        if adapter.method == "dora":
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(mag, np.float32)

    modules_to_save = _saved_to_peft(adapter.params, mtype, body, state)
    if len({frozenset(ids) for ids in targets.values()}) == 1:
        (ids,) = {frozenset(x) for x in targets.values()}
        layers = "|".join(str(i) for i in sorted(ids))
        target = rf".*{re.escape(blocks)}\.({layers})\.({'|'.join(re.escape(m) for m in sorted(targets))})"
    else:
        target = "|".join(
            rf".*{re.escape(blocks)}\.({'|'.join(str(i) for i in sorted(ids))})\.{re.escape(m)}"
            for m, ids in sorted(targets.items())
        )
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": target,
        "fan_in_fan_out": mtype == "gpt2",  # GPT-2's Conv1D weights are [in, out]
        "bias": "none",
        "use_dora": adapter.method == "dora",
        "use_rslora": False,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return config, state, notes


def _fuse(
    kernels: tuple[str, ...], entries: Mapping[str, Mapping[str, np.ndarray]], layer: int, base: Any, r: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One ``c_attn`` LoRA (``A [R, D]``, ``B [3D, R]``, magnitude ``[3D]``) from jaxlm's query/key/value LoRAs."""
    present = [k for k in kernels if k in entries]
    outs = [entries[k]["lora_b"].shape[-1] if k in entries else None for k in kernels]
    width = next(o for o in outs if o is not None)
    a_list = [entries[k]["lora_a"] for k in present]
    shared = len(present) == len(kernels) and all(np.array_equal(a_list[0], x) for x in a_list[1:])
    if shared:  # what an imported c_attn LoRA looks like until training moves the A apart
        a = a_list[0].T
        b = np.concatenate([entries[k]["lora_b"].T for k in kernels], axis=0)
    else:
        a = np.concatenate([x.T for x in a_list], axis=0)  # [k r, D]
        b = np.zeros((width * len(kernels), r * len(present)), np.float32)
        for j, k in enumerate(present):
            i = kernels.index(k)
            b[i * width : (i + 1) * width, j * r : (j + 1) * r] = entries[k]["lora_b"].T
    mag = None
    if any("magnitude" in entries[k] for k in present):
        parts = []
        for k in kernels:
            if k in entries:
                parts.append(entries[k]["magnitude"])
            else:  # an unadapted projection: its own column norms leave it unchanged
                w = np.asarray(base[f"blocks/layer_{layer}/{k}/kernel"], np.float32).reshape(-1, width)
                parts.append(np.sqrt(np.sum(np.square(w), axis=0)))
        mag = np.concatenate(parts)
    return a, b, mag


def _saved_to_peft(params: Mapping[str, np.ndarray], mtype: str, body: str, state: StateDict) -> list[str]:
    """Write the trainable whole parameters (task head, BERT's pooler) as ``modules_to_save``; their names."""
    saved: list[str] = []
    for path, value in sorted(params.items()):
        parts = path.split("/")
        group = parts[0]
        if group == "head" and len(parts) == 3:
            module = parts[1]
            short = module
        elif group in SAVED_BODY_MODULES[mtype] and len(parts) == 2:
            module = body + SAVED_BODY_MODULES[mtype][group]
            short = group
        else:
            raise DataError(
                f"the trained parameter {path} has no place in a Hugging Face PEFT LoRA adapter "
                "(it carries the task head and BERT's pooler); train without it in config.peft.trainable "
                "or merge and export the whole model (jaxlm merge, then convert --to hf)"
            )
        leaf = parts[-1]
        array = np.asarray(value, np.float32)
        key = f"{PREFIX}{module}.{'weight' if leaf == 'kernel' else leaf}"
        state[key] = np.ascontiguousarray(array.T if leaf == "kernel" else array)
        if short not in saved:
            saved.append(short)
    return saved
