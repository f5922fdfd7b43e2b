"""Ring attention: sequence-parallel attention over the mesh axis that sequence length is sharded on.

Liu, Zaharia & Abbeel (2023), "Ring Attention with Blockwise Transformers". Queries, keys and
values are split along length over ``P`` devices (the mesh axes that the logical ``act_length``
axis maps to under the active ``nn.logical_axis_rules``; ``config.mesh.shape.sequence`` by
default). Inside ``jax.shard_map`` each device keeps its query chunk and, for ``P`` steps,
attends to the key/value chunk it holds with :func:`jaxlm.nn.blockwise.blockwise` (which also
returns the per-row log-sum-exp), merges the result into its running output by log-sum-exp
weights, and passes the key/value chunk (with the keys' mask vectors and positions) to the next
device with ``lax.ppermute``. No device ever holds more than one ``[T/P, S/P]`` tile set, and
causal / window / segment restrictions use global indices (the chunk offsets), so the result
equals full attention. The backward pass (a ``jax.custom_vjp``) goes around the ring once more:
each step recomputes the chunk's blockwise forward, takes its VJP with cotangents rescaled to the
merged output's log-sum-exp, adds the query gradient locally and sends the key/value gradients
along with the chunk, so the residuals per device are only its own q, k, v, output and
log-sum-exp (memory flat in the number of devices; one extra blockwise forward per chunk).

Masks must be in vector form (``masks.TokenMask``, or a dense key-padding mask
``[B|1, 1, 1, S]``) and biases a ``positions.PositionBias``: a dense ``[T, S]`` array would
defeat the point. Without a mesh, or when length is not sharded (one device on the axis), this
is plain blockwise attention. Causal load balancing (zig-zag chunk order) is not done: under a
causal mask the devices holding early chunks skip most tiles and wait for the others.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from jaxlm import logical_axes as ax
from jaxlm.common_types import ConfigError
from jaxlm.nn.blockwise import blockwise, zero_cotangents
from jaxlm.nn.masks import TokenMask
from jaxlm.nn.positions import PositionBias


def _axes(entry: Any) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def sequence_axes() -> tuple[Any, tuple[str, ...], PartitionSpec, PartitionSpec]:
    """``(mesh, length axes, spec of queries, spec of keys)`` from the active mesh and logical rules.

    The mesh is the one set with ``jax.set_mesh``; the rules those of ``nn.logical_axis_rules``.
    Returns an empty axes tuple when there is no mesh or length is not sharded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return mesh, (), PartitionSpec(), PartitionSpec()

    def spec(heads: str) -> PartitionSpec:
        logical = nn.logical_to_mesh_axes((ax.ACT_BATCH, ax.ACT_LENGTH, heads, ax.ACT_HEAD_DIM))
        return PartitionSpec(*(tuple(a for a in _axes(e) if a in mesh.shape) or None for e in logical))

    q_spec, k_spec = spec(ax.ACT_HEADS), spec(ax.ACT_KV_HEADS)
    length = tuple(a for a in _axes(q_spec[1]) if mesh.shape[a] > 1)
    # Keys are split along length the same way as queries, whatever act_kv_length says.
    k_spec = PartitionSpec(k_spec[0], q_spec[1], k_spec[2], None)
    return mesh, length, q_spec, k_spec


def _key_padding(mask: jnp.ndarray) -> TokenMask:
    """A dense ``[B|1, 1, 1, S]`` key-padding mask as a TokenMask; anything else is refused."""
    m = jnp.asarray(mask)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if m.shape[1] != 1 or m.shape[2] != 1:
        raise ValueError(
            f"ring attention takes masks in vector form (jaxlm.nn.masks.TokenMask) or key padding [B, 1, 1, S], "
            f"not a dense mask of shape {m.shape}"
        )
    return TokenMask(k_valid=m[:, 0, 0, :].astype(bool))


class _Static(NamedTuple):
    """The hashable (non-array) settings of one ring-attention call."""

    axes: tuple[str, ...]
    p: int
    rate: float
    causal: bool
    window: int | None  # None: traced, in the inputs as "window"
    block_q: int
    block_kv: int


def _travelling(a: dict[str, Any]) -> dict[str, Any]:
    """What goes around the ring: the key/value chunk and everything indexed by key."""
    kv = {"k": a["k"], "v": a["v"]}
    m, b = a.get("mask"), a.get("bias")
    if m is not None:
        kv["k_segments"], kv["k_valid"] = m.k_segments, m.k_valid
    if b is not None:
        kv["k_positions"] = b.k_positions
    return kv


def _chunk(a: dict[str, Any], kv: dict[str, Any], table: Any, src: jax.Array, st: _Static):
    """Blockwise attention of the local queries to the chunk of device ``src``: ``(out, lse)``."""
    me = lax.axis_index(st.axes)
    m, b = a.get("mask"), a.get("bias")
    rng = None
    if st.rate > 0.0:  # one keep-mask stream per (query chunk, key chunk): forward and backward agree
        rng = jax.random.fold_in(jax.random.fold_in(a["rng"], me), src)
    return blockwise(
        a["q"],
        kv["k"],
        kv["v"],
        mask=None if m is None else TokenMask(m.q_segments, kv.get("k_segments"), kv.get("k_valid")),
        bias=None if b is None else b.replace(table=table, k_positions=kv["k_positions"]),
        dropout_rate=st.rate,
        dropout_rng=rng,
        causal=st.causal,
        window=a["window"] if st.window is None else st.window,
        q_offset=me * a["q"].shape[1],
        k_offset=src * a["k"].shape[1],
        block_q=st.block_q,
        block_kv=st.block_kv,
        return_lse=True,
    )


def _rotate(tree: Any, st: _Static) -> Any:
    """Send every array to the next device on the ring."""
    perm = [(j, (j + 1) % st.p) for j in range(st.p)]
    return jax.tree.map(lambda x: lax.ppermute(x, st.axes, perm), tree)


def _ring_forward(a: dict[str, Any], st: _Static) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``P`` steps of blockwise attention merged by log-sum-exp: float32 ``out [B, T/P, N, H]`` and ``lse``.

    Rows that see nothing have lse = NEG (the most negative float32) and zero output in every chunk.
    """
    me = lax.axis_index(st.axes)
    table = None if a.get("bias") is None else a["bias"].table
    kv = _travelling(a)
    out = lse = None
    for step in range(st.p):
        o_i, l_i = _chunk(a, kv, table, (me - step) % st.p, st)
        if out is None:
            out, lse = o_i.astype(jnp.float32), l_i
        else:
            new = jnp.logaddexp(lse, l_i)
            out = out * jnp.exp(lse - new)[..., None] + o_i.astype(jnp.float32) * jnp.exp(l_i - new)[..., None]
            lse = new
        if step < st.p - 1:
            kv = _rotate(kv, st)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ring(a: dict[str, Any], st: _Static) -> jnp.ndarray:
    """Ring attention of one device's shard (inside ``shard_map``); a custom VJP keeps memory per device flat."""
    return _ring_forward(a, st)[0]


def _ring_fwd(a: dict[str, Any], st: _Static):
    out, lse = _ring_forward(a, st)
    return out, (a, out, lse)


def _ring_bwd(st: _Static, res, d_out):
    """The ring again: each chunk's gradients from a recomputed blockwise pass, dK/dV travelling with K/V.

    With ``w_i = exp(lse_i - lse)`` the weight of chunk i in the merged output, the chunk's own
    VJP with cotangents ``(w_i dO, w_i (rowsum(dO * o_i) - rowsum(dO * out)))`` gives exactly its
    share of the gradient (the probabilities it recomputes are relative to its own lse). The
    residuals are the local q, k, v, out and lse, whatever the number of devices.
    """
    a, out, lse = res
    me = lax.axis_index(st.axes)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)
    bias = a.get("bias")
    table = None if bias is None else bias.table
    kv = _travelling(a)
    grads = {"k": jnp.zeros(a["k"].shape, jnp.float32), "v": jnp.zeros(a["v"].shape, jnp.float32)}
    dq = jnp.zeros(a["q"].shape, jnp.float32)
    d_table = None if table is None else jnp.zeros(table.shape, jnp.float32)
    for step in range(st.p):
        src = (me - step) % st.p
        (o_i, l_i), pull = jax.vjp(
            lambda q, k, v, t, kv=kv, src=src: _chunk({**a, "q": q}, {**kv, "k": k, "v": v}, t, src, st),
            a["q"],
            kv["k"],
            kv["v"],
            table,
        )
        w = jnp.exp(l_i - lse)
        d_o = (w[..., None] * d_out).astype(o_i.dtype)
        d_l = w * (jnp.sum(d_out * o_i.astype(jnp.float32), axis=-1) - delta)
        g_q, g_k, g_v, g_t = pull((d_o, d_l))
        dq = dq + g_q.astype(jnp.float32)
        grads = {"k": grads["k"] + g_k.astype(jnp.float32), "v": grads["v"] + g_v.astype(jnp.float32)}
        if d_table is not None and bias.differentiable:
            d_table = d_table + g_t.astype(jnp.float32)
        if step < st.p - 1:
            kv, grads = _rotate((kv, grads), st)
    grads = _rotate(grads, st)  # home: device j holds the gradients of chunk j + 1 after the last step
    d_a = zero_cotangents(a)
    d_a["q"] = dq.astype(a["q"].dtype)
    d_a["k"], d_a["v"] = grads["k"].astype(a["k"].dtype), grads["v"].astype(a["v"].dtype)
    if bias is not None:
        table_ct = d_table.astype(table.dtype) if bias.differentiable else jnp.zeros_like(table)
        d_a["bias"] = d_a["bias"].replace(table=table_ct)
    return (d_a,)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    *,
    mask: jnp.ndarray | TokenMask | None = None,
    bias: PositionBias | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    causal: bool = False,
    window: int | jax.Array = 0,
    block_q: int = 512,
    block_kv: int = 512,
) -> jnp.ndarray:
    """Attention with length sharded over the mesh (same arguments as ``xla_attention``).

    ``return_weights=True`` needs the whole ``[B, N, T, S]`` matrix and runs
    ``jaxlm.nn.attention.xla_attention`` instead (imported lazily: that module imports this one).

    Raises:
      ConfigError: the length axis does not divide the query or key length.
    """
    if return_weights:
        from jaxlm.nn.attention import xla_attention

        return xla_attention(
            query,
            key,
            value,
            mask=mask,
            bias=bias,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            return_weights=True,
            causal=causal,
            window=window,
        )
    if bias is not None and not isinstance(bias, PositionBias):
        raise ValueError("ring attention takes its bias as a jaxlm.nn.positions.PositionBias, not a dense array")
    if mask is not None and not isinstance(mask, TokenMask):
        mask = _key_padding(mask)
    rate = 0.0 if deterministic else dropout_rate
    mesh, length_axes, spec, k_spec = sequence_axes()
    common = dict(causal=causal, window=window, block_q=block_q, block_kv=block_kv)
    if not length_axes:
        return blockwise(query, key, value, mask=mask, bias=bias, dropout_rate=rate, dropout_rng=dropout_rng, **common)
    p = math.prod(mesh.shape[a] for a in length_axes)
    t, s = query.shape[1], key.shape[1]
    if t % p or s % p:
        raise ConfigError(
            f"ring attention: the length {t if t % p else s} is not divisible by the {p} devices of mesh axis "
            f"{'x'.join(length_axes)}; make config.data.seq_len a multiple of {p} (or use fewer sequence devices)"
        )
    batch, length, heads = spec[0], spec[1], spec[2]
    seq = PartitionSpec(batch, length)
    seq1 = PartitionSpec(None, length)  # vectors broadcast over batch ([1, T])

    def vec_spec(x: jnp.ndarray) -> PartitionSpec:
        return seq if x.shape[0] != 1 else seq1

    qkv_spec = PartitionSpec(batch, length, heads, None)
    args: dict[str, Any] = {"q": query, "k": key, "v": value}
    specs: dict[str, Any] = {"q": qkv_spec, "k": k_spec, "v": k_spec}
    if mask is not None:
        args["mask"] = mask
        specs["mask"] = jax.tree.map(vec_spec, mask)
    if bias is not None:
        args["bias"] = bias
        table_spec = PartitionSpec(heads) if bias.table.ndim == 1 else PartitionSpec(None, heads)
        specs["bias"] = bias.replace(
            table=table_spec, q_positions=vec_spec(bias.q_positions), k_positions=vec_spec(bias.k_positions)
        )
    if rate > 0.0:
        args["rng"] = dropout_rng
        specs["rng"] = PartitionSpec()

    if not isinstance(window, int):
        args["window"], specs["window"] = jnp.asarray(window, jnp.int32), PartitionSpec()  # traced: an input
    static = _Static(
        tuple(length_axes), p, rate, causal, window if isinstance(window, int) else None, block_q, block_kv
    )

    def local(a: dict[str, Any]) -> jnp.ndarray:
        return _ring(a, static).astype(a["q"].dtype)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=qkv_spec, check_vma=False)
    return fn(args)
