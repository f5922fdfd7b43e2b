"""This machine's sustained matmul FLOP/s: float32, and bfloat16 operands accumulated in float32.

Times one jitted ``jax.lax.dot_general`` per shape and operand dtype, after warm-up calls, and
reports the median (and best) of the repeats as FLOP/s (``2 * M * K * N`` per matmul, times the
batch). Shapes: squares 1024..4096, and the matmuls of the bench/train.py models: the
``[B*T, D] x [D, F]`` MLP projection, its weight gradient ``[D, B*T] x [B*T, F]``, the
``[B*T, D] x [D, V]`` LM head and the batched ``[B*N, T, H] x [B*N, H, T]`` attention logits.

The peak per dtype (the largest median over the shapes) goes to ``bench/results/peak.json``;
bench/train.py reads it as the denominator of "MFU vs measured peak". The last line says whether
bf16 operands pay on this machine: on CPUs without bf16 dot instructions (AVX2: bf16 ~0.7x
float32) they do not, and nothing in jaxlm defaults to bf16 there.

Variants (``--variants``): ``f32`` (f32 x f32 -> f32), ``bf16`` (bf16 x bf16 with
``preferred_element_type=float32``, what ``jaxlm.nn.linears.DenseGeneral`` does at
``model.dtype=bfloat16``), ``bf16_out`` (bf16 x bf16 -> bf16, for comparison only).

    python bench/peak.py
    python bench/peak.py --sizes 1024,2048 --variants f32,bf16,bf16_out --seconds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import hardware  # noqa: E402

# name -> (operand dtype, preferred_element_type)
VARIANTS = {
    "f32": (jnp.float32, jnp.float32),
    "bf16": (jnp.bfloat16, jnp.float32),
    "bf16_out": (jnp.bfloat16, None),
}
# Which variant's peak stands for a model compute dtype (bench/train.py's --dtypes).
PEAK_KEY = {"f32": "float32", "bf16": "bfloat16"}

# Model matmuls: (label, batch, M, K, N). baby: B*T=2048, D=384, F=1536, N*B=48 heads x T=256, H=64;
# d512: B*T=4096, D=512, F=2048; V=263 (the byte tokenizer).
MODEL_SHAPES = [
    ("baby mlp [BT,D]x[D,F]", 1, 2048, 384, 1536),
    ("baby mlp grad [D,BT]x[BT,F]", 1, 384, 2048, 1536),
    ("baby lm head [BT,D]x[D,V]", 1, 2048, 384, 263),
    ("baby attn [BN,T,H]x[BN,H,T]", 48, 256, 64, 256),
    ("d512 mlp [BT,D]x[D,F]", 1, 4096, 512, 2048),
    ("d512 attn [BN,T,H]x[BN,H,T]", 64, 512, 64, 512),
]


def matmul_fn(variant: str):
    """A jitted ``[b, m, k] x [b, k, n]`` matmul of this variant (batch dim dropped when b == 1)."""
    _, out_type = VARIANTS[variant]

    @jax.jit
    def f(x: jax.Array, y: jax.Array) -> jax.Array:
        batch = ((0,), (0,)) if x.ndim == 3 else ((), ())
        dims = (((x.ndim - 1,), (y.ndim - 2,)), batch)
        return jax.lax.dot_general(x, y, dims, preferred_element_type=out_type)

    return f


def operands(variant: str, b: int, m: int, k: int, n: int) -> tuple[jax.Array, jax.Array]:
    dtype, _ = VARIANTS[variant]
    rng = np.random.default_rng(0)
    lead = (b,) if b > 1 else ()
    x = jnp.asarray(rng.standard_normal(lead + (m, k), dtype=np.float32), dtype)
    y = jnp.asarray(rng.standard_normal(lead + (k, n), dtype=np.float32), dtype)
    return x, y


def measure(variant: str, b: int, m: int, k: int, n: int, *, seconds: float, min_repeats: int) -> dict[str, float]:
    """Median and best FLOP/s of one shape: 2 warm-up calls, then repeats for ~``seconds``."""
    f = matmul_fn(variant)
    x, y = operands(variant, b, m, k, n)
    for _ in range(2):
        f(x, y).block_until_ready()
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < seconds and len(times) < 200):
        t0, c0 = time.perf_counter(), time.process_time()
        f(x, y).block_until_ready()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    flops = 2.0 * b * m * k * n
    return {
        "flops": flops,
        "median_flops_per_s": flops / statistics.median(times),
        "best_flops_per_s": flops / min(times),
        "flops_per_cpu_s": flops / max(statistics.median(cpu), 1e-9),
        "repeats": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,3072,4096", help="square sizes, comma-separated")
    parser.add_argument("--variants", default="f32,bf16", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--no_model_shapes", action="store_true", help="squares only")
    parser.add_argument("--seconds", type=float, default=1.5, help="time spent repeating each shape")
    parser.add_argument("--min_repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="result path (default bench/results/peak.json)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown {v!r}; valid: {', '.join(VARIANTS)}")

    machine = common.machine()
    print(common.describe_machine(machine))
    shapes = [(f"square {s}", 1, s, s, s) for s in (int(x) for x in args.sizes.split(",") if x)]
    if not args.no_model_shapes:
        shapes += MODEL_SHAPES
    header = f"{'shape':<30} {'b x m x k x n':>22} " + " ".join(f"{v + ' GFLOP/s':>17}" for v in variants)
    print(
        "median (best) GFLOP/s per jitted dot_general; 2 warm-up calls, then repeats for "
        f"~{args.seconds:g}s (>= {args.min_repeats})"
    )
    print(header)
    rows = []
    for label, b, m, k, n in shapes:
        row = {"shape": label, "b": b, "m": m, "k": k, "n": n}
        cells = []
        for v in variants:
            r = measure(v, b, m, k, n, seconds=args.seconds, min_repeats=args.min_repeats)
            row[v] = r
            cells.append(f"{common.gflops(r['median_flops_per_s']):>8} ({common.gflops(r['best_flops_per_s']):>6})")
        rows.append(row)
        print(f"{label:<30} {f'{b}x{m}x{k}x{n}':>22} " + " ".join(f"{c:>17}" for c in cells), flush=True)

    peak, best, per_cpu = {}, {}, {}
    for v in variants:
        peak[v] = max(r[v]["median_flops_per_s"] for r in rows)
        best[v] = max(r[v]["best_flops_per_s"] for r in rows)
        per_cpu[v] = max(r[v]["flops_per_cpu_s"] for r in rows)
    print(
        "peak (largest median over shapes; best single call in brackets; per CPU-second: FLOPs over the "
        "process's CPU time, all threads, which other load on the machine barely changes):"
    )
    for v in variants:
        print(
            f"  {v:<9} {common.gflops(peak[v]):>9} GFLOP/s ({common.gflops(best[v])}); "
            f"{common.gflops(per_cpu[v])} GFLOP per CPU-second"
        )
    verdict = None
    if "f32" in peak and "bf16" in peak:
        ratio = peak["bf16"] / peak["f32"]
        print(f"  bf16 / f32: {ratio:.2f}x")
        isa = hardware.cpu_info().isa if jax.default_backend() == "cpu" else jax.default_backend()
        if ratio < 1.0:
            verdict = (
                f"bf16 operands are SLOWER than float32 on this machine ({ratio:.2f}x, {isa}): train in float32 "
                "(the default); with model.dtype=bfloat16, model.matmul_dtype=auto gives the matmuls float32 "
                "operands here" + (" (it does on this CPU)" if not hardware.auto_switch("bf16_matmul", "auto") else "")
            )
        else:
            verdict = f"bf16 operands are {ratio:.2f}x float32 on this machine ({isa}): model.dtype=bfloat16 can pay"
        print(verdict)
    machine["load_average_after"] = common.load_average()
    print(f"load average after: {'/'.join(f'{x:.2f}' for x in machine['load_average_after'])}")
    path = common.write_result(
        "peak",
        {
            "machine": machine,
            "method": "jitted lax.dot_general, median of repeats after 2 warm-up calls; peak = max median over "
            "shapes; best = max over shapes of the fastest call; per_cpu_s = FLOPs per CPU-second (process time)",
            "peak": {PEAK_KEY[v]: peak[v] for v in variants if v in PEAK_KEY},
            "peak_by_variant": peak,
            "best_by_variant": best,
            "per_cpu_s_by_variant": per_cpu,
            "isa": hardware.cpu_info().isa,
            "verdict": verdict,
            "shapes": rows,
        },
        path=args.out,
    )
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
