"""``jaxlm attention --workdir DIR --text "..." --out DIR2``: attention maps of a trained model.

One forward pass over the tokens of ``--text`` with ``return_attention_weights=True`` (the
models sow every attention layer's ``[B, N, T, S]`` weights into ``intermediates``), then, in
``DIR2``:

* one PNG heatmap per stack, layer and head, ``{stack}_l{layer}_h{head}.png``: queries down,
  keys across, each axis labelled with its tokens. Stacks: ``self`` (decoder-only and
  encoder-only models); ``encoder``, ``decoder`` and ``cross`` (the decoder's attention to the
  encoder output) for encoder-decoder models;
* ``index.html``: the heatmaps in a grid, a row per layer and a column per head;
* ``attention_stats.json``: per map, the attention entropy (nats, the mean over query rows of
  ``-sum_s p log p``) and the mean attention distance (the mean over query rows of
  ``sum_s p |t - s|``, in tokens; None for cross-attention, whose positions are in different
  sequences), plus the tokens of each axis.

For an encoder-decoder model the text is the encoder input; the decoder reads ``--target``
(teacher-forced), or else its own greedy continuation (up to ``--max_new_tokens``, stopping
at EOS). The maps are computed with the reference (``xla``) attention whatever
``config.model.attention`` says: the other implementations never form the weights, and the
parameters are the same.

Shapes: N heads, T query length, S key length.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import decoding
from jaxlm.common_types import UserError
from jaxlm.config_lib import Config
from jaxlm.main import generate, restore

STATS_FILE = "attention_stats.json"
INDEX_FILE = "index.html"
KINDS = ("decoder_only", "encoder_only", "encoder_decoder")


def run(
    config: Config, workdir: str, text: str, out: str, *, target: str | None = None, max_new_tokens: int = 32
) -> dict:
    """Write the maps of ``text`` into ``out``; returns the statistics written to ``attention_stats.json``."""
    if not text:
        raise UserError('--text is empty; give the text whose attention to show, e.g. --text "the cat sat"')
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; give a directory for the heatmaps and index.html")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("jaxlm attention needs matplotlib; pip install 'jaxlm[plot]'") from None
    exp, params, tokenizer, step = restore.open_trained(config, workdir)
    cfg = exp.model_cfg
    if cfg.kind not in KINDS:
        raise UserError(
            f"config.model.kind={cfg.kind!r} has no attention to show; jaxlm attention reads: {', '.join(KINDS)}"
        )
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if len(ids) > cfg.max_len:
        raise UserError(
            f"--text is {len(ids)} tokens, longer than the model's max_len={cfg.max_len}; shorten it to at most "
            f"{cfg.max_len} tokens"
        )
    if len(ids) == 0:
        raise UserError("--text encodes to no tokens; give some text")
    model = exp.model.clone(cfg=dataclasses.replace(exp.model.cfg, attention="xla"))
    params = jax.device_get(params)
    tokens = jnp.asarray(ids[None, :])

    def labels(row: np.ndarray) -> list[str]:
        return [repr(tokenizer.decode(np.asarray([t])))[1:-1] for t in row]

    if cfg.kind == "encoder_decoder":
        targets_in = _decoder_inputs(model, params, tokenizer, tokens, target, max_new_tokens, cfg.max_len)
        _, state = jax.jit(
            lambda p, x, y: model.apply({"params": p}, x, y, return_attention_weights=True, mutable=["intermediates"])
        )(params, tokens, targets_in)
        found = state["intermediates"]
        enc, dec = labels(ids), ["<start>", *labels(np.asarray(targets_in)[0, 1:])]
        stacks = [
            ("encoder", _layers(found["encoder"]["blocks"], "attn"), enc, enc),
            ("decoder", _layers(found["decoder"]["blocks"], "attn"), dec, dec),
            ("cross", _layers(found["decoder"]["blocks"], "cross_attn"), dec, enc),
        ]
    else:
        _, state = jax.jit(
            lambda p, x: model.apply({"params": p}, x, return_attention_weights=True, mutable=["intermediates"])
        )(params, tokens)
        words = labels(ids)
        stacks = [("self", _layers(state["intermediates"]["blocks"], "attn"), words, words)]

    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created ({e.strerror or e}); pick another directory") from None
    stats: dict[str, Any] = {"workdir": os.path.abspath(workdir), "step": int(step), "text": text, "stacks": {}}
    for name, layers, queries, keys in stacks:
        maps = []
        for layer, weights in enumerate(layers):
            for head, w in enumerate(weights):
                file = f"{name}_l{layer:02d}_h{head:02d}.png"
                _heatmap(Figure, w, queries, keys, f"{name} layer {layer} head {head}", os.path.join(out, file))
                maps.append(
                    {
                        "layer": layer,
                        "head": head,
                        "entropy": attention_entropy(w),
                        "mean_distance": None if name == "cross" else mean_distance(w),
                        "file": file,
                    }
                )
        stats["stacks"][name] = {"queries": queries, "keys": keys, "maps": maps}
    with open(os.path.join(out, STATS_FILE), "w") as f:
        json.dump(stats, f, indent=1)
    with open(os.path.join(out, INDEX_FILE), "w") as f:
        f.write(_index_html(stats))
    return stats


def _decoder_inputs(
    model: Any, params: Any, tokenizer: Any, inputs: jax.Array, target: str | None, max_new_tokens: int, max_len: int
) -> jax.Array:
    """``[1, T]`` decoder inputs: the start id (0), then ``target``'s tokens or a greedy continuation."""
    if target:
        ids = np.asarray(tokenizer.encode(target), np.int32)
        if 1 + len(ids) > max_len:
            raise UserError(f"--target is {len(ids)} tokens; the decoder reads at most max_len - 1 = {max_len - 1}")
        return jnp.asarray(np.concatenate([[0], ids])[None, :], jnp.int32)
    n = max(1, min(max_new_tokens, max_len - 1))
    cache = generate.init_cache(model, 1, max_len, inputs)
    start = jnp.zeros((1, 1), jnp.int32)

    # One program: run op by op, the encoder alone compiled ~70 one-op programs (seconds on a CPU).
    @jax.jit
    def greedy(params: Any, cache: Any, inputs: jax.Array) -> jax.Array:
        encoded = model.apply({"params": params}, inputs, method="encode")
        step = generate.make_seq2seq_step_fn(model, params, encoded, inputs)
        return decoding.generate(
            step, cache, start, jax.random.key(0), max_new_tokens=n, temperature=0.0, eos_id=tokenizer.eos_id
        )

    new = np.asarray(greedy(params, cache, inputs))[0]
    eos = np.flatnonzero(new == tokenizer.eos_id)
    new = new[: eos[0] + 1] if len(eos) else new
    return jnp.asarray(np.concatenate([[0], new])[None, :], jnp.int32)


def _layers(blocks: dict, module: str) -> list[np.ndarray]:
    """Per layer, the ``[N, T, S]`` weights sown by ``module`` (``attn`` / ``cross_attn``) of batch row 0.

    Unrolled stacks hold ``layer_i/{module}/attention_weights``; scanned ones one array with a
    leading layer axis under ``layers/block/{module}``.
    """
    if "layers" in blocks:
        (stacked,) = blocks["layers"]["block"][module]["attention_weights"]
        return [np.asarray(w[0], np.float32) for w in stacked]
    names = sorted((k for k in blocks if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    return [np.asarray(blocks[k][module]["attention_weights"][0][0], np.float32) for k in names]


def attention_entropy(weights: np.ndarray) -> float:
    """Mean over query rows of ``-sum_s p log p`` (nats) of ``[T, S]`` weights; rows attending nowhere are skipped."""
    rows = weights[weights.sum(-1) > 0]
    if len(rows) == 0:
        return 0.0
    p = np.clip(rows, 1e-30, None)
    return float(np.mean(-np.sum(rows * np.log(p), axis=-1)))


def mean_distance(weights: np.ndarray) -> float:
    """Mean over query rows of ``sum_s p(t, s) |t - s|`` (tokens) for ``[T, S]`` self-attention weights."""
    t, s = weights.shape
    distance = np.abs(np.arange(t)[:, None] - np.arange(s)[None, :])
    rows = weights.sum(-1) > 0
    if not rows.any():
        return 0.0
    return float(np.mean(np.sum(weights * distance, axis=-1)[rows]))


def _heatmap(figure_cls: Any, weights: np.ndarray, queries: list[str], keys: list[str], title: str, path: str) -> None:
    """One ``[T, S]`` map: keys across, queries down, each tick labelled with its token."""
    t, s = weights.shape
    width = min(40.0, max(4.0, 0.22 * s + 2.0))
    height = min(40.0, max(3.5, 0.22 * t + 1.5))
    fig = figure_cls(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6), aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.04)
    ax.set_xticks(range(s), keys, rotation=90, fontsize=7)
    ax.set_yticks(range(t), queries, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.savefig(path, dpi=80)


def _index_html(stats: dict) -> str:
    """A page with every heatmap: per stack, a table with a row per layer and a column per head."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>attention maps</title>",
        "<style>body{font-family:sans-serif} td{text-align:center;vertical-align:top;font-size:12px}"
        " img{width:260px}</style></head><body>",
        f"<h1>Attention maps</h1><p>{html.escape(stats['workdir'])}, step {stats['step']}: "
        f"<code>{html.escape(stats['text'])}</code></p>",
    ]
    for name, stack in stats["stacks"].items():
        maps = stack["maps"]
        heads = 1 + max(m["head"] for m in maps)
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr><th></th>")
        parts.extend(f"<th>head {h}</th>" for h in range(heads))
        parts.append("</tr>")
        for layer in range(1 + max(m["layer"] for m in maps)):
            parts.append(f"<tr><th>layer {layer}</th>")
            for m in (m for m in maps if m["layer"] == layer):
                dist = "" if m["mean_distance"] is None else f", distance {m['mean_distance']:.2f}"
                parts.append(
                    f"<td><a href='{m['file']}'><img src='{m['file']}' alt='{m['file']}'></a>"
                    f"<br>entropy {m['entropy']:.2f}{dist}</td>"
                )
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
