"""Sharded training == single-device training, and what each mesh saves per device.

For each mesh, trains the tiny GPT (8 heads, vocab padded to 264) for 20 steps on 8 simulated
CPU devices and prints: the largest relative difference of its losses from a run on one device,
the parameter + optimizer bytes held per device and their ratio to the single-device run, and
the median step time. Figures only; nothing passes or fails.

    python bench/sharding.py
    python bench/sharding.py --steps 20 --meshes 'data=8;fsdp=8;tensor=8;data=2,fsdp=2,tensor=2'
    python bench/sharding.py --position learned   # learned positions stay replicated over tensor
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

_DEVICES = 8
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import config_lib, sharding  # noqa: E402
from jaxlm.main import experiment, train  # noqa: E402
from jaxlm.metric_writer import read_metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MESHES = "data=8;fsdp=8;tensor=8;data=2,fsdp=2,tensor=2"


def write_corpus(directory: str, num_docs: int = 16) -> str:
    """A small deterministic text corpus; returns its glob."""
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plump kites".split()
    for i in range(num_docs):
        lines = [" ".join(rng.choice(words, size=int(rng.integers(5, 15)))) for _ in range(60)]
        with open(os.path.join(directory, f"doc{i:02d}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return os.path.join(directory, "*.txt")


def make_config(files: str, data_dir: str, mesh: dict[str, int], steps: int, position: str) -> config_lib.Config:
    """The tiny GPT with 8 heads and a vocabulary divisible by 8, on the given mesh."""
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "gpt.py") + ":size=tiny")
    c.model.num_heads = 8
    c.model.vocab_size = 264  # the byte tokenizer's 263, padded to a multiple of 8
    c.model.position = position
    c.data.source = "files"
    c.data.files = files
    c.data.data_dir = data_dir
    c.data.document = "line"
    c.data.batch_size = 8
    c.train.num_steps = steps
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_steps = 1
    c.train.progress = False
    c.checkpoint.every_steps = steps
    c.checkpoint.async_save = False
    for axis in ("data", "fsdp", "tensor", "sequence"):
        c.mesh.shape[axis] = mesh.get(axis, 1)
    return config_lib.validate(c)


@contextlib.contextmanager
def on_devices(devices: list) -> object:
    """Build every mesh over ``devices`` only (e.g. one device for the baseline)."""
    original = sharding.make_mesh
    sharding.make_mesh = lambda cfg, devs=None: original(cfg, devices)
    try:
        yield
    finally:
        sharding.make_mesh = original


def parse_mesh(text: str) -> dict[str, int]:
    """``'data=2,fsdp=4'`` -> ``{'data': 2, 'fsdp': 4}``."""
    out = {}
    for part in text.split(","):
        name, value = part.split("=")
        out[name.strip()] = int(value)
    return out


def measure(cfg: config_lib.Config, workdir: str) -> dict[str, object]:
    """Train ``cfg``; its losses, per-device state bytes and median step time."""
    train.run(cfg, workdir, stream=io.StringIO())
    records = [r for r in read_metrics(workdir) if "loss" in r]
    exp = experiment.build(cfg, 263)
    state = experiment.init_state(exp, cfg.seed)
    per_device = sharding.bytes_per_device(state)
    return {
        "losses": np.array([r["loss"] for r in records]),
        "bytes": max(per_device.values()),
        "step_s": float(np.median([r["step_time_s"] for r in records[1:]])),
        "mesh": dict(exp.mesh.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--meshes", default=DEFAULT_MESHES, help="';'-separated meshes, e.g. 'data=8;fsdp=8'")
    parser.add_argument("--position", default="rope", help="rope (no position parameters) or learned")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, steps={args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "corpus"))
        files = write_corpus(os.path.join(tmp, "corpus"))
        data_dir = os.path.join(tmp, "datasets")
        t0 = time.perf_counter()
        with on_devices(jax.devices()[:1]):
            base = measure(make_config(files, data_dir, {}, args.steps, args.position), os.path.join(tmp, "one"))
        print(
            f"1 device: {base['bytes']:,} param+opt bytes, step {base['step_s'] * 1e3:.1f} ms "
            f"({time.perf_counter() - t0:.1f}s incl. compile)"
        )
        header = f"{'mesh':<26} {'max rel loss diff':>17} {'bytes/device':>13} {'1-dev ratio':>11} "
        print(header + f"{'fsdp*tensor':>11} {'step ms':>8}")
        for i, text in enumerate(args.meshes.split(";")):
            mesh = parse_mesh(text)
            m = measure(make_config(files, data_dir, mesh, args.steps, args.position), os.path.join(tmp, f"m{i}"))
            rel = float(np.max(np.abs(m["losses"] - base["losses"]) / np.abs(base["losses"])))
            ratio = base["bytes"] / m["bytes"]
            product = mesh.get("fsdp", 1) * mesh.get("tensor", 1)
            print(f"{text:<26} {rel:>17.2e} {m['bytes']:>13,} {ratio:>11.2f} {product:>11} {m['step_s'] * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
