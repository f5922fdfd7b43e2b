"""XLA's temporary bytes of a whole training step per sequence length, per attention implementation.

For each length (1k .. 32k tokens, batch 1) the bench compiles one full training step of a small
model (forward, backward and the AdamW update; packed-segment ids so that the padding/packing
mask is exercised, and the model's position bias) with ``model.attention`` = ``xla``,
``dot_product`` and ``blockwise``, and prints ``compiled.memory_analysis().temp_size_in_bytes``:
the activations and scratch the step needs besides its parameters, optimizer state and batch.
Nothing is executed (compiling needs no memory for the arrays), so the quadratic rows are
reported even where they would not fit; the ones over ``--fit-gib`` (24 GiB) are marked.

With ``--sequence-devices 1,2,4,8`` it also compiles the step of ``model.attention=ring`` on
meshes with that many devices on the ``sequence`` axis (simulated CPU devices) at ``--ring-len``
tokens and prints the per-device temporary bytes, next to ``xla`` on the same mesh.

    python bench/attention_memory.py                                    # GPT with ALiBi, 1k..32k
    python bench/attention_memory.py --kind encoder_decoder --position relative --lengths 1024,4096,16384
    python bench/attention_memory.py --lengths 1024,2048 --sequence-devices 1,2,4,8 --ring-len 8192

Figures only; nothing passes or fails. Results go to ``bench/results/attention_memory*.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

_DEVICES = 8
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxlm import config_lib, logical_axes, models, sharding  # noqa: E402

GIB = 2**30


def model_config(kind: str, position: str, length: int, attention: str) -> config_lib.ModelConfig:
    """A small model of ``kind`` (2 layers, D=256, 4 heads) that accepts ``length`` tokens."""
    cfg = config_lib.validate(config_lib.base_config()).model
    return dataclasses.replace(
        cfg,
        kind=kind,
        position=position,
        attention=attention,
        num_layers=2,
        num_heads=4,
        num_kv_heads=0,
        embed_dim=256,
        mlp_dim=1024,
        vocab_size=256,
        max_len=length,
        type_vocab_size=0,
        fuse_qkv="off",
    )


def _loss_fn(model: nn.Module, kind: str):
    def loss(params, tokens, segments):
        v = {"params": params}
        if kind == "decoder_only":
            logits = model.apply(v, tokens, segment_ids=segments)
        elif kind == "encoder_only":
            logits = model.apply(v, tokens, segment_ids=segments)["mlm_logits"]
        else:
            logits = model.apply(v, tokens, tokens, inputs_segment_ids=segments, targets_segment_ids=segments)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    return loss


def step_memory(cfg: config_lib.ModelConfig, length: int, mesh=None) -> dict[str, int] | None:
    """Compile one AdamW training step at ``length`` tokens; XLA's memory analysis (per device)."""
    model = models.build(cfg)
    tx = optax.adamw(1e-3)
    loss = _loss_fn(model, cfg.kind)
    example = jnp.zeros((1, length), jnp.int32)
    args = (example,) if cfg.kind != "encoder_decoder" else (example, example)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args)["params"]))
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def step(params, opt_state, tokens, segments):
        grads = jax.grad(loss)(params, tokens, segments)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if mesh is None:
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens, tokens).compile()
        return common.compiled_memory(compiled)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_axes.DEFAULT_RULES):
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens, tokens).compile()
    return common.compiled_memory(compiled)


def _mesh(sequence: int):
    cfg = config_lib.MeshConfig(
        shape={"data": 1, "fsdp": 1, "tensor": 1, "sequence": sequence},
        dcn_shape={"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1},
    )
    return sharding.make_mesh(cfg, jax.devices()[:sequence])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="decoder_only", choices=["decoder_only", "encoder_only", "encoder_decoder"])
    parser.add_argument("--position", default="alibi", help="model.position (alibi / relative exercise the bias)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--attention", default="xla,dot_product,blockwise")
    parser.add_argument("--fit-gib", type=float, default=24.0, help="mark steps whose temporaries exceed this")
    parser.add_argument("--sequence-devices", default="", help="e.g. 1,2,4,8: ring attention per-device memory")
    parser.add_argument("--ring-len", type=int, default=8192)
    args = parser.parse_args()

    m = common.machine()
    print(common.describe_machine(m))
    lengths = [int(x) for x in args.lengths.split(",") if x]
    impls = [x for x in args.attention.split(",") if x]
    print(f"\n{args.kind}, position={args.position}, 2 layers, D=256, 4 heads, batch 1, packed segments;")
    print("XLA temporary bytes of one training step (forward + backward + AdamW), MiB:\n")
    print(f"{'length':>8} " + " ".join(f"{name:>14}" for name in impls))
    rows = []
    for length in lengths:
        row = {"length": length}
        cells = []
        for impl in impls:
            mem = step_memory(model_config(args.kind, args.position, length, impl), length)
            temp = None if mem is None else mem["temporaries"]
            row[impl] = temp
            mark = "*" if temp is not None and temp > args.fit_gib * GIB else " "
            cells.append(f"{common.mib(temp):>13}{mark}")
        rows.append(row)
        print(f"{length:>8} " + " ".join(cells), flush=True)
    print(f"\n* more than {args.fit_gib:g} GiB: compiled only; that step would not fit in {args.fit_gib:g} GiB")

    ring_rows = []
    if args.sequence_devices:
        n = args.ring_len
        print(f"\nring attention, {n} tokens: per-device XLA temporary bytes of one training step, MiB")
        print(f"{'sequence devices':>17} {'ring':>10} {'xla':>10}")
        for p in [int(x) for x in args.sequence_devices.split(",") if x]:
            mesh = _mesh(p)
            ring = step_memory(model_config(args.kind, args.position, n, "ring"), n, mesh)
            xla = step_memory(model_config(args.kind, args.position, n, "xla"), n, mesh)
            ring_rows.append({"sequence": p, "ring": ring, "xla": xla})
            print(
                f"{p:>17} {common.mib(ring and ring['temporaries']):>10} {common.mib(xla and xla['temporaries']):>10}"
            )

    suffix = "" if args.kind == "decoder_only" else f"_{args.kind}"
    path = common.write_result(
        f"attention_memory{suffix}",
        {
            "machine": m,
            "kind": args.kind,
            "position": args.position,
            "temporaries_bytes": rows,
            "ring_per_device": ring_rows,
            "fit_gib": args.fit_gib,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
