"""What an eager op costs to compile on XLA:CPU, per set of XLA flags (why the tests compile small programs as they do).

Each variant runs in a fresh process with its own empty compilation cache: ``--shapes`` array
shapes x 4 eager ops (``ones``, multiply, add, sum), every one a program of its own, as test code
that calls models outside ``jit`` dispatches them. Prints seconds per variant and per op, and the
CPU flags. Usage::

    .venv/bin/python bench/eager_compile.py [--shapes 300]

Variants: the tests' level 1 (``tests/conftest.py``); without the MLIR fusion emitters (what
``tests/small_programs.py`` gives programs of at most 1,000 ops); level 0 as well (faster, but it
changes results: ``tests/small_programs_test.py`` fails with it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = {
    "level 1 (the tests')": "--xla_backend_optimization_level=1",
    "level 1, no fusion emitters": "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false",
    "level 0, no fusion emitters": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}

_CHILD = """
import sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.jit(lambda x: x + 1)(0).block_until_ready()  # opens the cache before timing
t = time.perf_counter()
for n in range(1, int(sys.argv[2]) + 1):
    y = (jnp.ones((n, 3)) * 2.0 + 1.0).sum(0)
y.block_until_ready()
print(time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=300, help="array shapes; 4 eager ops each")
    args = parser.parse_args()
    print(f"{common.describe_machine(common.machine())}; {args.shapes} shapes x 4 eager ops")
    for name, flags in VARIANTS.items():
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, cache, str(args.shapes)], env=env, capture_output=True, text=True
            )
        if out.returncode != 0:
            raise SystemExit(f"{name}: {out.stderr.strip().splitlines()[-1]}")
        seconds = float(out.stdout.strip().splitlines()[-1])
        print(f"{name:30} {seconds:6.1f} s  {1000 * seconds / (4 * args.shapes):5.1f} ms per op")


if __name__ == "__main__":
    main()
