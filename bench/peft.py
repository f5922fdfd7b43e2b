"""Full fine-tuning vs every PEFT method on the built-in code_topic task (figures only, never pass/fail).

Pre-trains BERT (masked LM) on the built-in corpus (or reuses ``runs/bench-finetune``'s), then
fine-tunes it on ``builtin_code_topic`` from that workdir with full fine-tuning and each method
of ``config.peft``, with the same steps and settings; prints trainable %, optimizer-state bytes,
median step time, peak resident memory (this process, reset before each run) and the eval
accuracy, and writes ``bench/results/peft.json`` with the machine description.

    python bench/peft.py                                         # size=small
    python bench/peft.py --size tiny --pretrain_steps 200 --finetune_steps 100   # quick look

Runs go to ``runs/bench-peft/`` (kept: a rerun resumes instead of retraining).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxlm import config_lib  # noqa: E402
from jaxlm.metric_writer import read_metrics  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
# name -> config.peft overrides (LoRA-family targets: attention query / value; IA3: key, value, MLP out).
METHODS = {
    "full": {"peft.method": "none"},
    "lora": {"peft.method": "lora"},
    "lora_head_only": {"peft.method": "lora", "peft.trainable": "head/"},
    "dora": {"peft.method": "dora"},
    "ia3": {"peft.method": "ia3", "peft.targets": "attn/(key|value),mlp/wo"},
    "bitfit": {"peft.method": "bitfit"},
    "lora_bitfit": {"peft.method": "lora,bitfit"},
}


def _config(spec: str, overrides: dict[str, str]) -> config_lib.Config:
    c = config_lib.load_config_file(os.path.join(ROOT, spec))
    config_lib.apply_overrides(c, overrides)
    return config_lib.validate(c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=("tiny", "small"))
    p.add_argument("--pretrain_steps", type=int, default=0, help="0: the size preset's")
    p.add_argument("--finetune_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.0, help="PEFT learning rate (0: the recipe's x 10, as LoRA needs)")
    p.add_argument("--eval_steps", type=int, default=0, help="validation batches (0: the whole split)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "peft.json"))
    args = p.parse_args()
    from jaxlm.main import info, train

    runs = os.path.join(ROOT, "runs", "bench-peft", args.size)
    quiet = {"train.progress": "false", "train.eval_every": "0"}
    pre_over = dict(quiet) | ({"train.num_steps": str(args.pretrain_steps)} if args.pretrain_steps else {})
    pre_dir = os.path.join(runs, "bert-pretrain")
    train.run(_config(f"configs/bert.py:size={args.size}", pre_over), pre_dir, stream=open(os.devnull, "w"))
    spec = f"configs/finetune.py:task=code_topic,model=bert,size={args.size}"
    recipe_lr = _config(spec, {}).optim.lr
    rows = []
    for name in args.methods.split(","):
        over = quiet | METHODS[name] | {"train.num_steps": str(args.finetune_steps)}
        over |= {"train.eval_steps": str(args.eval_steps), "checkpoint.init_from": pre_dir}
        if name != "full":
            over["optim.lr"] = str(args.lr or 10 * recipe_lr)
        config = _config(spec, over)
        described = info.describe(config)
        workdir = os.path.join(runs, name)
        common.reset_peak_rss()
        t0 = time.perf_counter()
        out = train.run(config, workdir, stream=open(os.devnull, "w"))
        seconds = time.perf_counter() - t0
        peak, peak_how = common.peak_rss_bytes()
        step_times = [r["step_time_s"] for r in read_metrics(workdir) if "step_time_s" in r]
        row = {
            "method": name,
            "overrides": over,
            "trainable": described["trainable"],
            "total": described["total"],
            "trainable_pct": 100 * described["trainable"] / described["total"],
            "optimizer_state_bytes": described["optimizer_state_bytes"],
            "median_step_time_s": statistics.median(step_times) if step_times else None,
            "peak_rss_bytes": peak,
            "peak_rss_source": peak_how,
            "eval_accuracy": out.get("eval_accuracy"),
            "eval_loss": out.get("eval_loss"),
            "seconds": seconds,
        }
        rows.append(row)
        step = row["median_step_time_s"]
        print(
            f"{name:15s} trainable {row['trainable']:>10,} ({row['trainable_pct']:6.2f}%)  "
            f"opt {row['optimizer_state_bytes']:>12,} B  step {step or float('nan'):.3f}s  "
            f"peak {common.mib(peak):>6} MiB  accuracy {row['eval_accuracy'] or float('nan'):.4f}",
            flush=True,
        )
    path = common.write_result("peft", {"machine": common.machine(), "args": vars(args), "rows": rows}, path=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
