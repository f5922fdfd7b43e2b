"""Transformer parts shared by the decoder-only, encoder-only and encoder-decoder models.

* :class:`TransformerBlock`: self-attention, optional cross-attention, MLP; each sublayer
  pre-norm (``x + f(norm(x))``, GPT-2 / T5) or post-norm (``norm(x + f(x))``, the original
  Transformer / BERT) after ``config.model.pre_norm``.
* :class:`BlockStack`: ``L`` blocks, unrolled (``layer_0`` ...) or ``nn.scan``-ned (``layers/block``
  with every parameter stacked on a leading ``LAYERS`` axis), each optionally rematerialized
  (``config.model.remat``). It computes the attention-logit position bias once (T5 relative
  bias: bidirectional in encoders, causal in decoders; or ALiBi) and passes it to every block.
* :class:`CachePositions`: query and key positions of self-attention, kept in the ``cache``
  collection during KV-cache decoding so that biases see the positions of the cached keys.
* :func:`add_positions`: absolute (learned / sinusoidal) position encodings added to embeddings.
* :func:`is_tiled`, :func:`layer_windows`, :func:`rope_scaling`: how ``config.model.attention``,
  ``attention_window`` and ``rope_scaling`` reach the attention modules.

Memory-linear attention (``config.model.attention`` in ``blockwise`` / ``ring``): models then
describe masks as ``jaxlm.nn.masks.TokenMask`` (segment ids, key padding) plus the ``causal``
flag, and the ALiBi / T5 bias as a ``jaxlm.nn.positions.PositionBias``; the attention evaluates
both per tile, so no ``[T, S]`` array exists in the forward or backward pass. The ``xla`` and
``dot_product`` paths build the dense ``[B, 1, T, S]`` masks and ``[., N, T, S]`` biases once per
stack, as before. Sliding windows (``attention_window``) are passed per layer; mixed windows
under ``scan_layers`` travel as a scanned array (a traced window).

How ``config.model.position`` acts (``jaxlm.nn.positions.POSITION_ENCODINGS``): ``learned`` and
``sinusoidal`` are added to the token embeddings (sinusoidal also multiplies the token
embeddings by ``sqrt(D)``, as Vaswani et al. 2017 sec. 3.4, so both terms have comparable
scale); ``rope`` rotates queries and keys of self-attention (never cross-attention); ``relative``
and ``alibi`` are biases on self-attention logits; ``none`` adds nothing.

Shapes: B batch, T length, S key length, N heads, D model dim.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import hardware
from jaxlm import logical_axes as ax
from jaxlm.config_lib import ModelConfig
from jaxlm.models import config as model_config
from jaxlm.nn.adapters import ADAPTER_SUBLAYERS, BottleneckAdapter
from jaxlm.nn.attention import TILED, MultiHeadAttention
from jaxlm.nn.barrier import materialize_grad
from jaxlm.nn.dropout import Dropout
from jaxlm.nn.embeddings import LearnedPositions, SinusoidalPositions, positions_like
from jaxlm.nn.linears import Mlp, residual_init_std
from jaxlm.nn.normalization import make_norm
from jaxlm.nn.positions import RelativePositionBias, RopeScaling, alibi, alibi_bias

ACT = (ax.ACT_BATCH, ax.ACT_LENGTH, ax.ACT_EMBED)

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def uses_grad_barrier(cfg: ModelConfig) -> bool:
    """Whether blocks pass the residual-stream gradient through :func:`materialize_grad`.

    ``auto`` is on for the CPU backend only, where the recomputation it prevents was measured (see
    :mod:`jaxlm.nn.barrier`).
    """
    return hardware.cpu_auto(cfg.grad_barrier, "grad_barrier")


def is_tiled(cfg: ModelConfig) -> bool:
    """Whether the attention is memory-linear: masks and biases then stay in vector form."""
    return cfg.attention in TILED


def layer_windows(cfg: ModelConfig, num_layers: int) -> tuple[int, ...]:
    """Sliding window of each layer: ``cfg.attention_window`` cycled over the layers (0 = full)."""
    windows = cfg.attention_window if isinstance(cfg.attention_window, (tuple, list)) else (cfg.attention_window,)
    windows = tuple(windows) or (0,)
    return tuple(int(windows[i % len(windows)]) for i in range(num_layers))


def rope_scaling(cfg: ModelConfig) -> RopeScaling | None:
    """The RoPE context-extension method of ``cfg`` (None: plain RoPE, or ``rope_scale``'s linear interpolation)."""
    if cfg.rope_scaling == "none":
        return None
    return RopeScaling(
        method=cfg.rope_scaling,
        factor=cfg.rope_scaling_factor,
        original_max_len=cfg.rope_original_max_len or cfg.max_len,
        beta_fast=cfg.rope_yarn_beta_fast,
        beta_slow=cfg.rope_yarn_beta_slow,
        attention_factor=cfg.rope_yarn_attention_factor,
        low_freq_factor=cfg.rope_llama3_low_freq_factor,
        high_freq_factor=cfg.rope_llama3_high_freq_factor,
    )


def dtypes(cfg: ModelConfig) -> tuple[Any, Any]:
    """``(compute dtype, parameter dtype)`` of ``cfg``."""
    return model_config.dtype(cfg.dtype), model_config.dtype(cfg.param_dtype)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
    """The configured norm (``cfg.norm`` with ``cfg.norm_eps``) as a submodule called ``name``."""
    dt, pdt = dtypes(cfg)
    return make_norm(cfg.norm, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pdt, name=name)


def add_positions(cfg: ModelConfig, x: jnp.ndarray, positions: jnp.ndarray, *, name: str = "pos_embed") -> jnp.ndarray:
    """Add the absolute position encoding of ``cfg.position`` to token embeddings ``x [B, T, D]``.

    Call from inside a compact method: the learned table becomes a submodule ``name`` of it.
    Positions that act inside attention (rope, relative, alibi) and ``none`` return ``x``.
    """
    dt, pdt = dtypes(cfg)
    if cfg.position == "learned":
        return x + LearnedPositions(cfg.max_len, cfg.embed_dim, dtype=dt, param_dtype=pdt, name=name)(positions)
    if cfg.position == "sinusoidal":
        scale = jnp.asarray(math.sqrt(cfg.embed_dim), dt)
        return x * scale + SinusoidalPositions(cfg.max_len, cfg.embed_dim, dtype=dt)(positions)
    return x


class CachePositions(nn.Module):
    """Positions of self-attention queries and keys, tracking the KV cache in decode mode.

    Without ``decode`` both are ``positions`` (default ``0..T-1``). With ``decode`` the ``cache``
    collection holds ``index`` (tokens cached so far) and ``key_positions [B, S_max]`` (the
    position of the token in each cache slot; ``MultiHeadAttention`` fills slots in the same
    order), queries default to ``index .. index+T-1``, and the keys are all ``S_max`` slots
    (unfilled ones are masked by the attention's cache mask). As in ``MultiHeadAttention``, the
    init call with ``decode=True`` only sizes the cache by its input length.
    """

    @nn.compact
    def __call__(
        self, like: jnp.ndarray, positions: jnp.ndarray | None, *, decode: bool
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``like`` is any ``[B, T, ...]`` array; returns ``(q_positions [B, T], k_positions [B, S])``."""
        b, t = like.shape[0], like.shape[1]
        if not decode:
            q = positions_like(like[..., 0] if like.ndim > 2 else like) if positions is None else positions
            return q, q
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + index.value, (b, t))
        positions = jnp.broadcast_to(positions, (b, t)).astype(jnp.int32)
        keys = self.variable("cache", "key_positions", jnp.zeros, (b, t), jnp.int32)
        if not initialized:
            return positions, positions
        keys.value = jax.lax.dynamic_update_slice(keys.value, positions, (0, index.value))
        index.value = index.value + t
        return positions, keys.value


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention and MLP sublayers, pre- or post-norm.

    Parameter names: ``attn_norm``, ``attn/{query,key,value,out}``, (``cross_attn_norm``,
    ``cross_attn/...``), ``mlp_norm``, ``mlp/{wi | wi_0, wi_1, wo}``. In a post-norm block
    ``attn_norm`` is the norm after the attention residual (BERT's ``attention.output.LayerNorm``).

    Lightweight fine-tuning modules (``config.peft``, through ``cfg``'s derived fields): bottleneck
    adapters ``adapter_attn/{down,up}`` and ``adapter_mlp/{down,up}`` (``adapter_dim`` > 0; Houlsby:
    after self-attention and the MLP, Pfeiffer: after the MLP only) act on a sublayer's output
    after its dropout, before the residual (and, post-norm, before the norm), as the ``adapters``
    library places them; ``prefix_tokens`` > 0 gives self-attention learned ``attn/prefix/{key, value}``.

    Attributes:
      cfg: the model config.
      num_layers: depth of the stack, for GPT-2's scaled init of the residual projections.
      cross_attention: add a cross-attention sublayer over ``encoded`` (encoder-decoder).
      causal: pass ``causal=True`` to self-attention (memory-linear decoders, whose mask holds
        no causal part).
      window: this layer's sliding window (0 = full).
      return_weights: sow the attention weights into ``intermediates`` (see ``MultiHeadAttention``).
    """

    cfg: ModelConfig
    num_layers: int
    cross_attention: bool = False
    causal: bool = False
    window: int = 0
    return_weights: bool = False

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None,
        bias: jnp.ndarray | None,
        positions: jnp.ndarray | None,
        encoded: jnp.ndarray | None,
        cross_mask: jnp.ndarray | None,
        deterministic: bool,
        decode: bool,
        window: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """``[B, T, D] -> [B, T, D]``.

        Args:
          x: the residual stream.
          mask: self-attention mask, broadcastable to ``[B, N, T, S]``.
          bias: self-attention logits bias (relative / ALiBi), shared by all layers.
          positions: ``[B, T]`` positions for RoPE (None when RoPE is off).
          encoded: ``[B, S, D]`` encoder output for cross-attention.
          cross_mask: cross-attention mask, broadcastable to ``[B, N, T, S]``.
          deterministic: disables dropout.
          decode: use and extend the self-attention key/value cache.
          window: a traced sliding window overriding ``self.window`` (scanned mixed layers).
        """
        cfg = self.cfg
        dt, pdt = dtypes(cfg)
        window = self.window if window is None else window
        out_std = residual_init_std(self.num_layers)
        rope = cfg.position == "rope"
        barrier = uses_grad_barrier(cfg)
        attention = dict(
            num_heads=cfg.num_heads,
            num_kv_heads=model_config.kv_heads(cfg),
            head_dim=cfg.head_dim,
            dropout_rate=cfg.dropout_rate,
            implementation=cfg.attention,
            use_bias=cfg.use_bias,
            out_init_std=out_std,
            dtype=dt,
            param_dtype=pdt,
            fuse_projections=hardware.cpu_auto(cfg.fuse_qkv, "fuse_qkv"),
        )

        adapted = ADAPTER_SUBLAYERS[cfg.adapter_kind] if cfg.adapter_dim else ()

        def sublayer(x: jnp.ndarray, name: str, fn: Any) -> jnp.ndarray:
            if barrier:
                x = materialize_grad(x)
            if cfg.pre_norm:
                h = fn(norm(cfg, f"{name}_norm")(x))
                return x + adapter(name, Dropout(cfg.dropout_rate)(h, deterministic=deterministic))
            h = Dropout(cfg.dropout_rate)(fn(x), deterministic=deterministic)
            return norm(cfg, f"{name}_norm")(x + adapter(name, h))

        def adapter(name: str, h: jnp.ndarray) -> jnp.ndarray:
            # Bottleneck adapters (config.peft.method=adapter) on the sublayer's output, before the residual.
            if name not in adapted:
                return h
            module = BottleneckAdapter(cfg.adapter_dim, cfg.adapter_kind, dt, pdt, name=f"adapter_{name}")
            return module(h)

        x = nn.with_logical_constraint(x, ACT)
        self_attn = MultiHeadAttention(
            rope_max_wavelength=cfg.rope_max_wavelength if rope else None,
            rope_scale=cfg.rope_scale,
            rope_scaling=rope_scaling(cfg) if rope else None,
            prefix_tokens=cfg.prefix_tokens,
            name="attn",
            **attention,
        )
        x = sublayer(
            x,
            "attn",
            lambda h: self_attn(
                h,
                mask=mask,
                bias=bias,
                deterministic=deterministic,
                decode=decode,
                positions=positions if rope else None,
                causal=self.causal,
                window=window,
                return_weights=self.return_weights,
            ),
        )
        if self.cross_attention:
            cross_attn = MultiHeadAttention(name="cross_attn", **attention)
            x = sublayer(
                x,
                "cross_attn",
                lambda h: cross_attn(
                    h, encoded, mask=cross_mask, deterministic=deterministic, return_weights=self.return_weights
                ),
            )
        mlp = Mlp(
            cfg.mlp_dim,
            cfg.activation,
            cfg.dropout_rate,
            use_bias=cfg.use_bias,
            out_init_std=out_std,
            dtype=dt,
            param_dtype=pdt,
            name="mlp",
        )
        x = sublayer(x, "mlp", lambda h: mlp(h, deterministic=deterministic))
        return nn.with_logical_constraint(x, ACT)


class _ScanBody(nn.Module):
    """Adapts a block to ``nn.scan``'s ``(carry, x) -> (carry, y)`` signature."""

    cfg: ModelConfig
    num_layers: int
    cross_attention: bool
    causal: bool
    window: int
    return_weights: bool = False

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        window: Any,
        mask: Any,
        bias: Any,
        positions: Any,
        encoded: Any,
        cross_mask: Any,
        deterministic: bool,
        decode: bool,
    ) -> tuple[jnp.ndarray, None]:
        block = TransformerBlock(
            self.cfg,
            self.num_layers,
            self.cross_attention,
            self.causal,
            self.window,
            return_weights=self.return_weights,
            name="block",
        )
        return block(x, mask, bias, positions, encoded, cross_mask, deterministic, decode, window), None


class BlockStack(nn.Module):
    """``num_layers`` Transformer blocks, unrolled (``layer_0`` ...) or scanned (``layers/block``).

    Attributes:
      cfg: the model config (``scan_layers``, ``remat``, ``position`` ...).
      num_layers: number of blocks.
      causal: a decoder stack: the T5 bias is unidirectional (``bidirectional=False``).
      cross_attention: blocks attend to an encoder output.
      return_weights: every attention sows its weights into ``intermediates`` (attention maps);
        off, the computation is unchanged.

    The position bias module (``position='relative'``) is ``relative_bias`` in this stack.
    """

    cfg: ModelConfig
    num_layers: int
    causal: bool = True
    cross_attention: bool = False
    return_weights: bool = False

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        *,
        positions: jnp.ndarray,
        key_positions: jnp.ndarray | None = None,
        mask: jnp.ndarray | None,
        encoded: jnp.ndarray | None = None,
        cross_mask: jnp.ndarray | None = None,
        deterministic: bool,
        decode: bool = False,
    ) -> jnp.ndarray:
        """``[B, T, D] -> [B, T, D]``.

        Args:
          x: embedded inputs.
          positions: ``[B, T]`` query positions (RoPE, relative bias, ALiBi).
          key_positions: ``[B, S]`` self-attention key positions (the cache's in decode mode;
            default ``positions``).
          mask: self-attention mask (causal / padding / segments), broadcastable to ``[B, N, T, S]``.
          encoded: ``[B, S, D]`` encoder output (cross-attention stacks).
          cross_mask: cross-attention mask.
          deterministic: disables dropout.
          decode: use and extend the key/value caches.
        """
        cfg = self.cfg
        key_positions = positions if key_positions is None else key_positions
        # Memory-linear attention (and the attention caches, which know their keys) take the bias
        # unevaluated; the dense paths get it evaluated once for all layers.
        vector_bias = is_tiled(cfg) or decode
        bias = None
        if cfg.position == "relative":
            bias = RelativePositionBias(
                cfg.num_heads,
                num_buckets=cfg.relative_buckets,
                max_distance=cfg.relative_max_distance,
                bidirectional=not self.causal,
                dtype=jnp.float32,
                param_dtype=dtypes(cfg)[1],
                tiled=vector_bias,
                name="relative_bias",
            )(positions, key_positions)
        elif cfg.position == "alibi":
            alibi_fn = alibi if vector_bias else alibi_bias
            bias = alibi_fn(positions, key_positions, cfg.num_heads)
        rope_positions = positions if cfg.position == "rope" else None
        windows = layer_windows(cfg, self.num_layers)
        causal_flag = self.causal and is_tiled(cfg)
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {cfg.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
        policy = REMAT_POLICIES[cfg.remat]
        args = (mask, bias, rope_positions, encoded, cross_mask)
        if cfg.scan_layers:
            body: Any = _ScanBody
            if cfg.remat != "none":
                body = nn.remat(body, policy=policy, prevent_cse=False, static_argnums=(8, 9))
            mixed = len(set(windows)) > 1  # one traced window per layer; else one static window for all
            scanned = nn.scan(
                body,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0 if mixed else nn.broadcast,) + (nn.broadcast,) * 7,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: ax.LAYERS},
            )
            static_window = 0 if mixed else windows[0]
            xs = jnp.asarray(windows, jnp.int32) if mixed else None
            stack = scanned(
                cfg,
                self.num_layers,
                self.cross_attention,
                causal_flag,
                static_window,
                return_weights=self.return_weights,
                name="layers",
            )
            x, _ = stack(x, xs, *args, deterministic, decode)
            return x
        block: Any = TransformerBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=policy, prevent_cse=True, static_argnums=(7, 8))
        for i in range(self.num_layers):
            layer = block(
                cfg,
                self.num_layers,
                self.cross_attention,
                causal_flag,
                windows[i],
                return_weights=self.return_weights,
                name=f"layer_{i}",
            )
            x = layer(x, *args, deterministic, decode)
        return x
