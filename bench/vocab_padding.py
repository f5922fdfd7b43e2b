"""The LM head alone at padded vocabulary sizes: tied projection + slice to the real ids + cross-entropy.

What ``config.model.vocab_multiple`` changes in a train step is the width of the output matmul
(and of its gradient): ``[B*T, D] x [D, Vp]``, then the logits of the real ``V`` ids
(``jaxlm.models.vocab.real_logits``) into the loss. At the quick-start ``small`` shape that head
is ~4% of the step's matmul FLOPs, so a whole-step A/B (``bench/ab.py --a model.vocab_multiple=1
--b model.vocab_multiple=128``) sees its effect within the noise of a shared machine; this times
the head by itself (forward + backward, jitted, exactly the model's ops) for each padded size,
in interleaved rounds, and prints each size's median time over the unpadded one's (median of the
per-round ratios, and their range).

    python bench/vocab_padding.py                      # small: B 16, T 128, D 128, V 263 (bytes)
    python bench/vocab_padding.py --vocab 8000 --multiples 1,8,16,128

Figures only; nothing passes or fails on time. Writes ``bench/results/vocab_padding_v<V>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlm import config_lib, losses  # noqa: E402
from jaxlm.models import vocab  # noqa: E402
from jaxlm.nn.embeddings import Embed  # noqa: E402


def head_step(batch: int, seq: int, dim: int, real: int, multiple: int) -> Callable[[], None]:
    """A jitted value-and-grad of the tied head + loss at ``real`` ids padded to ``multiple``; returns a runner."""
    c = config_lib.base_config()
    c.model.vocab_size, c.model.vocab_multiple, c.model.embed_dim = real, multiple, dim
    cfg = config_lib.validate(c).model
    embed = Embed(cfg.padded_vocab_size, dim)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = embed.init(k1, jnp.zeros((1, 1), jnp.int32))
    x = jax.random.normal(k2, (batch, seq, dim))
    targets = jax.random.randint(k3, (batch, seq), 0, real)

    def loss(p: dict, h: jax.Array) -> jax.Array:
        logits = vocab.real_logits(cfg, embed.apply(p, h, method=Embed.attend))
        return losses.cross_entropy(logits, targets).mean()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(params, x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=263, help="real vocabulary size (263: the byte tokenizer)")
    parser.add_argument("--multiples", default="1,8,16,128", help="config.model.vocab_multiple values; 1 first")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per size per round")
    args = parser.parse_args()
    multiples = [int(m) for m in args.multiples.split(",")]
    if multiples[0] != 1:
        parser.error("--multiples must start with 1 (the unpadded baseline)")
    runners = {m: head_step(args.batch, args.seq, args.dim, args.vocab, m) for m in multiples}
    sizes = {m: -(-args.vocab // m) * m for m in multiples}
    for run in runners.values():
        run()
        run()
    times: dict[int, list[float]] = {m: [] for m in multiples}
    for r in range(args.rounds):
        for m in multiples if r % 2 == 0 else multiples[::-1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                runners[m]()
            times[m].append((time.perf_counter() - t0) / args.steps)
    machine = common.machine()
    print(common.describe_machine(machine), flush=True)
    print(f"LM head + loss, forward + backward: B {args.batch}, T {args.seq}, D {args.dim}, real V {args.vocab}")
    rows = []
    for m in multiples:
        ratios = [t / b for t, b in zip(times[m], times[1])]
        row = {
            "multiple": m,
            "padded_vocab": sizes[m],
            "median_ms": 1e3 * statistics.median(times[m]),
            "ratio_to_unpadded": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        rows.append(row)
        print(
            f"  vocab_multiple {m:>4} -> {sizes[m]:>6} rows: {row['median_ms']:8.2f} ms  "
            f"x{row['ratio_to_unpadded']:.3f} of unpadded (rounds {row['ratio_min']:.3f}-{row['ratio_max']:.3f})",
            flush=True,
        )
    machine["load_average_after"] = common.load_average()
    path = common.write_result(f"vocab_padding_v{args.vocab}", {"machine": machine, "args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
