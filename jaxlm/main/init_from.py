"""``config.checkpoint.init_from``: start a run from another workdir's parameters, matched by path.

The source is any jaxlm workdir with a checkpoint: a pre-training run, or one written by
``jaxlm convert --from hf``. Its newest checkpoint's parameters are read by path (only the
parameters, never its optimizer state) straight onto the new run's shardings; a parameter the
new model has and the source lacks (a fresh task head) keeps its new initialization; a source
parameter the new model lacks (the pre-training MLM / next-sentence / LM heads) is ignored.
The optimizer starts fresh. A source parameter whose shape differs from the new one is an
error naming it: silently re-initializing a mismatched embedding would hide a config mistake.
The one exception is vocabulary padding (``jaxlm.models.vocab``): a vocabulary axis may differ
when the source holds every real id, as a workdir written before padding existed (unpadded) or
with another ``config.model.vocab_multiple`` does; its rows are cut or zero-padded to the new size.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import checkpoint, param_paths
from jaxlm.common_types import CheckpointError


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``init_from`` did: parameter paths loaded, initialized fresh, and ignored, with their sizes."""

    source: str
    step: int
    loaded: tuple[str, ...]
    initialized: tuple[str, ...]
    ignored: tuple[str, ...]
    loaded_size: int
    initialized_size: int
    ignored_size: int

    def summary(self) -> str:
        """One line for the trainer's log."""

        def part(name: str, paths: tuple[str, ...], size: int) -> str:
            shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
            return f"{name} {len(paths)} tensors ({size:,} params)" + (
                f" [{shown}]" if paths and name != "loaded" else ""
            )

        return f"init_from {self.source} (step {self.step}): " + "; ".join(
            (
                part("loaded", self.loaded, self.loaded_size),
                part("initialized", self.initialized, self.initialized_size),
                part("ignored", self.ignored, self.ignored_size),
            )
        )


def _source_manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _size(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def load(
    source: str, params: Any, *, vocab_axes: dict[str, int] | None = None, real_vocab: int = 0
) -> tuple[Any, Report]:
    """Overwrite the leaves of ``params`` (initialized, sharded) that ``source``'s newest checkpoint holds.

    ``vocab_axes`` (``{path: axis}``, ``Experiment.vocab_axes``) and ``real_vocab`` (the real
    vocabulary size) let a vocabulary axis differ in padding only: at least ``real_vocab`` rows there.
    Returns the new parameter tree (same structure and shardings) and a :class:`Report`.
    Raises :class:`CheckpointError` (one line) for a missing or empty workdir or a shape mismatch.
    """
    vocab_axes = vocab_axes or {}
    path = os.path.abspath(os.path.expanduser(source))
    directory = os.path.join(path, checkpoint.CHECKPOINT_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"config.checkpoint.init_from={source!r} does not exist; give a jaxlm workdir (a training run or "
            "one written by jaxlm convert --from hf)"
        )
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"config.checkpoint.init_from={source!r} has no checkpoints/; train or convert there first"
        )
    manager = _source_manager(directory)
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"config.checkpoint.init_from={source!r} has no complete checkpoint yet")
        saved = manager.item_metadata(step)["state"]
        saved_params = saved["params"] if hasattr(saved, "keys") and "params" in saved.keys() else None
        if saved_params is None:
            raise CheckpointError(f"config.checkpoint.init_from={source!r}: its checkpoint holds no params")
        saved_flat = param_paths.flatten(saved_params)
        new_flat = param_paths.flatten(params)
        repad: dict[str, tuple[int, ...]] = {}  # vocabulary arrays padded to another size: path -> saved shape
        for name, leaf in new_flat.items():
            meta = saved_flat.get(name)
            if meta is not None and _padding_only(
                tuple(meta.shape), tuple(leaf.shape), vocab_axes.get(name), real_vocab
            ):
                repad[name] = tuple(meta.shape)
            elif meta is not None and tuple(meta.shape) != tuple(leaf.shape):
                raise CheckpointError(
                    f"config.checkpoint.init_from={source!r}: parameter {name} has shape {tuple(meta.shape)} there "
                    f"but {tuple(leaf.shape)} in this model; make the model config match (e.g. vocab_size, "
                    "embed_dim, max_len) or start without init_from"
                )
        loaded = [n for n in new_flat if n in saved_flat]
        direct = [n for n in loaded if n not in repad]
        args = {n: ocp.ArrayRestoreArgs(sharding=new_flat[n].sharding, dtype=new_flat[n].dtype) for n in direct}
        items = {
            n: jax.ShapeDtypeStruct(new_flat[n].shape, new_flat[n].dtype, sharding=new_flat[n].sharding) for n in direct
        }
        for n, shape in repad.items():  # read whole on every host, resized below
            args[n] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=new_flat[n].dtype)
            items[n] = jax.ShapeDtypeStruct(shape, new_flat[n].dtype)
        restore_args, abstract = _nested(args), _nested(items)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True
                )
            ),
        )["state"]["params"]
    finally:
        manager.close()
    restored_flat = param_paths.flatten(restored)
    for n in repad:
        leaf, rows = new_flat[n], np.asarray(restored_flat[n])
        axis = vocab_axes[n]
        fitted = np.zeros(leaf.shape, rows.dtype)
        keep = min(rows.shape[axis], leaf.shape[axis])
        index = tuple(slice(0, keep) if i == axis else slice(None) for i in range(rows.ndim))
        fitted[index] = rows[index]
        restored_flat[n] = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx, a=fitted: a[idx])
    merged = param_paths.map_with_path(lambda name, leaf: restored_flat.get(name, leaf), params)
    initialized = [n for n in new_flat if n not in saved_flat]
    ignored = [n for n in saved_flat if n not in new_flat]
    report = Report(
        source=source,
        step=int(step),
        loaded=tuple(loaded),
        initialized=tuple(initialized),
        ignored=tuple(ignored),
        loaded_size=sum(_size(new_flat[n].shape) for n in loaded),
        initialized_size=sum(_size(new_flat[n].shape) for n in initialized),
        ignored_size=sum(_size(saved_flat[n].shape) for n in ignored),
    )
    return merged, report


def _padding_only(saved: tuple[int, ...], new: tuple[int, ...], axis: int | None, real_vocab: int) -> bool:
    """Whether two shapes differ only in the padding of vocabulary axis ``axis`` (both hold ``real_vocab`` rows)."""
    if axis is None or saved == new or len(saved) != len(new) or not real_vocab:
        return False
    others_equal = all(s == n for i, (s, n) in enumerate(zip(saved, new)) if i != axis)
    return others_equal and min(saved[axis], new[axis]) >= real_vocab


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{'a/b': x}`` -> ``{'a': {'b': x}}``."""
    out: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = out
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out
