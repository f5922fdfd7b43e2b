"""T5 (``model_type: t5``) <-> jaxlm ``encoder_decoder``: config fields and the tensor table.

Reads the weights of ``T5ForConditionalGeneration``: T5 v1.0 (ReLU MLP, output projection
tied to the shared embedding, decoder output rescaled by ``D ** -0.5``) and T5 v1.1 / mT5
layouts (gated-GELU MLP, own ``lm_head``, no rescaling). The table is the one documented in
:mod:`jaxlm.models.encoder_decoder`; :mod:`jaxlm.interop.hf` applies it in both directions.

Two T5 facts the table encodes:

* T5 does not scale attention logits by ``H ** -0.5``, jaxlm does: query kernels are
  ``q.weight.T * sqrt(H)``.
* Whether the head is tied is read off the weights, not only ``config.json``: transformers 5
  writes ``tie_word_embeddings: true`` for every T5 and says ``scale_decoder_outputs: false``
  for v1.1, and unties a stored ``lm_head.weight`` that differs from ``shared.weight``. jaxlm
  rescales exactly when tied, so a head that is tied without the rescaling becomes an untied
  copy, and an own head with the rescaling has the factor folded into its kernel.

A tensor rule is the tuple ``(jaxlm path, HF key, jaxlm shape, in_axes, scale, init)``; see
``jaxlm.interop.hf.Rule``. This module imports nothing from jaxlm above L0.

Shapes: D model dim, N heads, H head dim (``d_kv``; jaxlm needs D = N * H), F mlp dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlm.common_types import DataError

KIND = "encoder_decoder"  # jaxlm config.model.kind
OBJECTIVE = "span_corruption"  # jaxlm config.data.objective
IMPORTS = "T5ForConditionalGeneration weights"
# T5Config's defaults, used where config.json leaves a field out (as from_pretrained does).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": None,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
    "tie_word_embeddings": True,
    "decoder_start_token_id": 0,
}
MAX_LEN = 512  # T5 has no position table; the length it was trained on, overridable at import
# Hugging Face dense_act_fn -> jaxlm activation, plain and gated ("gated-gelu" is tanh GELU).
_PLAIN = {
    "relu": "relu",
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "silu": "silu",
    "swish": "silu",
}
_GATED = {"gelu_new": "geglu", "gelu_pytorch_tanh": "geglu", "silu": "swiglu", "swish": "swiglu"}
_EXPORT_PROJ = {
    "relu": "relu",
    "gelu_exact": "gelu",
    "gelu": "gelu_new",
    "silu": "silu",
    "geglu": "gated-gelu",
    "swiglu": "gated-silu",
}
LM_HEAD, SHARED = "lm_head.weight", "shared.weight"
# HF ignores this one on load (cross-attention has no position bias).
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _rule(path: str, key: str, shape: tuple[int, ...], in_axes: int = 0, scale: float = 1.0, init: str = "") -> tuple:
    return (path, key, shape, in_axes, scale, init)


def activation(cfg: Mapping[str, Any], source: str) -> str:
    """The jaxlm activation of a T5 ``feed_forward_proj`` (``relu``, ``gated-gelu``, ...)."""
    proj = str(cfg.get("feed_forward_proj", DEFAULTS["feed_forward_proj"]))
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    fn = "gelu_new" if proj == "gated-gelu" else parts[-1]  # as T5Config does
    table = _GATED if gated else _PLAIN
    if (len(parts) > 1 and not gated) or fn not in table:
        valid = sorted(_PLAIN) + [f"gated-{a}" for a in ("gelu", "silu")]
        raise DataError(f"{source}: feed_forward_proj={proj!r} is not supported; jaxlm imports: {', '.join(valid)}")
    return table[fn]


def scales_output(cfg: Mapping[str, Any]) -> bool:
    """Whether the decoder output is multiplied by ``D ** -0.5`` before the head (T5 v1.0)."""
    if "scale_decoder_outputs" in cfg:  # written by transformers 5
        return bool(cfg["scale_decoder_outputs"])
    return cfg.get("tie_word_embeddings", True) is not False


def model_fields(cfg: Mapping[str, Any], source: str, state: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The jaxlm ``config.model`` fields of a T5 ``config.json`` (and, when given, its weights)."""
    c = {**DEFAULTS, **cfg}
    if c["num_decoder_layers"] is None:
        c["num_decoder_layers"] = c["num_layers"]
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
        value = c[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(f"{source}: {name}={value!r} must be a positive integer; fix the config")
    d, n, h = c["d_model"], c["num_heads"], c["d_kv"]
    if n * h != d:
        raise DataError(
            f"{source}: num_heads * d_kv = {n} * {h} = {n * h} differs from d_model={d}; jaxlm attention "
            "needs d_model = num_heads * d_kv (T5 v1.1 small / flan-t5-small do not fit)"
        )
    buckets, distance = c["relative_attention_num_buckets"], c["relative_attention_max_distance"]
    if not (isinstance(buckets, int) and isinstance(distance, int) and buckets >= 2 and distance > buckets // 2):
        raise DataError(
            f"{source}: relative_attention_num_buckets={buckets!r} / relative_attention_max_distance={distance!r} "
            "must be integers with buckets >= 2 and max_distance > buckets/2"
        )
    eps = c["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise DataError(f"{source}: layer_norm_epsilon={eps!r} must be a positive number; fix the config")
    if c["decoder_start_token_id"] not in (0, None):
        raise DataError(
            f"{source}: decoder_start_token_id={c['decoder_start_token_id']!r} is not supported; "
            "jaxlm's decoder starts from id 0 (as T5 does)"
        )
    tied = scales_output(c)
    if state is not None:
        # An own head (a stored lm_head.weight that differs from the embedding) is untied; a head
        # that is the embedding is tied only if T5 also rescales (jaxlm rescales exactly then).
        head, shared = state.get(LM_HEAD), state.get(SHARED)
        own = head is not None and not (shared is not None and np.array_equal(head, shared))
        tied = tied and not own
    return {
        "kind": "encoder_decoder",
        "num_layers": c["num_layers"],
        "num_decoder_layers": c["num_decoder_layers"],
        "num_heads": n,
        "num_kv_heads": 0,
        "embed_dim": d,
        "mlp_dim": c["d_ff"],
        "max_len": MAX_LEN,
        "vocab_size": c["vocab_size"],
        "dropout_rate": 0.0,
        "position": "relative",
        "relative_buckets": buckets,
        "relative_max_distance": distance,
        "norm": "rmsnorm",
        "norm_eps": float(eps),
        "pre_norm": True,
        "use_bias": False,
        "activation": activation(c, source),
        "tie_embeddings": tied,
    }


def rules(
    model: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None, hf_cfg: Mapping[str, Any] | None = None
) -> list[tuple]:
    """The tensor table for jaxlm ``config.model`` fields ``model`` (unrolled layer paths).

    On import (``hf_cfg`` given) an untied head is read from ``lm_head.weight`` (or from
    ``shared.weight`` if the checkpoint has none), times ``D ** -0.5`` if T5 rescales.
    """
    d, n, f, v = model["embed_dim"], model["num_heads"], model["mlp_dim"], model["vocab_size"]
    h, buckets = d // n, model["relative_buckets"]
    gated = model["activation"] in ("geglu", "swiglu")
    out = [_rule("token_embed/embedding", SHARED, (v, d))]
    decoder_layers = model.get("num_decoder_layers") or model["num_layers"]
    for side, layers in (("encoder", model["num_layers"]), ("decoder", decoder_layers)):
        rel = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out.append(_rule(f"{side}/blocks/relative_bias/rel_embedding", rel, (buckets, n)))
        subs = ("attn", "cross_attn", "mlp") if side == "decoder" else ("attn", "mlp")
        for i in range(layers):
            dst = f"{side}/blocks/layer_{i}/"
            for j, sub in enumerate(subs):
                src = f"{side}.block.{i}.layer.{j}."
                out.append(_rule(f"{dst}{sub}_norm/scale", src + "layer_norm.weight", (d,)))
                if sub == "mlp":
                    names = ("wi_0", "wi_1") if gated else ("wi",)
                    for name in names:
                        out.append(_rule(f"{dst}mlp/{name}/kernel", f"{src}DenseReluDense.{name}.weight", (d, f), 1))
                    out.append(_rule(f"{dst}mlp/wo/kernel", src + "DenseReluDense.wo.weight", (f, d), 1))
                    continue
                attn = src + ("SelfAttention." if sub == "attn" else "EncDecAttention.")
                out.append(_rule(f"{dst}{sub}/query/kernel", attn + "q.weight", (d, n, h), 1, math.sqrt(h)))
                out.append(_rule(f"{dst}{sub}/key/kernel", attn + "k.weight", (d, n, h), 1))
                out.append(_rule(f"{dst}{sub}/value/kernel", attn + "v.weight", (d, n, h), 1))
                out.append(_rule(f"{dst}{sub}/out/kernel", attn + "o.weight", (n, h, d), 2))
        out.append(_rule(f"{side}/final_norm/scale", f"{side}.final_layer_norm.weight", (d,)))
    if not model["tie_embeddings"]:
        key = LM_HEAD if state is None or LM_HEAD in state else SHARED
        scale = d**-0.5 if hf_cfg is not None and scales_output(hf_cfg) else 1.0
        out.append(_rule("lm_head/kernel", key, (d, v), 1, scale))
    return out


def aliases(model: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None) -> dict[str, str]:
    """Keys a checkpoint may also hold as copies of another tensor (tied weights): key -> the original."""
    out = {"encoder.embed_tokens.weight": SHARED, "decoder.embed_tokens.weight": SHARED}
    if model["tie_embeddings"]:
        out[LM_HEAD] = SHARED
    return out


def ignored(key: str) -> bool:
    """Whether ``key`` is a tensor Hugging Face itself ignores on load."""
    return key in IGNORED


def hf_config(model: Mapping[str, Any], special_ids: Mapping[str, int | None]) -> dict[str, Any]:
    """A ``T5ForConditionalGeneration`` ``config.json`` for jaxlm ``config.model`` fields."""
    needs = {"position": "relative", "norm": "rmsnorm", "pre_norm": True, "use_bias": False}
    for name, want in needs.items():
        if model.get(name) != want:
            raise DataError(f"config.model.{name}={model.get(name)!r} has no T5 equivalent; T5 needs {want!r}")
    if model.get("activation") not in _EXPORT_PROJ:
        raise DataError(
            f"config.model.activation={model.get('activation')!r} has no T5 equivalent; "
            f"exportable: {', '.join(_EXPORT_PROJ)}"
        )
    if model.get("num_kv_heads") not in (0, model["num_heads"]):
        raise DataError("config.model.num_kv_heads (grouped-query attention) has no T5 equivalent")
    tied = bool(model["tie_embeddings"])
    out: dict[str, Any] = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": model["vocab_size"],
        "d_model": model["embed_dim"],
        "d_kv": model["embed_dim"] // model["num_heads"],
        "d_ff": model["mlp_dim"],
        "num_layers": model["num_layers"],
        "num_decoder_layers": model.get("num_decoder_layers") or model["num_layers"],
        "num_heads": model["num_heads"],
        "relative_attention_num_buckets": model["relative_buckets"],
        "relative_attention_max_distance": model["relative_max_distance"],
        "dropout_rate": float(model.get("dropout_rate", 0.0)),
        "layer_norm_epsilon": model["norm_eps"],
        "initializer_factor": 1.0,
        "feed_forward_proj": _EXPORT_PROJ[model["activation"]],
        "is_encoder_decoder": True,
        # transformers 4 reads the rescaling off tie_word_embeddings, transformers 5 off scale_decoder_outputs.
        "tie_word_embeddings": tied,
        "scale_decoder_outputs": tied,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
    }
    if special_ids.get("eos") is not None:
        out["eos_token_id"] = int(special_ids["eos"])
    return out
