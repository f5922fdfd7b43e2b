"""Full fine-tuning vs every PEFT method on the built-in downstream tasks (figures only, never pass/fail).

Starts from the pretrained BERT and GPT workdirs that ``bench/finetune.py`` writes (by default
``runs/bench-finetune/<size>/{bert,gpt}-pretrain``, only read here) and fine-tunes each on
each built-in task (``code_topic``, ``code_tokens``, ``code_qa`` on BERT; ``code_topic``,
``code_tokens``, ``code_summary`` on GPT) with full fine-tuning and with each method of
``config.peft``, all with the same steps and settings. Each run is its own ``jaxlm train``
process; printed and written to ``bench/results/peft_<size>.json`` with the machine: trainable
parameters (and % of the model's), optimizer-state bytes, median step time, the process's peak
resident memory and the task metric. A method this build does not implement is skipped with
the reason ``jaxlm`` gives.

    python bench/peft.py --size small                     # after bench/finetune.py --size small
    python bench/peft.py --size tiny --base /tmp/b --pretrain_steps 200 --finetune_steps 60

``--pretrain_steps N`` pretrains a missing base into ``--base`` first (never one that exists).
The ``lora`` row is the default LoRA (r=8 on attention query / value, ``peft.trainable`` the
task head and BERT's pooler: 3% of the small BERT); ``lora_r4_head`` (r=4, only the task head
trainable beside it: 0.55% of the small BERT) and ``lora_r2_head`` (r=2: 0.6% of the 4x smaller
small GPT, where r=4 is 1.09%) are the settings for the goal of <= 1% trainable parameters.
Prefix and prompt tuning get ``data.seq_len`` shortened by their virtual tokens where the
model's ``max_len`` has no room for them. PEFT methods train at ``--lr_scale`` x the recipe's
learning rate; full fine-tuning runs at both (``full``: the recipe's, ``full_lr_scaled``: the
PEFT rate), and the goal compares with the better of the two.
Fine-tuning runs go to ``runs/bench-peft/<size>/`` (replaced on each run, so times are fresh).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxlm import checkpoint, config_lib  # noqa: E402
from jaxlm.common_types import UserError  # noqa: E402
from jaxlm.metric_writer import read_metrics  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# task -> the metric reported (higher is better for all four)
TASKS = {
    "code_topic": "eval_accuracy",
    "code_tokens": "eval_f1",
    "code_qa": "eval_f1",
    "code_summary": "eval_rougeL",
}
MODELS = {"bert": ("code_topic", "code_tokens", "code_qa"), "gpt": ("code_topic", "code_tokens", "code_summary")}
# name -> config overrides (LoRA-family targets: the default attention query / value; IA3 as in its paper:
# key, value and the MLP's output projection).
METHODS = {
    "full": {"peft.method": "none"},
    # Full fine-tuning at the PEFT methods' learning rate (--lr_scale x the recipe's): the recipe's rate
    # is tuned for nothing here, so the goal compares LoRA with the better of the two full rows.
    "full_lr_scaled": {"peft.method": "none"},
    "lora": {"peft.method": "lora"},
    # The goal's setting: LoRA r=4 on query / value with only the task head trainable beside it.
    "lora_r4_head": {"peft.method": "lora", "peft.rank": "4", "peft.trainable": "head/"},
    # The same at r=2: the small GPT is 4x smaller than the small BERT, so r=4 is 1.09% of it.
    "lora_r2_head": {"peft.method": "lora", "peft.rank": "2", "peft.trainable": "head/"},
    "dora": {"peft.method": "dora"},
    "ia3": {"peft.method": "ia3", "peft.targets": "attn/(key|value),mlp/wo"},
    "bitfit": {"peft.method": "bitfit"},
    "adapter": {"peft.method": "adapter"},
    "prefix": {"peft.method": "prefix"},
    "prompt": {"peft.method": "prompt"},
}


def _config(spec: str, overrides: dict[str, str]) -> config_lib.Config:
    c = config_lib.load_config_file(os.path.join(ROOT, spec))
    config_lib.apply_overrides(c, overrides)
    return config_lib.validate(c)


def _train(spec: str, overrides: dict[str, str], workdir: str, log: str) -> tuple[int, int, float]:
    """Run ``jaxlm train`` in its own process: ``(exit status, its peak RSS in bytes, seconds)``."""
    args = [sys.executable, "-m", "jaxlm", "train", "--config", os.path.join(ROOT, spec), "--workdir", workdir]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


def _why_not(spec: str, overrides: dict[str, str]) -> str | None:
    """None if the method runs on this model and task, else jaxlm's one-line reason (checked without training)."""
    from jaxlm import peft
    from jaxlm.main import info

    try:
        config = _config(spec, overrides)
        check = getattr(peft, "check_supported", None)
        if check is not None:
            check(config.peft)
        info.describe(config)
    except UserError as e:
        return str(e)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=("tiny", "small"))
    p.add_argument(
        "--base", default="", help="directory holding {bert,gpt}-pretrain (default: runs/bench-finetune/<size>)"
    )
    p.add_argument("--pretrain_steps", type=int, default=0, help="> 0: pretrain a missing base with this many steps")
    p.add_argument("--finetune_steps", type=int, default=300)
    p.add_argument("--lr_scale", type=float, default=10.0, help="PEFT learning rate = this x the recipe's")
    p.add_argument("--eval_steps", type=int, default=0, help="validation batches (0: the whole split)")
    p.add_argument("--models", default="bert,gpt")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--runs", default="", help="fine-tuning workdirs (default: runs/bench-peft/<size>)")
    p.add_argument("--out", default="", help="result JSON (default: bench/results/peft_<size>.json)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="rerun the requested rows even if the result JSON holds them (rows not requested are kept)",
    )
    p.add_argument("--markdown", action="store_true", help="print the README's tables from the result JSON; no runs")
    args = p.parse_args()
    from jaxlm.main import info

    if args.markdown:
        result = common.read_result(f"peft_{args.size}", path=args.out or None)
        if not result:
            sys.exit(f"no result JSON for --size {args.size}; run this bench first")
        print(markdown(result["rows"]))
        return

    bases = os.path.abspath(args.base or os.path.join(ROOT, "runs", "bench-finetune", args.size))
    runs = os.path.abspath(args.runs or os.path.join(ROOT, "runs", "bench-peft", args.size))
    os.makedirs(runs, exist_ok=True)
    quiet = {"train.progress": "false", "train.eval_every": "0"}
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS] + [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        sys.exit(f"unknown --methods / --tasks {unknown}; methods: {', '.join(METHODS)}; tasks: {', '.join(TASKS)}")
    rows, skipped = [], []
    out = args.out or os.path.join(ROOT, "bench", "results", f"peft_{args.size}.json")
    # Rows measured before with the same settings; --fresh reruns the requested ones but keeps the rest.
    kept = _measured(out, args)
    for model in args.models.split(","):
        base = os.path.join(bases, f"{model}-pretrain")
        if checkpoint.latest_step(base) is None:
            if not args.pretrain_steps:
                sys.exit(f"no pretrained {model} at {base}; run bench/finetune.py --size {args.size} or pass --base")
            over = quiet | {"train.num_steps": str(args.pretrain_steps)}
            status, _, seconds = _train(f"configs/{model}.py:size={args.size}", over, base, base + ".log")
            if status:
                sys.exit(f"pretraining {model} failed (exit {status}); see {base}.log")
            print(f"pretrained {model} into {base} ({args.pretrain_steps} steps, {seconds:.0f}s)", flush=True)
        base_step = checkpoint.latest_step(base)
        print(f"base {model}: {base} at step {base_step}", flush=True)
        for task in [t for t in MODELS[model] if t in args.tasks.split(",")]:
            metric = TASKS[task]
            spec = f"configs/finetune.py:task={task},model={model},size={args.size}"
            recipe_lr = _config(spec, {}).optim.lr
            for name in methods:
                if (model, task, name) in kept and not args.fresh:  # measured before with these settings
                    rows.append(kept.pop((model, task, name)))
                    print(f"{model:4s} {task:12s} {name:12s} kept from {out}", flush=True)
                    continue
                kept.pop((model, task, name), None)
                over = quiet | METHODS[name] | {"checkpoint.init_from": base}
                over |= {"train.num_steps": str(args.finetune_steps), "train.eval_steps": str(args.eval_steps)}
                if name != "full":  # full_lr_scaled too
                    over["optim.lr"] = str(args.lr_scale * recipe_lr)
                if name in ("prefix", "prompt"):  # the virtual tokens take positions too
                    c = config_lib.load_config_file(os.path.join(ROOT, spec))
                    config_lib.apply_overrides(c, over)
                    room = c.model.max_len - c.peft.num_virtual_tokens
                    if c.data.seq_len > room:
                        over["data.seq_len"] = str(room)
                why = _why_not(spec, over)
                if why:
                    skipped.append({"model": model, "task": task, "method": name, "reason": why})
                    print(f"{model:4s} {task:12s} {name:12s} skipped: {why}", flush=True)
                    continue
                described = info.describe(_config(spec, over))
                workdir = os.path.join(runs, f"{model}-{task}-{name}")
                shutil.rmtree(workdir, ignore_errors=True)
                status, peak, seconds = _train(spec, over, workdir, workdir + ".log")
                if status:
                    skipped.append({"model": model, "task": task, "method": name, "reason": f"exit {status}"})
                    print(f"{model:4s} {task:12s} {name:12s} FAILED (exit {status}); see {workdir}.log", flush=True)
                    continue
                records = read_metrics(workdir)
                step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
                evals = [r for r in records if metric in r]
                row = {
                    "model": model,
                    "task": task,
                    "method": name,
                    "base_step": base_step,
                    "overrides": over,
                    "trainable": described["trainable"],
                    "total": described["total"],
                    "trainable_pct": 100 * described["trainable"] / described["total"],
                    "optimizer_state_bytes": described["optimizer_state_bytes"],
                    "median_step_time_s": statistics.median(step_times[1:] or step_times) if step_times else None,
                    "peak_rss_bytes": peak,
                    "metric": metric,
                    "score": evals[-1][metric] if evals else None,
                    "eval_loss": evals[-1].get("eval_loss") if evals else None,
                    "seconds": seconds,
                    # Rows of one file may come from different machines (kept rows): each says where it ran.
                    "cpu": {"model": common.cpu_model(), "flags": common.cpu_flags()},
                }
                rows.append(row)
                _write(args, out, rows + list(kept.values()), skipped, final=False)  # a long run keeps what it measured
                nan = float("nan")
                score, step = row["score"] if row["score"] is not None else nan, row["median_step_time_s"] or nan
                print(
                    f"{model:4s} {task:12s} {name:12s} trainable {row['trainable']:>10,} "
                    f"({row['trainable_pct']:6.2f}%) opt {row['optimizer_state_bytes']:>12,} B  step {step:.3f}s  "
                    f"peak {common.mib(peak):>6} MiB  {metric} {score:.4f}",
                    flush=True,
                )
    rows += kept.values()  # rows of methods and tasks not asked for this time stay in the file
    verdicts = _verdicts(rows)
    for line in verdicts:
        print(line)
    print(f"wrote {_write(args, out, rows, skipped, final=True)}")


# Arguments that change what a row measures: rows from a JSON written with other values are not reused.
_ROW_SETTINGS = ("size", "base", "pretrain_steps", "finetune_steps", "lr_scale", "eval_steps")


def _measured(out: str, args: argparse.Namespace) -> dict[tuple[str, str, str], dict]:
    """Rows of an earlier result JSON at ``out`` measured with the same settings, by (model, task, method)."""
    earlier = common.read_result(f"peft_{args.size}", path=out) or {}
    if any(earlier.get("args", {}).get(k) != getattr(args, k) for k in _ROW_SETTINGS):
        return {}
    return {(r["model"], r["task"], r["method"]): r for r in earlier.get("rows", [])}


def _write(args: argparse.Namespace, out: str, rows: list[dict], skipped: list[dict], *, final: bool) -> str:
    payload = {"machine": common.machine(), "args": vars(args), "complete": final, "rows": rows, "skipped": skipped}
    return common.write_result(f"peft_{args.size}", payload | {"goal": _verdicts(rows)}, path=out)


def _verdicts(rows: list[dict]) -> list[str]:
    """The issue's goal per model on code_topic: LoRA <= 1% trainable, within 2 points of full, >= 3x less optimizer.

    "Full" is the better scoring of the full fine-tuning rows (recipe and scaled learning rate).
    """
    out = []
    for model in MODELS:
        got = {r["method"]: r for r in rows if r["model"] == model and r["task"] == "code_topic"}
        fulls = [got[n] for n in ("full", "full_lr_scaled") if n in got and got[n]["score"] is not None]
        if not fulls:
            continue
        full = max(fulls, key=lambda r: r["score"])
        for name in ("lora", "lora_r4_head", "lora_r2_head"):
            if name not in got or got[name]["score"] is None:
                continue
            r = got[name]
            gap = 100 * (full["score"] - r["score"])
            ratio = full["optimizer_state_bytes"] / max(r["optimizer_state_bytes"], 1)
            met = r["trainable_pct"] <= 1.0 and gap <= 2.0 and ratio >= 3.0
            out.append(
                f"goal {model} code_topic {name}: {r['trainable_pct']:.2f}% trainable (<= 1%), "
                f"{gap:+.1f} points below {full['method']} (<= 2), optimizer state {ratio:.1f}x smaller (>= 3x): "
                f"{'met' if met else 'not met'}"
            )
    return out


def markdown(rows: list[dict]) -> str:
    """The README's two tables from result rows: ``code_topic`` per model, then the other tasks' metrics."""
    by = {(r["model"], r["task"], r["method"]): r for r in rows}
    names = [n for n in METHODS if any(k[2] == n for k in by)]

    def cells(model: str, task: str, name: str, full: bool) -> list[str]:
        r = by.get((model, task, name))
        if r is None or r["score"] is None:
            return ["–"] * (5 if full else 1)
        score = f"{r['score']:.1f}" if task == "code_qa" else f"{r['score']:.3f}"  # QA F1 is on SQuAD's 0-100
        if not full:
            return [score]
        step = r["median_step_time_s"]
        return [
            f"{r['trainable_pct']:.2f}",
            f"{r['optimizer_state_bytes'] / 1e6:.2f} MB",
            f"{1e3 * step:.0f} ms" if step else "–",
            f"{common.mib(r['peak_rss_bytes'])} MiB",
            score,
        ]

    head = [f"{m.upper()} {c}" for m in MODELS for c in ("trainable %", "Adam state", "step", "peak RSS", "accuracy")]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name in names:
        row = [c for m in MODELS for c in cells(m, "code_topic", name, True)]
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    others = [("bert", "code_tokens", "tokens span F1, BERT"), ("gpt", "code_tokens", "tokens span F1, GPT")]
    others += [("bert", "code_qa", "QA F1 (0-100), BERT"), ("gpt", "code_summary", "summary ROUGE-L, GPT")]
    lines += ["", "| method | " + " | ".join(t for _, _, t in others) + " |", "|---|" + "---:|" * len(others)]
    for name in names:
        if not any((m, t, name) in by for m, t, _ in others):
            continue
        lines.append(f"| `{name}` | " + " | ".join(cells(m, t, name, False)[0] for m, t, _ in others) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
