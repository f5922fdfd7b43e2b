"""Interleaved A/B train-step timing: two config variants built in one process, timed in alternation.

On a shared machine the speed of a step moves with the other load by more than most of the
differences worth measuring, so comparing two separate ``bench/train.py`` runs is unreliable.
Here both variants of each config are compiled up front (both states live on the device), then
timed in ``--rounds`` alternations (A B, B A, A B, ...), ``--steps`` steps each after warm-up,
synchronizing after every step. Each round gives a ratio B / A of tokens/s from the median step
of each side in that round; the figure is the median of those ratios (and their spread), which
load shifts during a round move much less than either side's absolute figure. The same ratio of
process CPU time per step (all threads) is printed beside it: other processes barely move it,
but it does not see a core left idle.

Variants are config overrides: ``--a KEY=VALUE`` and ``--b KEY=VALUE`` (repeatable), applied on
top of the config and ``--dtype`` (and ``--set`` for both). Configs are those of
bench/train.py (``tiny``, ``small`` = the quick start, ``baby``, ``d512``, ``bert``, ``t5``).

    python bench/ab.py --configs tiny,small,baby --a model.fuse_qkv=on --b model.fuse_qkv=off
    python bench/ab.py --configs baby --dtype bfloat16 --a model.matmul_dtype=compute --b model.matmul_dtype=float32

Figures only; nothing passes or fails on time. Writes ``bench/results/ab/<label>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import train as train_bench  # noqa: E402


def time_block(built: dict[str, Any], steps: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``steps`` steps of a built variant, one sync per step."""
    step, batch, rng = built["step"], built["batch"], built["rng"]
    state = built["state"]
    times, cpu = [], []
    with jax.set_mesh(built["exp"].mesh), nn.logical_axis_rules(built["exp"].rules):
        state, metrics = step(state, batch, rng)  # one untimed step: caches and threads warm for this side
        jax.block_until_ready((state, metrics))
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = step(state, batch, rng)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    built["state"] = state  # the previous buffers were donated
    return times, cpu


def ab_one(name: str, dtype: str, a: dict[str, str], b: dict[str, str], *, rounds: int, steps: int) -> dict[str, Any]:
    """Build both variants of config ``name``, alternate them ``rounds`` times, return the figures."""
    built = {}
    for label, extra in (("a", a), ("b", b)):
        config = train_bench.make_config(name, dtype, extra)
        built[label] = train_bench.build_step(config)
        built[label]["tokens"] = config.data.batch_size * config.data.seq_len
        train_bench.run_steps(built[label], 1, sync_once=False)  # warm-up (2 steps inside)
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        medians = {}
        for label in order:
            wall, cpu = time_block(built[label], steps)
            medians[label], medians[f"{label}_cpu"] = statistics.median(wall), statistics.median(cpu)
        per_round.append(medians)
    ratios = [m["a"] / m["b"] for m in per_round]  # tokens/s of B over tokens/s of A
    cpu_ratios = [m["a_cpu"] / m["b_cpu"] for m in per_round]
    tokens = built["a"]["tokens"]
    return {
        "config": name,
        "dtype": dtype,
        "tokens_per_step": tokens,
        "compile_s": {k: v["lower_s"] + v["compile_s"] for k, v in built.items()},
        "rounds": per_round,
        "tokens_per_s_a": tokens / statistics.median(m["a"] for m in per_round),
        "tokens_per_s_b": tokens / statistics.median(m["b"] for m in per_round),
        "ratio_b_over_a": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        # CPU time per step (all threads): what other processes on a shared machine move least.
        "cpu_ratio_b_over_a": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    valid = ", ".join(train_bench.CONFIGS)
    parser.add_argument("--configs", default="tiny,small,baby", help=f"comma-separated, of {valid}")
    parser.add_argument("--dtype", default="float32", help="model.dtype of both variants")
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="override of variant A")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="override of variant B")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of both")
    parser.add_argument("--rounds", type=int, default=6, help="alternations (each times A and B)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side per round")
    parser.add_argument("--label", default=None, help="result name (default: from the overrides)")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in train_bench.CONFIGS:
            parser.error(f"--configs: unknown {c!r}; valid: {', '.join(train_bench.CONFIGS)}")
    both = common.parse_overrides(args.set)
    a = {**both, **common.parse_overrides(args.a)}
    b = {**both, **common.parse_overrides(args.b)}
    label = args.label or "_vs_".join(
        "+".join(f"{k.split('.')[-1]}={v}" for k, v in common.parse_overrides(side).items()) or "base"
        for side in (args.a, args.b)
    )
    machine = common.machine()
    print(common.describe_machine(machine), flush=True)
    print(f"A: {a or 'config as is'}   B: {b or 'config as is'}   dtype {args.dtype}", flush=True)
    rows = []
    for name in configs:
        row = ab_one(name, args.dtype, a, b, rounds=args.rounds, steps=args.steps)
        rows.append(row)
        print(
            f"  {name:<6} A {row['tokens_per_s_a']:>8,.0f} tok/s  B {row['tokens_per_s_b']:>8,.0f} tok/s  "
            f"B/A {row['ratio_b_over_a']:.3f} (rounds {row['ratio_min']:.3f}-{row['ratio_max']:.3f}, "
            f"{', '.join(f'{x:.3f}' for x in row['ratios'])}; CPU-time {row['cpu_ratio_b_over_a']:.3f})  "
            f"load {'/'.join(f'{x:.1f}' for x in common.load_average())}",
            flush=True,
        )
    machine["load_average_after"] = common.load_average()
    path = common.write_result(
        os.path.join("ab", label),
        {
            "machine": machine,
            "a": a,
            "b": b,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "steps": args.steps,
            "results": rows,
        },
    )
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
