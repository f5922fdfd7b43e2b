"""The same baby GPT trained by PyTorch on this CPU: an outside reference for bench/train.py.

Builds GPT-2 with ``transformers`` (6 layers, 6 heads, 384 wide, MLP 1536, learned positions,
tied embeddings, vocabulary 263, no dropout: the ``baby`` config of bench/train.py), trains it
with ``torch.optim.AdamW`` on one random batch of 8 x 256 tokens, and prints tokens/s and MFU
with jaxlm's FLOPs formula (``jaxlm.models.config.flops_per_token``) against the measured f32
matmul peak in bench/results/peak.json. f32 only, and optionally bf16 autocast (``--bf16``).
Needs torch and transformers (the ``hf`` extra); nothing is downloaded.

    python bench/torch_baseline.py [--steps 20] [--threads 2] [--bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402
import train as jax_bench  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from jaxlm.models import config as model_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 2 warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--bf16", action="store_true", help="also time torch.autocast(bfloat16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = jax_bench.make_config("baby", "float32", {})
    m, b, t = config.model, config.data.batch_size, config.data.seq_len
    vocab = 263
    gpt = GPT2Config(
        vocab_size=vocab,
        n_positions=t,
        n_embd=m.embed_dim,
        n_layer=m.num_layers,
        n_head=m.num_heads,
        n_inner=m.mlp_dim,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(gpt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, vocab, (b, t))
    flops_per_step = model_config.flops_per_token(dataclasses.replace(m, vocab_size=vocab), t) * b * t
    peaks = common.measured_peaks()
    if peaks is None:
        sys.exit("run bench/peak.py first: MFU is against its measured peaks")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2 baby, batch {b} x {t}")
    rows = []
    for dtype in ["float32"] + (["bfloat16"] if args.bf16 else []):
        times = []
        for i in range(args.steps + 2):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        peak = peaks[dtype]
        row = {
            "dtype": dtype,
            "tokens_per_s": b * t / step,
            "step_s": step,
            "step_s_min": min(times),
            "step_s_all": times,
            "mfu": flops_per_step / step / peak,
        }
        rows.append(row)
        print(
            f"  {dtype:9s} {row['tokens_per_s']:8,.0f} tok/s  step {step * 1e3:.1f} ms (min {min(times) * 1e3:.1f})  "
            f"MFU {row['mfu']:.1%} of the measured {peak / 1e9:.1f} GFLOP/s"
        )
    payload = {"machine": common.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print("wrote", common.write_result("torch_baseline", {**payload, "flops_per_step": flops_per_step, "rows": rows}))


if __name__ == "__main__":
    main()
