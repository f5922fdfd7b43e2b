"""Device meshes and the shardings of state and batches, resolved from logical axis names.

Modules only name logical axes (``jaxlm.logical_axes``); this module turns those names into
``NamedSharding``s on a mesh with the axes ``data, fsdp, tensor, sequence`` using
``config.sharding.rules``.

A mesh has a per-slice shape (``config.mesh.shape``, devices joined by the fast ICI / NVLink
network) and an across-slice shape (``config.mesh.dcn_shape``, slices or hosts joined by the
slow data-center network). Each mesh axis is their product; the dcn factor is the outer, slow
part of the axis. One ``-1`` in ``config.mesh.shape`` is filled from the device count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import logical_axes
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import MeshConfig

Rules = tuple[tuple[str, tuple[str, ...] | None], ...]


def _fmt(shape: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Per-slice mesh sizes, with a ``-1`` filled so that all ``num_devices`` devices are used.

    Raises a ``ConfigError`` naming the sizes and the device count when they do not fit.
    """
    dcn = {axis: cfg.dcn_shape[axis] for axis in logical_axes.MESH_AXES}
    num_slices = math.prod(dcn.values())
    if num_devices % num_slices:
        raise ConfigError(
            f"config.mesh.dcn_shape {_fmt(dcn)} asks for {num_slices} slices, which does not divide the "
            f"{num_devices} devices; make its product divide the device count"
        )
    per_slice = num_devices // num_slices
    where = f"{num_devices} devices" if num_slices == 1 else f"{per_slice} devices per slice ({num_slices} slices)"
    shape = {axis: cfg.shape[axis] for axis in logical_axes.MESH_AXES}
    known = math.prod(v for v in shape.values() if v != -1)
    if -1 in shape.values():
        if per_slice % known:
            raise ConfigError(
                f"config.mesh.shape {_fmt(shape)}: the fixed sizes multiply to {known}, which does not divide "
                f"the {where}; change the fixed sizes"
            )
        return {k: (per_slice // known if v == -1 else v) for k, v in shape.items()}
    if known != per_slice:
        raise ConfigError(
            f"config.mesh.shape {_fmt(shape)} multiplies to {known} but there are {where}; "
            "set one axis to -1 or make the product match"
        )
    return shape


def _granules(devices: Sequence[Any], num_slices: int) -> str:
    """The device attribute whose values are the ``num_slices`` slices of a multi-slice mesh.

    TPU multi-slice devices carry ``slice_index``; elsewhere (GPU clusters) each process (host)
    is one unit of the slow network.
    """
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) == num_slices:
        return "slice_index"
    processes = {d.process_index for d in devices}
    if len(processes) == num_slices:
        return "process_index"
    found = f"{len(slices)} slice(s)" if None not in slices else "no slice indices"
    raise ConfigError(
        f"config.mesh.dcn_shape asks for {num_slices} slices but the {len(devices)} devices have {found} "
        f"and {len(processes)} process(es); set config.mesh.dcn_shape to the number of slices (or hosts), "
        "or to all 1s on a single slice"
    )


def device_grid(cfg: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
    """The devices arranged as a ``[data, fsdp, tensor, sequence]`` array for ``cfg``.

    Within a slice the order follows the physical topology (``mesh_utils.create_device_mesh``);
    with a dcn shape, each axis is ``dcn x ici`` with the slice index as its outer part, so
    collectives along an axis whose dcn factor is 1 never leave a slice.
    """
    from jax.experimental import mesh_utils

    devices = list(devices)
    shape = resolve_mesh_shape(cfg, len(devices))
    names = logical_axes.MESH_AXES
    ici = [shape[a] for a in names]
    dcn = [cfg.dcn_shape[a] for a in names]
    if math.prod(dcn) > 1:
        attr = _granules(devices, math.prod(dcn))
        return mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=attr == "process_index", allow_split_physical_axes=True
        )
    if len(devices) == len(jax.devices()):
        return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    # A subset of the devices (tests, single-device baselines): keep the order given.
    return np.asarray(devices, dtype=object).reshape(ici)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """Build the mesh over all (or the given) devices, with Auto axis types.

    Auto axes let ``nn.with_logical_constraint`` act as sharding hints (under the Explicit
    default of ``jax.make_mesh`` they fail).
    """
    grid = device_grid(cfg, jax.devices() if devices is None else devices)
    names = logical_axes.MESH_AXES
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def logical_specs(boxed_tree: Any) -> Any:
    """PartitionSpecs of logical names for a tree of ``nn.LogicallyPartitioned`` leaves."""
    return nn.get_partition_spec(boxed_tree)


def logical_to_sharding(spec_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(spec_tree, mesh, rules)


def batch_spec(rules: Rules, ndim: int = 2) -> PartitionSpec:
    """Mesh PartitionSpec of a ``[B, T, ...]`` batch array (batch over the ACT_BATCH axes)."""
    logical = (logical_axes.ACT_BATCH,) + (None,) * (ndim - 1)
    return nn.logical_to_mesh_axes(logical, rules)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """NamedSharding for a global batch array of rank ``ndim``."""
    return NamedSharding(mesh, batch_spec(rules, ndim))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split: it must divide the global batch."""
    spec = batch_spec(rules)[0]
    axes = (spec,) if isinstance(spec, str) else (spec or ())
    return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding."""
    return NamedSharding(mesh, PartitionSpec())


@functools.lru_cache(maxsize=64)
def _process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[start, stop)`` rows of a global batch that this process's devices hold.

    Each process feeds its own part of the batch, so its devices must hold one contiguous
    block of ``global_rows / process_count`` rows that no other process holds.
    """
    global_rows = global_shape[0]
    index_map = sharding.addressable_devices_indices_map(global_shape)
    rows = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    expected = global_rows // jax.process_count()
    if covered != stop - start or covered != expected:
        raise ConfigError(
            f"the mesh {dict(sharding.mesh.shape)} gives process {jax.process_index()} of {jax.process_count()} "
            f"{covered} of the {global_rows} batch rows, but each process reads its own {expected}; put the mesh "
            "axes that span hosts (config.mesh.dcn_shape, or the outer axes) on the batch: data or fsdp"
        )
    return start, stop


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Assemble each host's part of the batch into global arrays sharded over the mesh.

    With several processes, process ``p``'s rows land in the block of the global batch held by
    its devices; a mesh that would make processes share rows raises a ``ConfigError`` instead
    of silently mixing their different data.
    """
    out = {}
    for name, value in batch.items():
        sharding = batch_sharding(mesh, rules, value.ndim)
        if jax.process_count() == 1:
            out[name] = jax.device_put(value, sharding)
        else:
            global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
            _process_rows(sharding, global_shape)
            out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of the shards of the arrays in ``tree`` on each of this process's devices."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
