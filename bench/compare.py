"""jaxlm vs the nanoGPT-style PyTorch reference, same shapes, same CPU, one process, interleaved.

For each config (default ``tiny,small,baby``: bench/train.py's shapes; ``small`` is the README's
quick start) and dtype (default float32), builds jaxlm's train step exactly as bench/train.py
does (the trainer's step: AdamW, clip, the ``auto`` switches of this CPU) and the PyTorch
reference of bench/torch_baseline.py (``nanogpt``: fused QKV, ``scaled_dot_product_attention``
causal, AdamW, clip 1.0), then times them in ``--rounds`` alternations (jaxlm, torch, torch,
jaxlm, ...), ``--steps`` steps each after one untimed step. Prints both sides' tokens/s (median
over rounds of each round's median step) and the ratio jaxlm / torch (median of the per-round
ratios, with their range): the ratio is what a shared machine's load moves least.

    python bench/compare.py
    python bench/compare.py --configs baby --dtypes float32,bfloat16 --rounds 6

Figures only; nothing passes or fails on time. Writes ``bench/results/compare.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402
import torch_baseline  # noqa: E402
import train as train_bench  # noqa: E402


def compare_one(name: str, dtype: str, *, rounds: int, steps: int, reference: str) -> dict:
    """Alternate jaxlm and the reference on config ``name``; return both sides' figures and the ratio."""
    config = train_bench.make_config(name, dtype, {})
    built = train_bench.build_step(config)
    train_bench.run_steps(built, 1, sync_once=False)  # warm-up
    ref = torch_baseline.Trainer(name, reference)
    bf16 = dtype == "bfloat16"
    ref.time_block(1, bf16)
    tokens = config.data.batch_size * config.data.seq_len
    assert tokens == ref.tokens, (tokens, ref.tokens)
    jax_med, ref_med = [], []
    for r in range(rounds):
        for side in ("jax", "ref") if r % 2 == 0 else ("ref", "jax"):
            if side == "jax":
                jax_med.append(statistics.median(ab.time_block(built, steps)[0]))
            else:
                ref_med.append(statistics.median(ref.time_block(steps, bf16)))
    ratios = [r / j for j, r in zip(jax_med, ref_med)]  # jaxlm tokens/s over the reference's
    return {
        "config": name,
        "dtype": dtype,
        "reference": reference,
        "reference_optimizer": ref.optimizer_name,
        "batch": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "layers": config.model.num_layers,
        "embed": config.model.embed_dim,
        "jaxlm_tokens_per_s": tokens / statistics.median(jax_med),
        "torch_tokens_per_s": tokens / statistics.median(ref_med),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "jaxlm_step_s": jax_med,
        "torch_step_s": ref_med,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small,baby", help="bench/train.py GPT configs, comma-separated")
    parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16 (torch: autocast)")
    parser.add_argument("--reference", default="nanogpt", help="nanogpt or gpt2 (bench/torch_baseline.py)")
    parser.add_argument("--rounds", type=int, default=6, help="alternations")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="result path (default bench/results/compare.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = common.machine()
    threads = torch.get_num_threads()
    print(common.describe_machine(machine), f"torch {torch.__version__} ({threads} threads)", flush=True)
    rows = []
    print(f"{'config':<6} {'dtype':<9} {'jaxlm tok/s':>11} {'torch tok/s':>11} {'jaxlm/torch':>11}  rounds")
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            row = compare_one(name, dtype, rounds=args.rounds, steps=args.steps, reference=args.reference)
            rows.append(row)
            print(
                f"{name:<6} {dtype:<9} {row['jaxlm_tokens_per_s']:>11,.0f} {row['torch_tokens_per_s']:>11,.0f} "
                f"{row['ratio']:>10.2f}x  {row['ratio_min']:.2f}-{row['ratio_max']:.2f}  "
                f"load {'/'.join(f'{x:.1f}' for x in common.load_average())}",
                flush=True,
            )
    machine["load_average_after"] = common.load_average()
    payload = {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}
    print("wrote", os.path.relpath(common.write_result("compare", payload, path=args.out)))


if __name__ == "__main__":
    main()
