"""Pre-training vs training from scratch on the built-in downstream tasks (figures only, never pass/fail).

Pre-trains BERT (masked LM) and GPT (causal LM) on the built-in corpus, then fine-tunes each on
every built-in task from the pre-trained workdir (``config.checkpoint.init_from``) and, with
the same steps and settings, from a random initialization; prints the task metric, steps and
wall time of both, and writes ``bench/results/finetune.json`` with the machine description.

    python bench/finetune.py                       # size=small, the README table
    python bench/finetune.py --size tiny --pretrain_steps 200 --finetune_steps 100   # quick look

Runs go to ``runs/bench-finetune/`` (kept, so a rerun resumes rather than retrains).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxlm import config_lib  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
# task -> (metric reported, higher is better)
TASKS = {
    "code_topic": ("eval_accuracy", True),
    "code_tokens": ("eval_f1", True),
    "code_qa": ("eval_f1", True),
    "code_summary": ("eval_rougeL", True),
}
MODELS = {"bert": ("code_topic", "code_tokens", "code_qa"), "gpt": ("code_topic", "code_tokens", "code_summary")}


def _config(spec: str, overrides: dict[str, str]) -> config_lib.Config:
    c = config_lib.load_config_file(os.path.join(ROOT, spec))
    config_lib.apply_overrides(c, overrides)
    return config_lib.validate(c)


def _run(config: config_lib.Config, workdir: str, earlier_seconds: float | None = None) -> tuple[dict, float | None]:
    """Train (or resume) ``workdir``; its final metrics and the wall seconds of its training.

    A workdir already at its last step is only evaluated again: its seconds are ``earlier_seconds``
    (what an earlier run of this bench measured), or None when unknown.
    """
    from jaxlm import checkpoint
    from jaxlm.main import train

    finished = checkpoint.latest_step(workdir) == config.train.num_steps
    t0 = time.perf_counter()
    out = train.run(config, workdir)
    if "eval_loss" not in out:  # SIGTERM: the run saved a checkpoint and returned without its final eval
        raise SystemExit(f"{workdir}: stopped before its last step (preempted); rerun to resume")
    return out, earlier_seconds if finished else time.perf_counter() - t0


def _earlier(out: str) -> dict[tuple[str, str], dict]:
    """Rows of an earlier result JSON at ``out``, by (model, task)."""
    earlier = common.read_result("finetune", path=out) or {}
    return {(r["model"], r["task"]): r for r in earlier.get("rows", [])}


def _secs(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.0f}s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=("tiny", "small"))
    p.add_argument("--pretrain_steps", type=int, default=0, help="0: the size preset's")
    p.add_argument("--finetune_steps", type=int, default=300)
    p.add_argument("--eval_steps", type=int, default=0, help="validation batches (0: the whole split)")
    p.add_argument("--models", default="bert,gpt")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "finetune.json"))
    args = p.parse_args()
    runs = os.path.join(ROOT, "runs", "bench-finetune", args.size)
    base = {"train.progress": "false", "train.eval_every": "0"}
    # The GPT base of the README's fine-tuning and PEFT tables: the small preset as it was then (1,300
    # steps at lr 2e-3); the quick start's preset has since moved to 1,000 steps at 3e-3.
    recipes = {("gpt", "small"): {"train.num_steps": "1300", "optim.lr": "2e-3"}}
    rows = []
    earlier = _earlier(args.out)
    for model in args.models.split(","):
        pre_over = base | recipes.get((model, args.size), {})
        if args.pretrain_steps:
            pre_over["train.num_steps"] = str(args.pretrain_steps)
        pre_dir = os.path.join(runs, f"{model}-pretrain")
        before = next((r["pretrain_seconds"] for (m, _), r in earlier.items() if m == model), None)
        _, pre_s = _run(_config(f"configs/{model}.py:size={args.size}", pre_over), pre_dir, before)
        for task in MODELS[model]:
            metric, _ = TASKS[task]
            spec = f"configs/finetune.py:task={task},model={model},size={args.size}"
            over = base | {"train.num_steps": str(args.finetune_steps), "train.eval_steps": str(args.eval_steps)}
            result = {"model": model, "task": task, "metric": metric, "steps": args.finetune_steps}
            for start, extra in (("pretrained", {"checkpoint.init_from": pre_dir}), ("scratch", {})):
                before = earlier.get((model, task), {}).get(start, {}).get("seconds")
                out, seconds = _run(_config(spec, over | extra), os.path.join(runs, f"{model}-{task}-{start}"), before)
                result[start] = {"score": out.get(metric), "eval_loss": out.get("eval_loss"), "seconds": seconds}
            result["pretrain_seconds"] = pre_s
            rows.append(result)
            pre, scr = result["pretrained"], result["scratch"]
            print(
                f"{model:4s} {task:13s} {metric:14s} pretrained {pre['score']:.4f} ({_secs(pre['seconds'])})  "
                f"scratch {scr['score']:.4f} ({_secs(scr['seconds'])})  {args.finetune_steps} steps",
                flush=True,
            )
            _write(args, rows)  # after every row: a run stopped part-way keeps what it measured
    print(f"wrote {args.out}")


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"machine": common.machine(), "args": vars(args), "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
