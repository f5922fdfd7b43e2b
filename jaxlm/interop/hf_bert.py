"""BERT (``model_type: bert``) <-> jaxlm ``encoder_only``: config fields and the tensor table.

Reads the weights of ``BertForPreTraining``, ``BertForMaskedLM`` (``bert.`` prefix) or a bare
``BertModel``. The heads a checkpoint lacks (the pooler and next-sentence classifier of
``BertForMaskedLM``; every head of ``BertModel``) are freshly initialized, as
``from_pretrained`` would. The table is the one documented in
:mod:`jaxlm.models.encoder_only`; :mod:`jaxlm.interop.hf` applies it in both directions.

A tensor rule is the tuple ``(jaxlm path, HF key, jaxlm shape, in_axes, scale, init)``; see
``jaxlm.interop.hf.Rule`` for its meaning. This module imports nothing from jaxlm above L0.

Shapes: D model dim, N heads, H head dim (D = N * H), F mlp dim, V vocab, P positions,
T token types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlm.common_types import DataError

KIND = "encoder_only"  # jaxlm config.model.kind
OBJECTIVE = "masked_lm"  # jaxlm config.data.objective
IMPORTS = "BertForPreTraining, BertForMaskedLM or BertModel weights"
# BertConfig's defaults, used where config.json leaves a field out (as from_pretrained does).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# Hugging Face hidden_act -> jaxlm activation (HF's "gelu" is the exact erf form).
ACTIVATIONS = {
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_EXPORT_ACTIVATIONS = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu", "silu": "silu"}
# Buffers some checkpoints carry (not parameters).
IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")
DECODER, DECODER_BIAS, BIAS = "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias"


def _rule(path: str, key: str, shape: tuple[int, ...], in_axes: int = 0, scale: float = 1.0, init: str = "") -> tuple:
    return (path, key, shape, in_axes, scale, init)


def _prefix(state: Mapping[str, Any] | None) -> str:
    # BertForPreTraining / BertForMaskedLM prefix the body with "bert."; a bare BertModel does not.
    if state is None:
        return "bert."
    return "bert." if any(k.startswith("bert.") for k in state) else ""


def model_fields(cfg: Mapping[str, Any], source: str, state: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The jaxlm ``config.model`` fields of a BERT ``config.json`` (and, when given, its weights)."""
    c = {**DEFAULTS, **cfg}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _positive_int(c, name, source)
    _positive_int(c, "max_position_embeddings", source)
    t = c["type_vocab_size"]
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise DataError(f"{source}: type_vocab_size={t!r} must be a non-negative integer; fix the config")
    d, n = c["hidden_size"], c["num_attention_heads"]
    if d % n:
        raise DataError(f"{source}: num_attention_heads={n} does not divide hidden_size={d}; fix the config")
    if c["hidden_act"] not in ACTIVATIONS:
        raise DataError(
            f"{source}: hidden_act={c['hidden_act']!r} is not supported; jaxlm imports: {', '.join(ACTIVATIONS)}"
        )
    eps = c["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise DataError(f"{source}: layer_norm_eps={eps!r} must be a positive number; fix the config")
    if c["position_embedding_type"] != "absolute":
        raise DataError(
            f"{source}: position_embedding_type={c['position_embedding_type']!r} is not supported; "
            "jaxlm imports BERT with absolute (learned) positions"
        )
    if c["is_decoder"] or c["add_cross_attention"]:
        raise DataError(f"{source}: is_decoder / add_cross_attention is not supported; jaxlm imports BERT encoders")
    tied = bool(c["tie_word_embeddings"])
    if state is not None:
        # Tied exactly when the checkpoint stores no decoder of its own (or one equal to the
        # embedding): from_pretrained also unties weights that differ whatever the config says.
        decoder, embedding = state.get(DECODER), state.get(_prefix(state) + "embeddings.word_embeddings.weight")
        tied = decoder is None or (embedding is not None and np.array_equal(decoder, embedding))
    return {
        "kind": "encoder_only",
        "num_layers": c["num_hidden_layers"],
        "num_heads": n,
        "num_kv_heads": 0,
        "embed_dim": d,
        "mlp_dim": c["intermediate_size"],
        "max_len": c["max_position_embeddings"],
        "vocab_size": c["vocab_size"],
        "dropout_rate": 0.0,
        "position": "learned",
        "norm": "layernorm",
        "norm_eps": float(eps),
        "pre_norm": False,
        "use_bias": True,
        "activation": ACTIVATIONS[c["hidden_act"]],
        "tie_embeddings": tied,
        "type_vocab_size": t,
    }


def _positive_int(c: Mapping[str, Any], name: str, source: str) -> None:
    value = c[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{source}: {name}={value!r} must be a positive integer; fix the config")


def rules(
    model: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None, hf_cfg: Mapping[str, Any] | None = None
) -> list[tuple]:
    """The tensor table for jaxlm ``config.model`` fields ``model`` (unrolled layer paths).

    ``state`` (import) picks the key prefix of the checkpoint; export writes
    ``BertForPreTraining`` names.
    """
    d, n, f = model["embed_dim"], model["num_heads"], model["mlp_dim"]
    h, v, p, t = d // n, model["vocab_size"], model["max_len"], model["type_vocab_size"]
    pre = _prefix(state)
    out = [
        _rule("token_embed/embedding", pre + "embeddings.word_embeddings.weight", (v, d)),
        _rule("pos_embed/embedding", pre + "embeddings.position_embeddings.weight", (p, d)),
    ]
    if t:
        out.append(_rule("type_embed/embedding", pre + "embeddings.token_type_embeddings.weight", (t, d)))
    out += _norm("embed_norm", pre + "embeddings.LayerNorm", d)
    for i in range(model["num_layers"]):
        src, dst = f"{pre}encoder.layer.{i}.", f"blocks/layer_{i}/"
        for name in ("query", "key", "value"):
            out.append(_rule(f"{dst}attn/{name}/kernel", f"{src}attention.self.{name}.weight", (d, n, h), 1))
            out.append(_rule(f"{dst}attn/{name}/bias", f"{src}attention.self.{name}.bias", (n, h), -1))
        out += _dense(f"{dst}attn/out", f"{src}attention.output.dense", (n, h, d), 2)
        out += _norm(f"{dst}attn_norm", f"{src}attention.output.LayerNorm", d)
        out += _dense(f"{dst}mlp/wi", f"{src}intermediate.dense", (d, f), 1)
        out += _dense(f"{dst}mlp/wo", f"{src}output.dense", (f, d), 1)
        out += _norm(f"{dst}mlp_norm", f"{src}output.LayerNorm", d)
    # The heads: freshly initialized where the checkpoint has none.
    out += _dense("pooler", pre + "pooler.dense", (d, d), 1, init=True)
    out += _dense("mlm/transform", "cls.predictions.transform.dense", (d, d), 1, init=True)
    out += _norm("mlm/transform_norm", "cls.predictions.transform.LayerNorm", d, init=True)
    if model["tie_embeddings"]:
        out.append(_rule("mlm/bias", BIAS, (v,), init="zeros"))
    else:
        # Untied, transformers 5 keeps the decoder's own bias (the one its forward adds) apart
        # from cls.predictions.bias; transformers 4 links the two. Export writes both.
        if state is None:
            out.append(_rule("mlm/bias", BIAS, (v,)))
        out.append(
            _rule("mlm/bias", DECODER_BIAS if state is None or DECODER_BIAS in state else BIAS, (v,), init="zeros")
        )
        out.append(_rule("mlm/decoder/kernel", DECODER, (d, v), 1))
    out += _dense("nsp", "cls.seq_relationship", (d, 2), 1, init=True)
    return out


def _dense(path: str, key: str, shape: tuple[int, ...], in_axes: int, *, init: bool = False) -> list[tuple]:
    kernel = _rule(f"{path}/kernel", f"{key}.weight", shape, in_axes, init="normal" if init else "")
    bias = _rule(f"{path}/bias", f"{key}.bias", shape[in_axes:], -1, init="zeros" if init else "")
    return [kernel, bias]


def _norm(path: str, key: str, d: int, *, init: bool = False) -> list[tuple]:
    return [
        _rule(f"{path}/scale", f"{key}.weight", (d,), init="ones" if init else ""),
        _rule(f"{path}/bias", f"{key}.bias", (d,), init="zeros" if init else ""),
    ]


def aliases(model: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None) -> dict[str, str]:
    """Keys a checkpoint may also hold as copies of another tensor (tied weights): key -> the original."""
    if not model["tie_embeddings"]:
        return {}
    return {DECODER: _prefix(state) + "embeddings.word_embeddings.weight", DECODER_BIAS: BIAS}


def ignored(key: str) -> bool:
    """Whether ``key``, if no rule reads it, carries nothing the model uses.

    Buffers, and ``cls.predictions.bias`` beside an untied decoder's own bias (transformers 5).
    """
    return key.endswith(IGNORED) or key == BIAS


def hf_config(model: Mapping[str, Any], special_ids: Mapping[str, int | None]) -> dict[str, Any]:
    """A ``BertForPreTraining`` ``config.json`` for jaxlm ``config.model`` fields (``vocab_size`` resolved)."""
    needs = {"position": "learned", "norm": "layernorm", "pre_norm": False, "use_bias": True}
    for name, want in needs.items():
        if model.get(name) != want:
            raise DataError(f"config.model.{name}={model.get(name)!r} has no BERT equivalent; BERT needs {want!r}")
    if model.get("activation") not in _EXPORT_ACTIVATIONS:
        raise DataError(
            f"config.model.activation={model.get('activation')!r} has no BERT equivalent; "
            f"exportable: {', '.join(_EXPORT_ACTIVATIONS)}"
        )
    if model.get("num_kv_heads") not in (0, model["num_heads"]):
        raise DataError("config.model.num_kv_heads (grouped-query attention) has no BERT equivalent")
    if not model.get("type_vocab_size"):
        raise DataError("config.model.type_vocab_size=0 has no BERT equivalent; BERT has token-type embeddings")
    rate = float(model.get("dropout_rate", 0.0))
    out: dict[str, Any] = {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        "vocab_size": model["vocab_size"],
        "hidden_size": model["embed_dim"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_heads"],
        "intermediate_size": model["mlp_dim"],
        "hidden_act": _EXPORT_ACTIVATIONS[model["activation"]],
        "max_position_embeddings": model["max_len"],
        "type_vocab_size": model["type_vocab_size"],
        "layer_norm_eps": model["norm_eps"],
        "hidden_dropout_prob": rate,
        "attention_probs_dropout_prob": rate,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "pad_token_id": int(special_ids.get("pad") or 0),
    }
    return out
