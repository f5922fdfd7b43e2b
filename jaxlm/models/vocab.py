"""Vocabulary padding: the model's vocabulary arrays are wider than the tokenizer's vocabulary.

``config.model.vocab_size`` (``V``, filled from the tokenizer when 0) is the real vocabulary;
the token embedding ``[Vp, D]``, an untied LM head ``[D, Vp]`` and an MLM output bias ``[Vp]``
have ``Vp = ModelConfig.padded_vocab_size`` rows (``V`` rounded up to ``config.model.vocab_multiple``,
which also makes the mesh axes that shard the vocabulary divide it). Why: a vocabulary that a
``tensor`` mesh axis does not divide cannot be sharded (the byte tokenizer's 263 ids on
``tensor=2``), and a matmul whose output width is a multiple of the hardware's tile (128 on
GPU/TPU, the SIMD width on a CPU) runs faster.

How the padded rows stay harmless:

* they are never looked up: token ids are ``< V``;
* the LM head computes ``Vp`` logits and :func:`real_logits` slices them to the first ``V``
  before anything else sees them, so losses, perplexity, argmax metrics, sampling (top-k /
  top-p), beam search and every other consumer work on the real vocabulary only: a padded id
  can never be emitted and never takes probability mass;
* their gradient is therefore exactly zero. They are initialized like the rest of their table
  (one initializer call over ``[Vp, D]``); with a zero gradient AdamW's moments stay zero and its
  update is zero, and decoupled weight decay only shrinks them towards zero, so they never
  influence the model. Export (``jaxlm convert --to hf``) drops them; import pads with zeros.

Which parameter axes hold the vocabulary is read off their logical axis names (``vocab``), so
:func:`vocab_axes` and :func:`resize` work for every model kind without a per-kind table.

Shapes: B batch, T length, D model dim, V real vocab, Vp padded vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import logical_axes as ax
from jaxlm import param_paths
from jaxlm.config_lib import ModelConfig


def real_logits(cfg: ModelConfig, logits: jnp.ndarray) -> jnp.ndarray:
    """``[..., Vp] -> [..., V]``: the logits of real ids (a no-op when the vocabulary is unpadded)."""
    if logits.shape[-1] == cfg.vocab_size:
        return logits
    return logits[..., : cfg.vocab_size]


def vocab_axes(boxed_params: Any) -> dict[str, int]:
    """``{parameter path: axis}`` of every parameter with a ``vocab`` logical axis.

    ``boxed_params`` is a parameter tree whose leaves carry logical names (``nn.Partitioned``,
    as ``model.init`` or ``jax.eval_shape`` of it returns them).
    """
    out: dict[str, int] = {}
    boxed = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in boxed:
        names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else ()
        if ax.VOCAB in names:
            out[param_paths.path_str(path)] = names.index(ax.VOCAB)
    return out


def resize(params: Any, axes: dict[str, int], size: int) -> Any:
    """NumPy ``params`` with each vocabulary axis of ``axes`` cut or zero-padded to ``size`` rows.

    Cutting drops padded rows (export to a format that holds the real vocabulary); padding adds
    zero rows (import into a padded model). Other leaves pass through unchanged.
    """

    def fit(name: str, leaf: Any) -> Any:
        if name not in axes:
            return leaf
        a = np.asarray(leaf)
        axis = axes[name]
        have = a.shape[axis]
        if have == size:
            return a
        if have > size:
            return np.take(a, np.arange(size), axis=axis)
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, size - have)
        return np.pad(a, widths)

    return param_paths.map_with_path(fit, params)
