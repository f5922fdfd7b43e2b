"""Input-pipeline throughput per objective, against the tokens/s the ``small`` GPT train step consumes.

Prepares the built-in corpus (this Python's standard library, ``sources.builtin_files()``)
into a temporary data_dir, then, with the byte tokenizer at the ``small`` GPT shape
(seq_len 128, batch 16, the pipeline's default background prefetch, no worker processes),
times each objective's batches after the first: causal_lm (concat and first_fit packing),
masked_lm, nsp, span_corruption, seq2seq and classification (records derived from the
corpus: each blank-line paragraph cut in half as source/target, or labelled by its length's
parity). Last it trains ``configs/gpt.py:size=small`` for a few steps in a temporary workdir
and reads ``tokens_per_s`` from its metrics. Prints positions/s (batch x seq_len per second,
what the train step's ``tokens_per_s`` counts), non-padding input tokens/s, and each
objective's ratio to the train step. Figures only; nothing passes or fails on time.

    python bench/data.py
    python bench/data.py --batches 300 --train_steps 30
    python bench/data.py --skip_train --seq_len 512 --batch_size 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from typing import Any

import numpy as np

from jaxlm.data import pipeline, sources, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (objective, options, which prepared corpus: documents are whole files or paragraphs)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "causal_lm concat": ("causal_lm", {"packing": "concat"}, "file"),
    "causal_lm packed": ("causal_lm", {"packing": "first_fit"}, "file"),
    "masked_lm": ("masked_lm", {}, "file"),
    "nsp": ("nsp", {}, "file"),
    "span_corruption": ("span_corruption", {}, "file"),
    "seq2seq": ("seq2seq", {}, "paragraph"),
    "classification": ("classification", {"labels": (0, 1)}, "paragraph"),
}


class DerivedRecords:
    """Seq2seq or classification records made from text documents (for throughput only)."""

    def __init__(self, source: Any, kind: str) -> None:
        self.source, self.kind = source, kind

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        text = self.source[index]["text"]
        if self.kind == "seq2seq":
            half = len(text) // 2
            return {"source": text[:half], "target": text[half:]}
        return {"text": text, "label": len(text) % 2}


def time_objective(
    objective: str, source: Any, options: dict[str, Any], *, seq_len: int, batch_size: int, batches: int
) -> tuple[float, float]:
    """(positions/s, non-padding input tokens/s) over ``batches`` batches after the first."""
    tok = tokenizers.ByteTokenizer()
    ds = pipeline.objective_builder(objective)(
        source, tok, seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=True, **options
    )
    it = iter(ds)
    next(it)  # start-up: threads, first reads
    real = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        real += int((batch["inputs"] != tok.pad_id).sum())
    elapsed = time.perf_counter() - t0
    return batches * batch_size * seq_len / elapsed, real / elapsed


def train_tokens_per_s(data_dir: str, steps: int) -> float:
    """``tokens_per_s`` of the last logged interval of a short ``configs/gpt.py:size=small`` run."""
    from jaxlm import config_lib
    from jaxlm.main import train

    c = config_lib.load_config_file(os.path.join(REPO, "configs", "gpt.py") + ":size=small")
    c.data.data_dir = data_dir
    c.train.num_steps = steps
    c.train.log_every = max(1, steps // 3)
    c.train.eval_every = 0
    c.train.eval_steps = 1
    c.train.progress = False
    c.checkpoint.every_steps = steps
    with tempfile.TemporaryDirectory() as workdir:
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = train.run(config_lib.validate(c), os.path.join(workdir, "run"), stream=io.StringIO())
    return float(metrics["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="timed batches per objective")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=30)
    parser.add_argument("--skip_train", action="store_true", help="skip the train-step measurement")
    args = parser.parse_args()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as data_dir:
        files = sources.builtin_files()
        t0 = time.perf_counter()
        prepared = {
            document: sources.prepare_text_files(files, [], document, 0.05, data_dir)["train"]
            for document in ("file", "paragraph")
        }
        print(
            f"built-in corpus: {len(files)} files -> {len(prepared['file'])} file documents, "
            f"{len(prepared['paragraph'])} paragraphs (prepared in {time.perf_counter() - t0:.1f}s); "
            f"byte tokenizer, seq_len {args.seq_len}, batch {args.batch_size}, {args.batches} batches each"
        )
        results = {}
        for name, (objective, options, document) in CASES.items():
            source = prepared[document]
            if objective in ("seq2seq", "classification"):
                source = DerivedRecords(source, objective)
            results[name] = time_objective(
                objective, source, options, seq_len=args.seq_len, batch_size=args.batch_size, batches=args.batches
            )
        train_rate = None if args.skip_train else train_tokens_per_s(data_dir, args.train_steps)

    if train_rate is not None:
        print(f"train step (configs/gpt.py:size=small, {args.train_steps} steps): {train_rate:,.0f} tokens/s")
    print(f"{'objective':<18} {'positions/s':>12} {'real tokens/s':>14} {'x train step':>13}")
    for name, (positions, real) in results.items():
        ratio = f"{positions / train_rate:12.1f}x" if train_rate else f"{'-':>13}"
        print(f"{name:<18} {positions:12,.0f} {real:14,.0f} {ratio}")
    if train_rate is not None:
        worst = min(results, key=lambda n: results[n][0])
        print(f"slowest: {worst} at {results[worst][0] / train_rate:.1f}x the train step (the issue asks for >= 5x)")
    load = "/".join(f"{x:.1f}" for x in load_before) + " -> " + "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average (1/5/15 min) {load}: other work on the machine skews every figure")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
