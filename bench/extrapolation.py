"""Length extrapolation: GPTs trained at length 128, perplexity at 128 .. 1024 (``jaxlm eval --lengths``).

Six GPTs that differ only in their positions are trained on the built-in corpus
(``data.source=builtin``, byte tokenizer) at ``seq_len = max_len = 128`` with the same seed,
data order and steps: ``learned``, ``sinusoidal``, ``rope``, ``rope`` + ``linear`` and
``rope`` + ``yarn`` RoPE scaling (both with ``rope_scaling_factor = 1024 / 128 = 8`` and
``rope_original_max_len = 128``, applied from the start of training, since a workdir's model
config is fixed), and ``alibi``. Each is then evaluated by ``jaxlm.main.evaluate.run_lengths``
on non-overlapping validation rows of each length: the first ``--eval_tokens`` tokens of the
validation split (``ceil(eval_tokens / (16 L))`` batches of 16 rows), so every length and every
model reads the same text; only the context each token sees changes. Learned positions have no embedding past 128: those
cells are "n/a". The size is configs/gpt.py's ``small`` (4 layers, 4 heads, 128 wide) unless
``--size`` says otherwise.

Prints a Markdown table of perplexities (rows: position, columns: evaluation length) and
writes every figure to ``bench/results/extrapolation.json``. Figures only; nothing passes or
fails.

    python bench/extrapolation.py                      # 600 steps per model
    python bench/extrapolation.py --size tiny --steps 300   # the README table
    python bench/extrapolation.py --steps 100 --lengths 128,256 --root /tmp/extrapolation

A workdir under ``--root`` that already holds the final checkpoint is not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import time

from jaxlm import config_lib
from jaxlm.common_types import UserError
from jaxlm.main import evaluate, train

TRAIN_LEN = 128
# name -> model overrides
VARIANTS: dict[str, dict[str, object]] = {
    "learned": {"position": "learned"},
    "sinusoidal": {"position": "sinusoidal"},
    "rope": {"position": "rope"},
    "rope+linear": {"position": "rope", "rope_scaling": "linear"},
    "rope+yarn": {"position": "rope", "rope_scaling": "yarn"},
    "alibi": {"position": "alibi"},
}


def make_config(variant: str, args: argparse.Namespace) -> config_lib.Config:
    c = config_lib.load_config_file(f"configs/gpt.py:size={args.size}")
    for key, value in VARIANTS[variant].items():
        c.model[key] = value
    if c.model.rope_scaling != "none":
        c.model.rope_scaling_factor = max(int(x) for x in args.lengths.split(",")) / TRAIN_LEN
        c.model.rope_original_max_len = TRAIN_LEN
    c.model.max_len = TRAIN_LEN
    c.data.seq_len = TRAIN_LEN
    c.data.source = "builtin"
    c.data.tokenizer = "byte"
    c.data.batch_size = 16
    c.train.num_steps = args.steps
    c.train.eval_every = 0
    c.train.progress = False
    c.checkpoint.async_save = False
    return config_lib.validate(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lengths", default="128,256,512,1024")
    parser.add_argument("--size", default="small")
    parser.add_argument("--eval_tokens", type=int, default=32768, help="validation tokens read at every length")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--root", default="runs/extrapolation")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "extrapolation.json"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    results: dict[str, dict] = {}
    for variant in args.variants.split(","):
        config = make_config(variant, args)
        workdir = os.path.join(args.root, variant.replace("+", "_"))
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            final = train.run(config, workdir)
        trained_s = time.time() - start
        row: dict[str, object] = {"train_loss": final.get("loss") if isinstance(final, dict) else None}
        for n in lengths:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    batches = math.ceil(args.eval_tokens / (16 * n))
                    r = evaluate.run_lengths(config, workdir, [n], max_steps=batches)[n]
                row[str(n)] = {"loss": r["eval_loss"], "perplexity": r["eval_perplexity"], "batches": r["eval_batches"]}
            except UserError as e:  # learned positions past max_len
                row[str(n)] = {"not_applicable": str(e)}
        row["train_seconds"] = round(trained_s, 1)
        results[variant] = row
        print(f"{variant}: trained {args.steps} steps in {trained_s:.0f}s", flush=True)

    header = "| positions | " + " | ".join(f"ppl @ {n}" for n in lengths) + " |"
    print(header)
    print("|---" * (len(lengths) + 1) + "|")
    for variant, row in results.items():
        cells = []
        for n in lengths:
            cell = row[str(n)]
            ppl = cell.get("perplexity")
            cells.append("n/a" if ppl is None else (f"{ppl:.3f}" if math.isfinite(ppl) else "inf"))
        print(f"| {variant} | " + " | ".join(cells) + " |")
    meta = {
        "steps": args.steps,
        "size": args.size,
        "train_len": TRAIN_LEN,
        "batch_size": 16,
        "eval_tokens": args.eval_tokens,
        "corpus": "builtin (byte tokenizer)",
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
