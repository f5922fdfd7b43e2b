"""Recurrent (LSTM / GRU) language models: the baselines of Zaremba et al. (2014).

Token embedding ``[V, D]`` (``config.model.embed_dim``), ``config.model.num_layers``
recurrent layers of hidden size ``H = config.model.mlp_dim`` (``config.model.rnn_cell``:
``lstm`` or ``gru``), dropout (``dropout_rate``) on the input of every layer and on the output
of the last one (never on the recurrent connections), and an output projection to the
vocabulary. The projection is the tied token embedding when ``tie_embeddings`` and ``H == D``;
otherwise (sizes differ, or untied) it is its own ``lm_head`` ``[H, V]`` (+ bias with ``use_bias``).

The call signature is the decoder-only one, so the causal-LM train step, evaluation and
``jaxlm.decoding.generate`` work unchanged: ``positions`` is accepted and ignored (recurrence
needs none); ``segment_ids`` (packed documents) reset the state where the segment id changes;
``decode=True`` starts from the state in the ``cache`` collection (``layer_i/h``, and ``c``
for LSTMs, ``[B, H]`` float32) and stores the state after the last token, so a prompt can be
pre-filled in one call and extended a token at a time. The init call with ``decode=True``
only creates the (zero) state.

The cells follow PyTorch's ``nn.LSTM`` / ``nn.GRU`` exactly (gate order i, f, g, o and r, z, n;
input and recurrent biases; the GRU's reset gate applied to ``W_hn h + b_hn``), so weights map
as ``layer_i/kernel = weight_ih_l{i}.T``, ``recurrent_kernel = weight_hh_l{i}.T``,
``bias = bias_ih_l{i}``, ``recurrent_bias = bias_hh_l{i}``. Kernels are initialized
``U(-1/sqrt(H), 1/sqrt(H))`` like PyTorch's; biases start at zero. The input projection of all
T steps is one matmul outside the time loop; the loop (``lax.scan``) does only ``h W_h``.

``scan_layers`` keeps ``layer_0`` (input size D) and stacks layers ``1 .. L-1`` (input size H)
as ``layers/...`` on a leading ``LAYERS`` axis; ``remat`` rematerializes each layer.

Parameter tree: ``token_embed/embedding [V, D]``, ``layer_i/{kernel [D|H, G*H],
recurrent_kernel [H, G*H], bias [G*H], recurrent_bias [G*H]}`` (G = 4 LSTM, 3 GRU; biases
with ``use_bias``), ``lm_head/{kernel [H, V], bias [V]}`` unless tied.

Shapes: B batch, T length, D embedding dim, H hidden size, G gates, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models import vocab
from jaxlm.models.transformer import REMAT_POLICIES, dtypes
from jaxlm.nn import matmul
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.embeddings import Embed
from jaxlm.nn.linears import DenseGeneral

# ``config.model.rnn_cell`` -> (gates G, state names).
CELLS: dict[str, tuple[int, tuple[str, ...]]] = {"lstm": (4, ("h", "c")), "gru": (3, ("h",))}

ACT = (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_EMBED)


def _cell(name: str) -> tuple[int, tuple[str, ...]]:
    if name not in CELLS:
        raise ValueError(f"unknown rnn_cell {name!r}; valid: {', '.join(CELLS)}")
    return CELLS[name]


def _lstm_step(state: tuple, gates: jnp.ndarray) -> tuple:
    """One LSTM update from pre-activations ``[B, 4H]`` (input and recurrent parts summed)."""
    _, c = state
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def segment_resets(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """``[B, T]`` True where a new packed segment starts (the state is zeroed before that token)."""
    previous = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    return segment_ids != previous


class RecurrentLayer(nn.Module):
    """Dropout on the input, then one LSTM or GRU layer over time: ``[B, T, D] -> [B, T, H]``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, resets: jnp.ndarray | None, deterministic: bool, decode: bool) -> jnp.ndarray:
        """Run the layer; ``resets [B, T]`` zero the state before the marked tokens."""
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        gates, state_names = _cell(cfg.rnn_cell)
        h_dim = cfg.mlp_dim
        b, t, d_in = x.shape
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        init = nn.initializers.uniform(scale=2.0 / h_dim**0.5)

        def shifted(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jnp.ndarray:
            return init(key, shape, dtype) - jnp.asarray(1.0 / h_dim**0.5, dtype)  # U(-1/sqrt(H), 1/sqrt(H))

        def param(name: str, shape: tuple, axes: tuple, fn: Any) -> jnp.ndarray:
            return self.param(name, nn.with_logical_partitioning(fn, axes), shape, pdt)

        kernel = param("kernel", (d_in, gates * h_dim), (ax.EMBED, ax.MLP), shifted)
        recurrent_kernel = param("recurrent_kernel", (h_dim, gates * h_dim), (ax.EMBED, ax.MLP), shifted)
        xg = matmul.einsum("btd,dg->btg", x, kernel, dt)
        recurrent_bias = jnp.zeros((gates * h_dim,), jnp.float32)
        if cfg.use_bias:
            xg = xg + param("bias", (gates * h_dim,), (ax.MLP,), nn.initializers.zeros).astype(jnp.float32)
            recurrent_bias = param("recurrent_bias", (gates * h_dim,), (ax.MLP,), nn.initializers.zeros)
            recurrent_bias = recurrent_bias.astype(jnp.float32)
        wh = recurrent_kernel.astype(dt)

        def zeros() -> jnp.ndarray:
            return jnp.zeros((b, h_dim), jnp.float32)

        initialized = decode and self.has_variable("cache", "h")
        cache = {n: self.variable("cache", n, zeros) for n in state_names} if decode else {}
        state = tuple(cache[n].value for n in state_names) if decode else tuple(zeros() for _ in state_names)

        def step(state: tuple, inputs: tuple) -> tuple[tuple, jnp.ndarray]:
            xg_t, reset_t = inputs
            if reset_t is not None:
                state = tuple(jnp.where(reset_t[:, None], 0.0, s) for s in state)
            h = state[0]
            hg = jnp.dot(h.astype(dt), wh, preferred_element_type=jnp.float32) + recurrent_bias
            if cfg.rnn_cell == "lstm":
                state = _lstm_step(state, xg_t + hg)
            else:
                rx, zx, nx = jnp.split(xg_t, 3, axis=-1)
                rh, zh, nh = jnp.split(hg, 3, axis=-1)
                r, z = jax.nn.sigmoid(rx + rh), jax.nn.sigmoid(zx + zh)
                n = jnp.tanh(nx + r * nh)
                state = ((1.0 - z) * n + z * h,)
            return state, state[0]

        xs = (jnp.swapaxes(xg, 0, 1), None if resets is None else jnp.swapaxes(resets, 0, 1))
        state, hs = jax.lax.scan(step, state, xs)
        if initialized:
            for name, value in zip(state_names, state):
                cache[name].value = value
        y = jnp.swapaxes(hs, 0, 1).astype(dt)
        return nn.with_logical_constraint(y, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_MLP))


class _ScanBody(nn.Module):
    """Adapts a recurrent layer to ``nn.scan``'s ``(carry, x) -> (carry, y)`` signature."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, _: Any, resets: Any, deterministic: bool, decode: bool
    ) -> tuple[jnp.ndarray, None]:
        return RecurrentLayer(self.cfg, name="layer")(x, resets, deterministic, decode), None


class RnnLM(nn.Module):
    """LSTM / GRU language model with the decoder-only call signature."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        *,
        deterministic: bool = True,
        decode: bool = False,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """``[B, T] int -> [B, T, V]`` float32 logits.

        Args:
          tokens: token ids.
          deterministic: disables dropout.
          decode: continue from (and update) the recurrent state in the ``cache`` collection.
          positions: ignored (accepted so that LM steps and generation can pass it).
          segment_ids: packed-document ids; the state is reset where the id changes. Ignored
            when decoding.
        """
        del positions  # a recurrence needs no positions
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        embed = Embed(cfg.padded_vocab_size, cfg.embed_dim, dtype=dt, param_dtype=pdt, name="token_embed")
        x = nn.with_logical_constraint(embed(tokens), ACT)
        resets = segment_resets(segment_ids) if (segment_ids is not None and not decode) else None
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {cfg.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
        policy = REMAT_POLICIES[cfg.remat]
        layer: Any = RecurrentLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=policy, prevent_cse=True, static_argnums=(3, 4))
        x = layer(cfg, name="layer_0")(x, resets, deterministic, decode)
        if cfg.scan_layers and cfg.num_layers > 1:
            body: Any = _ScanBody
            if cfg.remat != "none":
                body = nn.remat(body, policy=policy, prevent_cse=False, static_argnums=(4, 5))
            scanned = nn.scan(
                body,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 4,
                length=cfg.num_layers - 1,
                metadata_params={nn.PARTITION_NAME: ax.LAYERS},
            )
            x, _ = scanned(cfg, name="layers")(x, None, resets, deterministic, decode)
        else:
            for i in range(1, cfg.num_layers):
                x = layer(cfg, name=f"layer_{i}")(x, resets, deterministic, decode)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if tied(cfg):
            logits = embed.attend(x)
        else:
            logits = DenseGeneral(
                (cfg.padded_vocab_size,),
                (ax.EMBED, ax.VOCAB),
                use_bias=cfg.use_bias,
                dtype=dt,
                param_dtype=pdt,
                name="lm_head",
            )(x).astype(jnp.float32)
        logits = vocab.real_logits(cfg, logits)  # padded ids never reach a softmax (jaxlm/models/vocab.py)
        return nn.with_logical_constraint(logits, (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_VOCAB))


def tied(cfg: ModelConfig) -> bool:
    """Whether the RNN's output projection is the token embedding (``tie_embeddings`` and ``H == D``)."""
    return cfg.tie_embeddings and cfg.mlp_dim == cfg.embed_dim
