"""Same recipe, same result: nanoGPT's character-level recipe trained by PyTorch and by jaxlm on one text.

The recipe is nanoGPT's CPU "baby GPT" (``train_shakespeare_char`` with the README's CPU flags):
4 layers, 4 heads, 128 wide (MLP 512), block 64, batch 12, no dropout, AdamW lr 1e-3 cosine to
1e-4 after 100 warmup steps, beta2 0.99, weight decay 0.1 on 2-D weights, clip 1.0, 2,000 steps,
biases off (nanoGPT's default; ``--bias`` turns them on for both sides), LM head tied to the
token embedding, GPT-2 initialization.

* PyTorch: bench/torch_baseline.py's nanoGPT model, trained on batches drawn as nanoGPT's
  ``get_batch`` draws them: ``batch`` windows at uniformly random offsets of the token stream.
* jaxlm: ``jaxlm train`` (``jaxlm.main.train.run``) with the same settings on the same text
  (``data.source=files``), reading it as its pipeline does by default for local text
  (``data.packing=auto`` = ``windows``: ``block + 1`` token windows at random offsets, as
  nanoGPT); ``--set data.packing=concat`` reads fixed chunks in order instead.

Both tokenize with jaxlm's byte tokenizer (263 ids; the same ids on both sides) and are
evaluated on the same held-out rows: the first ``--eval_tokens`` tokens of the held-out text
cut into non-overlapping rows of ``block + 1`` tokens, mean cross-entropy per target token,
jaxlm through its own eval step (``jaxlm.main.evaluator.make_eval_fn``). The text is the
built-in corpus (train documents up to ``--train_mb`` MB, validation documents for the held-out
part) or ``--text FILE`` (last 10% held out). Prints both eval losses, the difference and both
wall times (jaxlm's includes compilation and its data pipeline); writes
``bench/results/recipe_parity.json``. Figures only; nothing passes or fails.

    python bench/recipe_parity.py                       # the issue's recipe, 2,000 steps, 1 seed
    python bench/recipe_parity.py --seeds 0,1 --steps 500
    python bench/recipe_parity.py --sides jaxlm --set model.use_bias=true   # one side, extra overrides
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import config_lib  # noqa: E402
from jaxlm.data import sources, tokenizers  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RECIPE = {
    "layers": 4,
    "heads": 4,
    "width": 128,
    "mlp": 512,
    "block": 64,
    "batch": 12,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "warmup": 100,
    "beta2": 0.99,
    "weight_decay": 0.1,
    "clip": 1.0,
}


def corpus(text_file: str, train_mb: float) -> tuple[str, str]:
    """(train text, held-out text): ``text_file`` split 90/10, or the built-in corpus's train/validation files."""
    if text_file:
        with open(text_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        cut = int(len(text) * 0.9)
        return text[:cut], text[cut:]
    cfg = config_lib.validate(config_lib.load_config_file(os.path.join(ROOT, "configs/gpt.py:size=small")))
    splits = sources.open_sources(cfg.data)

    def join(source: Any, limit: int) -> str:
        parts, size = [], 0
        for i in range(len(source)):
            doc = source[i]["text"].decode("utf-8", errors="replace")
            parts.append(doc)
            size += len(doc)
            if size >= limit:
                break
        return "\n".join(parts)

    return join(splits["train"], int(train_mb * 2**20)), join(splits["validation"], 2**20)


def eval_rows(ids: np.ndarray, block: int, eval_tokens: int) -> np.ndarray:
    """Non-overlapping rows of ``block + 1`` tokens from the start of ``ids`` covering ``eval_tokens`` targets."""
    n = min(len(ids) // (block + 1), max(1, eval_tokens // block))
    return ids[: n * (block + 1)].reshape(n, block + 1)


def lr_at(step: int, steps: int, r: dict) -> float:
    """nanoGPT's ``get_lr``: linear warmup, cosine decay to ``min_lr`` at the last step."""
    if step < r["warmup"]:
        return r["lr"] * (step + 1) / (r["warmup"] + 1)
    ratio = (step - r["warmup"]) / max(1, steps - r["warmup"])
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (r["lr"] - r["min_lr"])


def run_torch(train_ids: np.ndarray, rows: np.ndarray, steps: int, seed: int, bias: bool) -> dict:
    """nanoGPT's training loop (random-offset windows) and the held-out loss."""
    import torch
    from torch_baseline import VOCAB, NanoGPT, make_adamw

    r = RECIPE
    torch.manual_seed(seed)
    model = NanoGPT(VOCAB, r["block"], r["layers"], r["width"], r["heads"], r["mlp"], bias=bias)
    params = [p for p in model.parameters() if p.requires_grad]  # the tied weight once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": r["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = make_adamw(groups, r["lr"], r["weight_decay"], betas=(0.9, r["beta2"]))
    data = torch.from_numpy(train_ids.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, r)
        ix = torch.randint(len(data) - r["block"] - 1, (r["batch"],), generator=gen)
        x = torch.stack([data[i : i + r["block"]] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + r["block"]] for i in ix])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = torch.from_numpy(rows[start : start + 64].astype(np.int64))
            total += float(model(chunk[:, :-1], chunk[:, 1:], reduction="sum"))
            count += chunk[:, 1:].numel()
    return {"eval_loss": total / count, "seconds": seconds, "final_train_loss": float(loss.detach())}


def jaxlm_config(train_file: str, eval_file: str, steps: int, seed: int, bias: bool, extra: dict) -> Any:
    r = RECIPE
    c = config_lib.load_config_file(os.path.join(ROOT, "configs/gpt.py:size=small"))
    overrides = {
        "model.num_layers": r["layers"],
        "model.num_heads": r["heads"],
        "model.embed_dim": r["width"],
        "model.mlp_dim": r["mlp"],
        "model.max_len": r["block"],
        "model.dropout_rate": 0.0,
        "model.use_bias": bias,
        "model.tie_embeddings": True,
        "data.source": "files",
        "data.files": train_file,
        "data.eval_files": eval_file,
        "data.tokenizer": "byte",
        "data.seq_len": r["block"],
        "data.batch_size": r["batch"],
        "optim.lr": r["lr"],
        "optim.min_lr_ratio": r["min_lr"] / r["lr"],
        "optim.warmup_steps": r["warmup"],
        "optim.schedule": "cosine",
        "optim.b2": r["beta2"],
        "optim.weight_decay": r["weight_decay"],
        "optim.clip_norm": r["clip"],
        "train.num_steps": steps,
        "train.eval_every": 0,
        "train.progress": False,
        "seed": seed,
        "data.seed": seed,
    }
    config_lib.apply_overrides(c, {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in overrides.items()})
    config_lib.apply_overrides(c, extra)
    return config_lib.validate(c)


def run_jaxlm(config: Any, workdir: str, rows: np.ndarray) -> dict:
    """``jaxlm train`` and the held-out loss of the trained parameters through jaxlm's eval step."""
    import jax
    from flax import linen as nn

    from jaxlm import evaluation
    from jaxlm.main import evaluator, restore, train

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out = train.run(config, workdir)
    seconds = time.perf_counter() - t0
    exp, params, _, _ = restore.open_trained(config, workdir)
    pairs = []
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        eval_fn = evaluator.make_eval_fn(exp)
        for start in range(0, len(rows) - len(rows) % 12, 12):  # whole batches of the trained shape
            chunk = rows[start : start + 12]
            batch = {
                "inputs": chunk[:, :-1].astype(np.int32),
                "targets": chunk[:, 1:].astype(np.int32),
                "weights": np.ones(chunk[:, 1:].shape, np.float32),
            }
            pairs.append(jax.device_get(eval_fn(params, batch)[0]))
    metrics = evaluation.reduce(pairs)
    return {"eval_loss": float(metrics["loss"]), "seconds": seconds, "final_train_loss": out.get("loss")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="", help="train on this text file (last 10%% held out) instead of the corpus")
    p.add_argument("--train_mb", type=float, default=8.0, help="built-in corpus: MB of train documents")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", default="0")
    p.add_argument("--eval_tokens", type=int, default=65536)
    p.add_argument("--bias", action="store_true", help="biases in Linear/LayerNorm on both sides (nanoGPT: off)")
    p.add_argument("--sides", default="torch,jaxlm")
    p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], help="extra jaxlm config override KEY=VALUE")
    p.add_argument("--root", default="", help="workdirs and text files (default: a temp dir)")
    args = p.parse_args()
    extra = common.parse_overrides(args.set)
    m0 = common.machine()
    print(common.describe_machine(m0), flush=True)
    root = args.root or tempfile.mkdtemp(prefix="recipe-parity-")
    os.makedirs(root, exist_ok=True)
    train_text, eval_text = corpus(args.text, args.train_mb)
    train_file, eval_file = os.path.join(root, "train.txt"), os.path.join(root, "eval.txt")
    for path, text in ((train_file, train_text), (eval_file, eval_text)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    tok = tokenizers.build("byte")
    train_ids = np.concatenate([tok.encode(train_text), [tok.eos_id]]).astype(np.int32)
    rows = eval_rows(np.concatenate([tok.encode(eval_text), [tok.eos_id]]).astype(np.int32), 64, args.eval_tokens)
    print(
        f"text: {len(train_ids):,} train tokens, {rows.shape[0]} held-out rows of {rows.shape[1]} "
        f"({rows.shape[0] * (rows.shape[1] - 1):,} targets); recipe {RECIPE}, {args.steps} steps, "
        f"bias={args.bias}, jaxlm overrides {extra or 'none'}",
        flush=True,
    )
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row: dict = {"seed": seed}
        for side in args.sides.split(","):
            if side == "torch":
                if args.torch_threads:
                    import torch

                    torch.set_num_threads(args.torch_threads)
                row["torch"] = run_torch(train_ids, rows, args.steps, seed, args.bias)
            elif side == "jaxlm":
                cfg = jaxlm_config(train_file, eval_file, args.steps, seed, args.bias, extra)
                row["jaxlm"] = run_jaxlm(cfg, os.path.join(root, f"jaxlm-seed{seed}"), rows)
            else:
                raise SystemExit(f"--sides: {side!r} is not one of torch, jaxlm")
            r = row[side]
            print(f"seed {seed} {side:6s} eval loss {r['eval_loss']:.4f} nats/token  {r['seconds']:.0f}s", flush=True)
        if "torch" in row and "jaxlm" in row:
            row["delta"] = row["jaxlm"]["eval_loss"] - row["torch"]["eval_loss"]
            row["time_ratio"] = row["jaxlm"]["seconds"] / row["torch"]["seconds"]
            print(f"seed {seed} jaxlm - torch: {row['delta']:+.4f} nats, wall time ratio {row['time_ratio']:.2f}")
        results.append(row)
    path = common.write_result(
        "recipe_parity",
        {"machine": m0, "machine_after": common.machine(), "recipe": RECIPE, "args": vars(args), "runs": results},
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
