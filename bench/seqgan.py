"""The SeqGAN synthetic-oracle experiment: reference points, MLE pre-training, short adversarial phases.

    python bench/seqgan.py                       # figures -> bench/results/seqgan.json
    python bench/seqgan.py --adv_minutes 15      # wall-clock budget of each adversarial phase
    python bench/seqgan.py --sweep               # + temperature sweep 0.5..1.5: table + PNG

Setting (configs/seqgan.py:data=oracle): 10,000 oracle samples of length 20 (vocabulary 5,000)
as training data, SeqGAN's LSTM generator (E = H = 32, Adam 0.01, batch 64, clip 5.0), and
NLL_oracle = the oracle's mean per-token NLL of 10,000 generator samples. Printed:

1. reference points: the oracle's own samples (its entropy rate, published ~5.75), uniform
   tokens (~11.43), i.i.d. tokens from the training data's unigram distribution (~10.3);
2. NLL_oracle of the MLE generator after 1 / 6 / 11 / 31 pre-training epochs, which the
   reference code logs as its epochs 0 / 5 / 10 / 30 (published ~10.17 / 9.43 / 9.24 / 9.13);
3. SeqGAN and Gumbel-softmax adversarial phases, each starting from that 30-epoch MLE
   generator and stopped after ``--adv_minutes`` of wall time, with NLL_oracle every few rounds
   (the curve) and whether the last value is below the MLE generator's;
4. with ``--sweep``: NLL_oracle (quality) and NLL_test (diversity: G's NLL of held-out oracle
   data) of the MLE and both GAN generators sampled at temperatures 0.5 .. 1.5, as in
   "Language GANs Falling Short" (Caccia et al., ICLR 2020).

Everything runs through the program's own pieces (``jaxlm.main.gan``: the same models, steps,
shardings and schedule as ``jaxlm train``). Figures only: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import config_lib  # noqa: E402
from jaxlm.main import gan  # noqa: E402
from jaxlm.models.gan import oracle as oracle_model  # noqa: E402
from jaxlm.steps import gan as gan_steps  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = {"oracle": 5.75, "uniform": 11.43, "unigram": 10.31, 0: 10.17, 5: 9.43, 10: 9.24, 30: 9.13}


def _config(mode: str, overrides: dict[str, str]) -> config_lib.Config:
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "seqgan.py") + f":data=oracle,mode={mode}")
    c.train.progress = False
    c.train.compile_cache_dir = "none"
    config_lib.apply_overrides(c, overrides)
    return config_lib.validate(c)


class Runner:
    """One GAN state driven step by step with the program's compiled updates."""

    def __init__(self, config: config_lib.Config, data: gan.Data, schedule: gan.Schedule) -> None:
        self.config, self.data, self.schedule = config, data, schedule
        self.gan = gan.build(config, data.vocab_size, data.start_id, schedule.pretrain_g)
        repl = jax.sharding.NamedSharding(self.gan.mesh, jax.sharding.PartitionSpec())
        batch_sharding = {"tokens": jax.sharding.NamedSharding(self.gan.mesh, jax.sharding.PartitionSpec(("data",)))}
        self.fns = {
            kind: jax.jit(
                fn,
                donate_argnums=0,
                in_shardings=(self.gan.state_shardings, batch_sharding, repl),
                out_shardings=(self.gan.state_shardings, repl),
            )
            for kind, fn in gan.step_functions(self.gan, config).items()
        }
        self.batches = gan.oracle_sequences.SequenceBatches(data.train, config.data.batch_size, config.data.seed)
        self.state = gan.init_state(self.gan, config.seed)
        self.step = 0
        self.oracle = gan._oracle_params()
        self._sample = jax.jit(
            lambda p, k, t: gan_steps.sample_tokens(self.gan.gen, p, k, 10_000, temperature=t), static_argnums=(2,)
        )
        self._oracle_nll = jax.jit(oracle_model.nll)
        self._test_nll = jax.jit(
            lambda p, x, t: jnp.mean(
                -jnp.take_along_axis(
                    jax.nn.log_softmax(self.gan.gen.logits(p, self.gan.gen.inputs(x)) / t, axis=-1), x[..., None], -1
                )
            )
        )

    def run(self, steps: int) -> dict[str, float]:
        """``steps`` global steps of the schedule; returns the last step's metrics."""
        metrics: dict[str, float] = {}
        for _ in range(steps):
            kind = self.schedule.kind(self.step)
            temp = jnp.asarray(gan._temperature(self.config, self.schedule, self.step), jnp.float32)
            self.state, m = self.fns[kind](self.state, next(self.batches), temp)
            self.step += 1
            metrics = m
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def nll_oracle(self, temperature: float = 1.0, seed: int = 7) -> float:
        samples = self._sample(self.state.g_params, jax.random.key(seed), temperature)
        return float(self._oracle_nll(self.oracle, samples))

    def nll_test(self, temperature: float = 1.0) -> float:
        return float(self._test_nll(self.state.g_params, jnp.asarray(self.data.test), temperature))


def reference_points(data: gan.Data) -> dict[str, float]:
    params = gan._oracle_params()
    nll = jax.jit(oracle_model.nll)
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, data.vocab_size, data.train.shape)
    counts = np.bincount(data.train.reshape(-1), minlength=data.vocab_size)
    unigram = rng.choice(data.vocab_size, size=data.train.shape, p=counts / counts.sum())
    return {
        "oracle": float(nll(params, jnp.asarray(data.train))),
        "uniform": float(nll(params, jnp.asarray(uniform))),
        "unigram": float(nll(params, jnp.asarray(unigram))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--epochs", type=int, default=31, help="MLE pre-training epochs (31 = the reference's epoch 30)"
    )
    parser.add_argument("--adv_minutes", type=float, default=15.0, help="wall-clock budget of each adversarial phase")
    parser.add_argument("--modes", default="seqgan,gumbel", help='adversarial modes ("": MLE only)')
    parser.add_argument("--eval_rounds", type=int, default=5, help="NLL_oracle every this many adversarial rounds")
    parser.add_argument("--sweep", action="store_true", help="temperature sweep 0.5..1.5 with table and PNG")
    parser.add_argument("--set", action="append", default=[], help="config override for the adversarial phases")
    args = parser.parse_args()
    overrides = common.parse_overrides(args.set)
    m0 = common.machine()
    print(common.describe_machine(m0), flush=True)
    result: dict = {"published": PUBLISHED, "overrides": overrides}

    # ---- Data and reference points.
    base = _config("seqgan", {"gan.pretrain_g_epochs": str(args.epochs)})
    t0 = time.perf_counter()
    data = gan.load_data(base, "/tmp/unused-workdir", stream=sys.stdout)
    refs = reference_points(data)
    result["reference"] = refs
    print(f"data: {len(data.train)} train / {len(data.test)} test oracle samples ({time.perf_counter() - t0:.1f}s)")
    for k in ("oracle", "uniform", "unigram"):
        print(f"  NLL_oracle of {k:8s} tokens: {refs[k]:.3f}   (published ~{PUBLISHED[k]})", flush=True)

    # ---- MLE pre-training, NLL_oracle at epochs 0 / 5 / 10 / ... / epochs.
    schedule = gan.Schedule.from_config(base, len(data.train) // base.data.batch_size)
    per_epoch = len(data.train) // base.data.batch_size
    mle = Runner(base, data, gan.Schedule(schedule.pretrain_g, 0, 1, 1, 0))
    # The reference code evaluates after each epoch's training and prints that epoch's index, so
    # its "epoch 0 / 5 / 10 / 30" are 1 / 6 / 11 / 31 epochs trained; both are printed.
    curve = {}
    t0 = time.perf_counter()
    for trained in range(args.epochs + 1):
        if trained in (0, 1, 6, 11, 21, 31) or trained == args.epochs:
            curve[trained] = mle.nll_oracle()
            index = trained - 1
            note = f"(published ~{PUBLISHED[index]} at the reference's epoch {index})" if index in PUBLISHED else ""
            took = time.perf_counter() - t0
            print(f"  MLE, {trained:3d} epochs trained: NLL_oracle {curve[trained]:.3f} {note}  [{took:.0f}s]")
            sys.stdout.flush()
        if trained < args.epochs:
            mle.run(per_epoch)
    result["mle"] = {str(k): v for k, v in curve.items()}
    result["mle_nll_test"] = mle.nll_test()
    mle_params = jax.device_get(mle.state.g_params)
    mle_opt = jax.device_get(mle.state.g_opt_state)
    start_nll = curve[args.epochs]

    # ---- Adversarial phases from the MLE generator, each under a wall-clock budget.
    gans = {}
    for mode in [m for m in args.modes.split(",") if m]:  # --modes "" : MLE only
        cfg = _config(mode, {"gan.pretrain_g_epochs": str(args.epochs)} | overrides)
        runner = Runner(cfg, data, gan.Schedule.from_config(cfg, per_epoch))
        # Continue from the MLE state as the program would (G, its AdamW state, the step counter),
        # skipping the schedule's MLE steps; D starts fresh, the rollout copy equals G.
        sh = runner.gan.state_shardings
        runner.state = runner.state.replace(
            step=jax.device_put(jnp.asarray(runner.schedule.pretrain_g, jnp.int32), sh.step),
            g_params=jax.device_put(mle_params, sh.g_params),
            rollout_params=jax.device_put(mle_params, sh.rollout_params),
            g_opt_state=jax.device_put(mle_opt, sh.g_opt_state),
        )
        runner.step = runner.schedule.pretrain_g
        runner.batches.set_state(mle.batches.get_state())
        g = cfg.gan
        print(
            f"{mode}: {g.loss} loss, {g.discriminator} D, D pre-training {g.pretrain_d_steps} x {g.d_epochs}, "
            f"rounds of {g.g_steps} G + {g.d_steps} D x {g.d_epochs}, rollouts {g.num_rollouts}, adv G lr {g.adv_g_lr}",
            flush=True,
        )
        t0 = time.perf_counter()
        runner.run(runner.schedule.pretrain_d)
        print(f"  D pre-training: {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        points = [(0, start_nll, 0.0)]
        rounds = 0
        round_len = g.g_steps + g.d_steps
        while rounds < g.adv_rounds and time.perf_counter() - t0 < args.adv_minutes * 60:
            metrics = runner.run(round_len)
            rounds += 1
            if rounds % args.eval_rounds == 0:
                points.append((rounds, runner.nll_oracle(), time.perf_counter() - t0))
                print(
                    f"  round {rounds:4d}: NLL_oracle {points[-1][1]:.3f}"
                    f"  d_loss {metrics.get('d_loss', float('nan')):.3f}"
                    f"  [{points[-1][2]:.0f}s]",
                    flush=True,
                )
        if points[-1][0] != rounds:
            points.append((rounds, runner.nll_oracle(), time.perf_counter() - t0))
        final = points[-1][1]
        verdict = "BELOW" if final < start_nll else "NOT below"
        print(
            f"  {mode}: {rounds} rounds in {points[-1][2]:.0f}s: "
            f"NLL_oracle {start_nll:.3f} -> {final:.3f} ({verdict} MLE)"
        )
        gans[mode] = runner
        result[mode] = {
            "rounds": rounds,
            "seconds": points[-1][2],
            "curve": points,
            "start": start_nll,
            "final": final,
            "below_mle": final < start_nll,
            "config": {k: v for k, v in vars(cfg.gan).items() if not k.startswith("_")},
        }

    # ---- Temperature sweep: quality (NLL_oracle) against diversity (NLL_test).
    if args.sweep:
        temps = [0.5, 0.75, 1.0, 1.25, 1.5]
        sweep = {}
        print("temperature sweep: NLL_oracle (quality, lower better) / NLL_test (diversity, lower better)")
        for name, runner in [("MLE", mle)] + [(m, r) for m, r in gans.items()]:
            rows = [(t, runner.nll_oracle(t), runner.nll_test(t)) for t in temps]
            sweep[name] = rows
            print(f"  {name:7s} " + "  ".join(f"T={t:.2f}: {q:.2f}/{d:.2f}" for t, q, d in rows), flush=True)
        result["sweep"] = sweep
        _plot(sweep, os.path.join(common.RESULTS, "seqgan_sweep.png"))
    result["machine_after"] = common.machine()
    print("wrote", common.write_result("seqgan", result | {"machine": m0}))


def _plot(sweep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, rows in sweep.items():
        t, q, d = zip(*rows)
        ax.plot(d, q, marker="o", label=name)
        for ti, qi, di in rows:
            if ti in (0.5, 1.0, 1.5):
                ax.annotate(f"T={ti}", (di, qi), fontsize=7)
    ax.set_xlabel("NLL_test (diversity / coverage; lower is better)")
    ax.set_ylabel("NLL_oracle (quality; lower is better)")
    ax.set_title("SeqGAN oracle: temperature sweep 0.5-1.5")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
