"""Device meshes and the shardings of state and batches, resolved from logical axis names.

Modules only name logical axes (``jaxlm.logical_axes``); this module turns those names into
``NamedSharding``s on a mesh with the axes ``data, fsdp, tensor, sequence`` using
``config.sharding.rules``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import logical_axes
from jaxlm.common_types import ConfigError
from jaxlm.config_lib import MeshConfig

Rules = tuple[tuple[str, tuple[str, ...] | None], ...]


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Per-slice mesh sizes with a ``-1`` filled so that all devices are used."""
    dcn = math.prod(cfg.dcn_shape.values())
    if num_devices % dcn:
        raise ConfigError(f"config.mesh.dcn_shape product {dcn} does not divide the {num_devices} devices")
    per_slice = num_devices // dcn
    shape = {axis: cfg.shape[axis] for axis in logical_axes.MESH_AXES}
    known = math.prod(v for v in shape.values() if v != -1)
    if -1 in shape.values():
        if per_slice % known:
            raise ConfigError(
                f"config.mesh.shape {_fmt(shape)}: the fixed sizes multiply to {known}, which does not divide "
                f"{per_slice} devices per slice"
            )
        shape = {k: (per_slice // known if v == -1 else v) for k, v in shape.items()}
    elif known != per_slice:
        raise ConfigError(
            f"config.mesh.shape {_fmt(shape)} has {known} devices but there are {per_slice} per slice; "
            "set one axis to -1 or make the product match"
        )
    return shape


def _fmt(shape: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    """Build the mesh over all (or the given) devices, with Auto axis types.

    Auto axes let ``nn.with_logical_constraint`` act as sharding hints (under the Explicit
    default of ``jax.make_mesh`` they fail). Multi-slice meshes place the dcn factors on the
    outer, slow dimension of each axis.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    names = logical_axes.MESH_AXES
    dcn = [cfg.dcn_shape[a] for a in names]
    ici = [shape[a] for a in names]
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    if math.prod(dcn) > 1:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(grid, names, axis_types=axis_types)
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(ici), names, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(ici), names, axis_types=axis_types)


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


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Assemble each host's part of the batch into global arrays sharded over the mesh."""
    out = {}
    for name, value in batch.items():
        sharding = batch_sharding(mesh, rules, value.ndim)
        if jax.process_count() == 1:
            out[name] = jax.device_put(value, sharding)
        else:
            out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out
