"""The README quick start's training, timed as a user runs it, and its loss on the whole validation split.

Each variant runs ``jaxlm train --config configs/gpt.py:size=small`` (plus the variant's
overrides) as a fresh process into a new workdir, with the user's default caches (a warm XLA
compilation cache and prepared corpus after the first run, as on a second try; ``--cold`` gives
each run empty ones), and times its wall clock: imports, data, compilation, the steps, the
periodic and final evaluations and the checkpoint, everything but the install. Then
``jaxlm eval`` scores the final checkpoint on the whole validation split (the figure the README
quotes). Variants are ``name:key=value,key=value`` (``name:`` alone is the preset as shipped).

    python bench/quickstart.py                          # the preset
    python bench/quickstart.py --variants 'base:' 'lr3e-3_1000:optim.lr=3e-3,train.num_steps=1000'
    python bench/quickstart.py --parallel 2 --no_time   # losses only, two runs at a time

Figures only; appends rows to ``bench/results/quickstart.json`` (a variant measured again
replaces its row). ``--no_time`` marks rows whose wall time is not a measurement (runs side by side).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxlm.metric_writer import read_metrics  # noqa: E402

CONFIG = os.path.join(common.REPO, "configs", "gpt.py") + ":size=small"
JAXLM = [sys.executable, "-m", "jaxlm"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name:key=value,...`` -> (name, ``--config.key=value`` flags)."""
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--variants: {text!r} has no name before ':'")
    flags = []
    for kv in filter(None, rest.split(",")):
        if "=" not in kv:
            raise SystemExit(f"--variants: {kv!r} in {text!r} is not key=value")
        flags.append(f"--config.{kv}")
    return name, flags


def run_variant(name: str, flags: list[str], root: str, cold: bool) -> dict[str, Any]:
    """Train one variant as a fresh process, then evaluate it on the whole validation split."""
    workdir = os.path.join(root, name)
    env = dict(os.environ)
    if cold:  # empty caches: what a first run on a fresh machine pays
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, f"{name}-xla")
        flags = [*flags, f"--config.data.data_dir={os.path.join(root, f'{name}-data')}"]
    t0 = time.perf_counter()
    train = subprocess.run(
        [*JAXLM, "train", "--config", CONFIG, "--workdir", workdir, "--config.train.progress=false", *flags],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if train.returncode != 0:
        raise SystemExit(f"{name}: jaxlm train exited {train.returncode}: {train.stderr[-1500:]}")
    trainer_evals = [r for r in read_metrics(workdir) if "eval_loss" in r]
    ev = subprocess.run([*JAXLM, "eval", "--workdir", workdir], env=env, capture_output=True, text=True)
    evals = [r for r in read_metrics(workdir) if "eval_loss" in r]  # jaxlm eval appends its record
    if ev.returncode != 0 or len(evals) <= len(trainer_evals):
        raise SystemExit(f"{name}: jaxlm eval exited {ev.returncode}: {ev.stderr[-1500:]}")
    return {
        "variant": name,
        "overrides": [f.removeprefix("--config.") for f in flags],
        "train_wall_s": seconds,
        "steps": evals[-1]["step"],
        "trainer_eval_loss": trainer_evals[-1]["eval_loss"] if trainer_evals else None,
        "whole_split_eval_loss": evals[-1]["eval_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["preset:"], help="name:key=value,key=value ...")
    parser.add_argument("--parallel", type=int, default=1, help="variants run side by side (then times are not)")
    parser.add_argument("--no_time", action="store_true", help="mark the rows' wall times as not measurements")
    parser.add_argument("--cold", action="store_true", help="empty compilation cache and data dir per run")
    parser.add_argument("--out", default=None, help="result path (default bench/results/quickstart.json)")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    machine = common.machine()
    print(common.describe_machine(machine), flush=True)
    timed = not args.no_time and args.parallel == 1
    with tempfile.TemporaryDirectory(prefix="jaxlm-quickstart-") as root:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
            futures = [pool.submit(run_variant, n, f, root, args.cold) for n, f in variants]
            rows = []
            for fut in futures:
                row = fut.result()
                row["wall_time_is_a_measurement"] = timed
                row["cpu"] = machine.get("cpu_model")
                row["cpu_flags"] = machine.get("cpu_flags")
                rows.append(row)
                print(
                    f"  {row['variant']:<24} steps {row['steps']}  train {row['train_wall_s']:6.1f} s"
                    f"{'' if timed else ' (side by side)'}  trainer eval {row['trainer_eval_loss']:.4f}  "
                    f"whole split {row['whole_split_eval_loss']:.4f}",
                    flush=True,
                )
    path = args.out or os.path.join(common.RESULTS, "quickstart.json")
    old = common.read_result("quickstart", path=path) or {}
    kept = [r for r in old.get("rows", []) if r["variant"] not in {r2["variant"] for r2 in rows}]
    print("wrote", common.write_result("quickstart", {"machine": machine, "rows": kept + rows}, path=path))


if __name__ == "__main__":
    main()
