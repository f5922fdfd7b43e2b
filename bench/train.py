"""Train-step throughput, compile time, memory and MFU per model config and compute dtype.

Configs (``--configs``, default ``tiny,baby``, which runs in about a minute on 2 quiet cores;
``all`` adds d512, bert and t5, about 4 minutes): GPTs from ``configs/gpt.py`` with MLP 4x embed,
``tiny`` (4 layers, 4 heads, 128 wide, seq 64, batch 12), ``small`` (``configs/gpt.py:size=small`` as it
is, the README's quick start), ``baby`` (6, 6, 384, seq 256, batch 8),
``d512`` (4, 8, 512, seq 512, batch 8), ``gpt2`` (GPT-2 small: 12, 12, 768, seq 1024, batch 16,
vocabulary 50304, ``dot_product`` attention; for accelerators, not in ``all``); ``bert`` =
``configs/bert.py:size=small``; ``t5`` = ``configs/t5.py:size=small``.

For each config and dtype (``model.dtype``; parameters stay float32) the train step is built
exactly as ``jaxlm.main.train`` builds it (``experiment.build``, ``experiment.init_state``,
then ``jax.jit(lm.train_step partial, donate_argnums=0, in_shardings=, out_shardings=)``,
lowered and compiled ahead of time). One batch goes on the device, made by the config's own
objective pipeline from a synthetic in-memory text source with the byte tokenizer (so its keys,
shapes and dtypes are the trainer's); the steps are timed on that batch: no data pipeline in
the timed loop.

Timing: 2 warm-up steps after compilation, then ``--steps`` steps each followed by
``jax.block_until_ready`` on the new state and metrics (``--sync_once``: time them all and
sync once at the end, as the trainer's loop does between log intervals). Step time is the
median (and the min, the best-of on a shared machine); tokens/s is ``batch * seq_len`` (input
positions, as the trainer counts) over the step time.

FLOPs: ``jaxlm.models.config.flops_per_token(model, seq_len)``, the formula of ``jaxlm info``
and the trainer. For T5 span corruption the targets are shorter than the inputs (U < T) while
the formula assumes one target per input token, so ``t5`` also shows an exact figure
(``flops_per_step_exact``, see ``flops_per_example``) counting the decoder at U targets.

MFU: achieved FLOP/s over (a) the measured matmul peak of the compute dtype from
``bench/results/peak.json`` (run ``bench/peak.py`` first; median step / median peak, and best
step / best peak) and (b) a nominal peak (``--nominal``: cpu = the measured peaks, trainer =
the ``jaxlm.hardware`` entry of this device that ``jaxlm train`` logs against, a preset of that
table (a100, h100, v4, v5e, v5p, v6e; e.g. h100 989e12 bf16 / 494.5e12 TF32), or a number);
and (c) per CPU-second: step FLOPs over the process's CPU time against the matmul's
FLOPs per CPU-second, a figure that other load on a shared machine barely moves. Memory: XLA's
compiled-step estimate (arguments + outputs - donated + temporaries) and
the process's peak RSS during the config (CPU has no jax ``memory_stats``; on GPU/TPU the device
peak is reported instead).

``--restart``: the persistent compilation cache's restart cost. Runs a fresh process that
compiles the step with an empty ``jax_compilation_cache_dir`` (min compile time and entry
size 0), then a second fresh process with that warm cache dir (and, for reference, one with no
cache), and prints the lower / compile / init times, the whole-process wall time and the
warm/cold ratio; writes ``bench/results/restart.json``.

Figures only; nothing passes or fails on time.

    python bench/peak.py && python bench/train.py
    python bench/train.py --configs all --dtypes float32,bfloat16 --steps 20
    python bench/train.py --configs baby --nominal v5e --sync_once
    python bench/train.py --configs baby --set model.remat=dots --set model.scan_layers=true
    python bench/train.py --restart --configs baby
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import config_lib, hardware, sharding  # noqa: E402
from jaxlm.data import pipeline, tokenizers  # noqa: E402
from jaxlm.main import experiment  # noqa: E402
from jaxlm.models import config as model_config  # noqa: E402

# name -> (config file and argument, overrides). GPT shapes use mlp_dim = 4 * embed_dim.
CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    "tiny": (
        "gpt.py:size=tiny",
        {
            "model.num_layers": "4",
            "model.num_heads": "4",
            "model.embed_dim": "128",
            "model.mlp_dim": "512",
            "model.max_len": "64",
            "data.seq_len": "64",
            "data.batch_size": "12",
        },
    ),
    # The README's quick start as configs/gpt.py ships it (its shape, whatever the preset says).
    "small": ("gpt.py:size=small", {}),
    "baby": (
        "gpt.py:size=small",
        {
            "model.num_layers": "6",
            "model.num_heads": "6",
            "model.embed_dim": "384",
            "model.mlp_dim": "1536",
            "model.max_len": "256",
            "data.seq_len": "256",
            "data.batch_size": "8",
        },
    ),
    "d512": (
        "gpt.py:size=small",
        {
            "model.num_layers": "4",
            "model.num_heads": "8",
            "model.embed_dim": "512",
            "model.mlp_dim": "2048",
            "model.max_len": "512",
            "data.seq_len": "512",
            "data.batch_size": "8",
        },
    ),
    # GPT-2 small's shape for accelerators (issue #16 item 6): configs/gpt.py:size=base (12 layers,
    # 12 heads, 768 wide, 3072 MLP, seq 1024), GPT-2's vocabulary padded as nanoGPT pads it (50257 ->
    # 50304; the batch's byte ids use the first 263), no dropout, attention through
    # jax.nn.dot_product_attention (cuDNN flash attention on a GPU at bf16). Far too big for a CPU.
    "gpt2": (
        "gpt.py:size=base",
        {
            "model.vocab_size": "50304",
            "model.dropout_rate": "0.0",
            "model.attention": "dot_product",
            "data.batch_size": "16",
        },
    ),
    "bert": ("bert.py:size=small", {}),  # 4 layers, 4 heads, 256 wide, 1024 MLP, seq 128, batch 16
    "t5": ("t5.py:size=small", {}),  # 4 + 4 layers, 4 heads, 256 wide, 1024 MLP, seq 128, batch 16
}
DEFAULT_CONFIGS = "tiny,baby"  # the default run stays under ~3 minutes on 2 cores; "all" runs every config but gpt2
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plump kites".split()


def make_config(name: str, dtype: str, extra: dict[str, str]) -> config_lib.Config:
    """The validated config ``name`` at compute dtype ``dtype`` (float32 params), plus ``extra`` overrides."""
    spec, overrides = CONFIGS[name]
    c = config_lib.load_config_file(os.path.join(common.REPO, "configs", spec))
    config_lib.apply_overrides(c, {**overrides, "model.dtype": dtype, "model.param_dtype": "float32", **extra})
    return config_lib.validate(c)


def host_batch(config: config_lib.Config, tokenizer: Any) -> dict[str, np.ndarray]:
    """One global batch from the config's objective pipeline over synthetic in-memory documents."""
    rng = np.random.default_rng(0)
    docs = [
        {"text": "\n".join(" ".join(rng.choice(WORDS, size=12)) for _ in range(max(8, config.data.seq_len // 40)))}
        for _ in range(4 * config.data.batch_size)
    ]
    ds = pipeline.objective_builder(config.data.objective)(
        docs,
        tokenizer,
        seq_len=config.data.seq_len,
        batch_size=config.data.batch_size,
        seed=0,
        shuffle=True,
        prefetch=0,
    )
    return next(iter(ds))


def flops_per_example(config: config_lib.Config, cfg: Any, batch: dict[str, np.ndarray]) -> tuple[float, float]:
    """(formula FLOPs per example = T * flops_per_token, exact FLOPs per example).

    They differ only for encoder-decoders whose targets (U) are shorter than the inputs (T). Exact,
    with the formula's accounting (6 FLOPs per weight per token, 12 * keys * D per attention
    sublayer per token): per input token the encoder layers plus the decoder's cross-attention
    key/value projections (they run over the T encoder outputs); per target token the decoder's
    self-attention, cross-attention query/output projections, MLP and LM head; self-attention over
    U keys, cross-attention over T keys.
    """
    t = config.data.seq_len
    formula = t * model_config.flops_per_token(cfg, t)
    if cfg.kind != "encoder_decoder":
        return formula, formula
    u = batch["targets"].shape[1]
    d = cfg.num_heads * cfg.head_dim
    attn, mlp = model_config.attention_params(cfg), model_config.mlp_params(cfg)
    cross_kv = 2 * cfg.embed_dim * model_config.kv_heads(cfg) * cfg.head_dim
    l_enc, l_dec = cfg.num_layers, model_config.decoder_layers(cfg)
    per_input = 6 * (l_enc * (attn + mlp) + l_dec * cross_kv) + 12 * l_enc * t * d
    per_target = 6 * (l_dec * (2 * attn - cross_kv + mlp) + cfg.embed_dim * cfg.vocab_size) + 12 * l_dec * (u + t) * d
    return formula, float(t * per_input + u * per_target)


def build_step(config: config_lib.Config) -> dict[str, Any]:
    """Experiment, initial state, device batch and the compiled train step, as ``jaxlm.main.train`` builds them."""
    tokenizer = tokenizers.build("byte")
    t0 = time.perf_counter()
    exp = experiment.build(config, experiment.model_vocab_size(config, tokenizer.vocab_size))
    state = experiment.init_state(exp, config.seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    batch_np = host_batch(config, tokenizer)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            (config.data.batch_size,) + v.shape[1:],
            v.dtype,
            sharding=sharding.batch_sharding(exp.mesh, exp.rules, v.ndim),
        )
        for k, v in batch_np.items()
    }
    batch_shardings = {k: v.sharding for k, v in abstract_batch.items()}
    repl = sharding.replicated(exp.mesh)
    step_fn = experiment.train_step_fn(exp)
    rng = jax.random.key(config.seed + 1)
    with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
        t0 = time.perf_counter()
        # As the trainer does: the optimizer's numbers are inputs (no frozen base: not a PEFT run).
        hyper = jax.device_put(exp.hyper, repl)
        lowered = jax.jit(
            step_fn,
            donate_argnums=0,
            in_shardings=(exp.state_shardings, batch_shardings, repl, None, repl),
            out_shardings=(exp.state_shardings, repl),
        ).lower(
            exp.abstract_state,
            abstract_batch,
            jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=repl),
            None,
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), hyper),
        )
        lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        batch = sharding.host_to_global(batch_np, exp.mesh, exp.rules)
    return {
        "exp": exp,
        "state": state,
        "batch": batch,
        "batch_np": batch_np,
        "rng": rng,
        "compiled": compiled,
        "step": lambda state, batch, rng: compiled(state, batch, rng, None, hyper),
        "init_s": init_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
    }


def run_steps(built: dict[str, Any], steps: int, *, sync_once: bool) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per step: 2 warm-up steps, then ``steps`` timed ones (see the module docstring)."""
    step, batch, rng = built["step"], built["batch"], built["rng"]
    state = built["state"]
    mesh, rules = built["exp"].mesh, built["exp"].rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for _ in range(2):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times, cpu = [], []
        if sync_once:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                state, metrics = step(state, batch, rng)
            jax.block_until_ready((state, metrics))
            times = [(time.perf_counter() - t0) / steps] * steps
            cpu = [(time.process_time() - c0) / steps] * steps
        else:
            for _ in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                state, metrics = step(state, batch, rng)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    built["state"] = state  # the old buffers were donated
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        print(f"  warning: non-finite loss {loss}", flush=True)
    return times, cpu


def resolve_nominal(text: str, measured: dict[str, float] | None) -> tuple[str, dict[str, float] | None]:
    """``--nominal`` preset or number -> (label, {dtype: FLOP/s})."""
    if text in common.NOMINAL_PEAKS:
        if text == "cpu":
            return "cpu (measured)", measured
        if text == "trainer":  # what `jaxlm train` logs its MFU against on this device
            kind = jax.devices()[0].device_kind
            peaks = {dt: hardware.peak_flops(0.0, kind, dt) for dt in ("float32", "bfloat16", "float16")}
            return f"trainer ({hardware.preset_for(kind)})", peaks if all(peaks.values()) else None
        return text, common.NOMINAL_PEAKS[text]
    value = float(text)
    return f"{value:.3g}", {"float32": value, "bfloat16": value}


def bench_one(
    name: str,
    dtype: str,
    *,
    steps: int,
    sync_once: bool,
    extra: dict[str, str],
    peaks: dict[str, dict[str, float]] | None,
    nominal: dict[str, float] | None,
) -> dict[str, Any]:
    """Figures of one (config, dtype)."""
    config = make_config(name, dtype, extra)
    rss_reset = common.reset_peak_rss()
    built = build_step(config)
    times, cpu = run_steps(built, steps, sync_once=sync_once)
    rss, rss_source = common.peak_rss_bytes()
    if not rss_reset:
        rss_source += ", over the whole process"
    device_peak, device_source = common.device_peak_memory()
    cfg = built["exp"].model_cfg
    tokens = config.data.batch_size * config.data.seq_len
    stats = common.summary(times)
    formula, exact = flops_per_example(config, cfg, built["batch_np"])
    step_flops = formula * config.data.batch_size
    achieved = step_flops / stats["median_s"]
    achieved_best = step_flops / stats["min_s"]
    row: dict[str, Any] = {
        "config": name,
        "dtype": dtype,
        "model": {
            "kind": cfg.kind,
            "layers": cfg.num_layers,
            "heads": cfg.num_heads,
            "embed": cfg.embed_dim,
            "mlp": cfg.mlp_dim,
            "vocab": cfg.vocab_size,
            "max_len": cfg.max_len,
            "dropout": cfg.dropout_rate,
            "params": experiment.param_count(built["exp"].abstract_state.params),
        },
        "seq_len": config.data.seq_len,
        "batch_size": config.data.batch_size,
        "batch_shapes": {k: list(v.shape) for k, v in built["batch_np"].items()},
        "devices": built["exp"].mesh.size,
        "overrides": extra,
        "timing": "sync once after all steps" if sync_once else "block_until_ready after every step",
        "step": stats,
        "step_times_s": times,
        "cpu_s_per_step": statistics.median(cpu),
        "cpu_s_per_step_all": cpu,
        "tokens_per_s": tokens / stats["median_s"],
        "tokens_per_s_best": tokens / stats["min_s"],
        "init_s": built["init_s"],
        "lower_s": built["lower_s"],
        "compile_s": built["compile_s"],
        "flops_per_token": formula / config.data.seq_len,
        "flops_per_step": step_flops,
        "achieved_flops_per_s": achieved,
        "achieved_flops_per_s_best": achieved_best,
        "xla_memory": common.compiled_memory(built["compiled"]),
        "peak_rss_bytes": rss,
        "peak_rss_source": rss_source,
        "device_peak_bytes": device_peak,
        "device_peak_source": device_source,
    }
    if exact != formula:
        row["flops_per_step_exact"] = exact * config.data.batch_size
        row["achieved_flops_per_s_exact"] = exact * config.data.batch_size / stats["median_s"]
    if peaks:
        row["mfu_measured_peak"] = achieved / peaks["median"][dtype]
        row["mfu_measured_peak_best"] = achieved_best / peaks["best"][dtype]
        if exact != formula:
            row["mfu_measured_peak_exact"] = row["achieved_flops_per_s_exact"] / peaks["median"][dtype]
        if peaks.get("per_cpu_s"):
            row["mfu_cpu_time"] = step_flops / row["cpu_s_per_step"] / peaks["per_cpu_s"][dtype]
    if nominal:
        row["mfu_nominal"] = achieved / (nominal[dtype] * row["devices"])
    del built
    return row


def load_peaks(measure: bool) -> dict[str, dict[str, float]] | None:
    """``{'median': {dtype: FLOP/s}, 'best': {...}}`` from bench/results/peak.json, measured if asked."""
    data = common.read_result("peak")
    if data is None and measure:
        subprocess.run([sys.executable, os.path.join(common.REPO, "bench", "peak.py"), "--seconds", "1"], check=True)
        data = common.read_result("peak")
    if data is None:
        return None
    key = {"f32": "float32", "bf16": "bfloat16"}
    return {
        "median": {key[k]: v for k, v in data["peak_by_variant"].items() if k in key},
        "best": {key[k]: v for k, v in data["best_by_variant"].items() if k in key},
        "per_cpu_s": {key[k]: v for k, v in data.get("per_cpu_s_by_variant", {}).items() if k in key},
        "measured_utc": data.get("utc"),
        "load_average": data.get("machine", {}).get("load_average"),
    }


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}%}"


def print_table(rows: list[dict[str, Any]], nominal_label: str) -> None:
    print()
    print(
        f"{'config':<6} {'dtype':<9} {'params':>10} {'tok/s':>7} {'best':>7} {'step ms':>8} {'min ms':>8} "
        f"{'cpu ms':>8} {'compile s':>9} {'GFLOP/s':>7} {'MFU':>6} {'best':>6} {'cpu':>6} {'nominal':>8} "
        f"{'XLA MiB':>7} {'RSS MiB':>7}"
    )
    for r in rows:
        print(
            f"{r['config']:<6} {r['dtype']:<9} {r['model']['params']:>10,} {r['tokens_per_s']:>7,.0f} "
            f"{r['tokens_per_s_best']:>7,.0f} {r['step']['median_s'] * 1e3:>8.1f} {r['step']['min_s'] * 1e3:>8.1f} "
            f"{r['cpu_s_per_step'] * 1e3:>8.1f} {r['lower_s'] + r['compile_s']:>9.2f} "
            f"{r['achieved_flops_per_s'] / 1e9:>7.1f} {pct(r.get('mfu_measured_peak')):>6} "
            f"{pct(r.get('mfu_measured_peak_best')):>6} {pct(r.get('mfu_cpu_time')):>6} "
            f"{pct(r.get('mfu_nominal'), 2):>8} "
            f"{common.mib((r['xla_memory'] or {}).get('total')):>7} {common.mib(r['peak_rss_bytes']):>7}"
        )
    print(
        "tok/s, step ms: median over the timed steps; best, min ms: the fastest step; cpu ms: median process CPU "
        "time per step (all threads). compile s: lower + compile of the step. MFU: median step vs the median "
        "matmul peak of the dtype (bench/results/peak.json); best: fastest step vs best peak; cpu: FLOPs per "
        "CPU-second vs the matmul's FLOPs per CPU-second (barely moved by other load; blind to idle cores). "
        f"nominal: vs --nominal {nominal_label}. XLA MiB: compiled step's args + outputs - donated + temps. "
        "RSS MiB: " + (rows[0]["peak_rss_source"] if rows else "")
    )
    for r in rows:
        if "mfu_measured_peak_exact" in r:
            print(
                f"{r['config']} {r['dtype']}: targets {r['batch_shapes']['targets'][1]} < inputs {r['seq_len']}; "
                f"exact FLOPs {r['achieved_flops_per_s_exact'] / 1e9:.1f} GFLOP/s, "
                f"MFU {r['mfu_measured_peak_exact']:.1%} (the formula above counts one target per input token)"
            )
    by = {(r["config"], r["dtype"]): r for r in rows}
    for name in dict.fromkeys(r["config"] for r in rows):
        if (name, "float32") in by and (name, "bfloat16") in by:
            f32, bf16 = by[(name, "float32")], by[(name, "bfloat16")]
            print(
                f"{name}: bfloat16 / float32 tokens/s = {bf16['tokens_per_s'] / f32['tokens_per_s']:.2f}x "
                f"(best-of {bf16['tokens_per_s_best'] / f32['tokens_per_s_best']:.2f}x, "
                f"CPU time {f32['cpu_s_per_step'] / bf16['cpu_s_per_step']:.2f}x)"
            )


# ---- --restart: persistent compilation cache.


def child_compile(config_name: str, dtype: str, extra: dict[str, str]) -> None:
    """In a fresh process: build and compile the step once, print its timings as one JSON line."""
    t_start = time.perf_counter()
    config = make_config(config_name, dtype, extra)
    built = build_step(config)
    run_steps(built, 1, sync_once=False)
    out = {
        "init_s": built["init_s"],
        "lower_s": built["lower_s"],
        "compile_s": built["compile_s"],
        "in_process_s": time.perf_counter() - t_start,
        "cache_dir": jax.config.jax_compilation_cache_dir,
    }
    print("RESULT " + json.dumps(out), flush=True)


def spawn(config_name: str, dtype: str, cache_dir: str, extra: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--configs",
        config_name,
        "--dtypes",
        dtype,
        "--_child_cache_dir",
        cache_dir,
    ]
    for k, v in extra.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT ") :])
    out["process_wall_s"] = wall
    return out


def restart(configs: list[str], dtypes: list[str], extra: dict[str, str], repeats: int) -> list[dict[str, Any]]:
    """Cold (empty cache dir) vs warm (same dir) compile in fresh processes, ``repeats`` times each."""
    rows = []
    print(
        f"{'config':<6} {'dtype':<9} {'run':<10} {'lower s':>8} {'compile s':>9} {'init s':>7} {'process s':>9} "
        f"{'cache MiB':>9}"
    )
    for name in configs:
        for dtype in dtypes:
            runs: dict[str, list[dict[str, Any]]] = {"no cache": [], "cold": [], "warm": []}
            for _ in range(repeats):
                runs["no cache"].append(spawn(name, dtype, "none", extra))
                with tempfile.TemporaryDirectory(prefix="jaxlm-xla-cache-") as cache:
                    runs["cold"].append(spawn(name, dtype, cache, extra))
                    runs["cold"][-1]["cache_bytes"] = common.dir_bytes(cache)
                    runs["warm"].append(spawn(name, dtype, cache, extra))
                    runs["warm"][-1]["cache_bytes"] = common.dir_bytes(cache)
                for label in runs:
                    r = runs[label][-1]
                    cache_mib = common.mib(r.get("cache_bytes")) if "cache_bytes" in r else "-"
                    print(
                        f"{name:<6} {dtype:<9} {label:<10} {r['lower_s']:>8.2f} {r['compile_s']:>9.2f} "
                        f"{r['init_s']:>7.2f} {r['process_wall_s']:>9.2f} {cache_mib:>9}",
                        flush=True,
                    )
            med = {
                label: {k: float(np.median([r[k] for r in rs])) for k in rs[0] if k != "cache_dir"}
                for label, rs in runs.items()
            }
            ratio = med["warm"]["compile_s"] / med["cold"]["compile_s"]
            ratio_total = (med["warm"]["lower_s"] + med["warm"]["compile_s"]) / (
                med["cold"]["lower_s"] + med["cold"]["compile_s"]
            )
            ratio_process = med["warm"]["process_wall_s"] / med["cold"]["process_wall_s"]
            print(
                f"{name} {dtype}: warm / cold compile = {ratio:.2f} (lower + compile {ratio_total:.2f}, "
                f"whole process {ratio_process:.2f}); target < 0.33"
            )
            rows.append(
                {
                    "config": name,
                    "dtype": dtype,
                    "runs": runs,
                    "median": med,
                    "warm_over_cold_compile": ratio,
                    "warm_over_cold_lower_compile": ratio_total,
                    "warm_over_cold_process": ratio_process,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of {', '.join(CONFIGS)}; or all")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="model.dtype values, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config and dtype (after 2 warm-up)")
    parser.add_argument("--sync_once", action="store_true", help="time all steps and sync once at the end")
    parser.add_argument(
        "--nominal",
        default="cpu",
        help=f"nominal peak for MFU: {', '.join(common.NOMINAL_PEAKS)} or FLOP/s per device (e.g. 3e11)",
    )
    parser.add_argument(
        "--no_measure_peak", action="store_true", help="do not run bench/peak.py if peak.json is missing"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    parser.add_argument("--restart", action="store_true", help="cold vs warm persistent compilation cache")
    parser.add_argument("--repeats", type=int, default=1, help="--restart: cold/warm pairs per config")
    parser.add_argument("--out", default=None, help="result path (default bench/results/train.json or restart.json)")
    parser.add_argument("--_child_cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = (
        [c for c in CONFIGS if c != "gpt2"]
        if args.configs == "all"
        else [c.strip() for c in args.configs.split(",") if c.strip()]
    )
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"--configs: unknown {c!r}; valid: {', '.join(CONFIGS)}")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            parser.error(f"--dtypes: {d!r} is not float32 or bfloat16")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    extra = common.parse_overrides(args.set)

    if args._child_cache_dir is not None:
        # A fresh process: point JAX's persistent compilation cache at the given dir (before
        # anything compiles), caching every entry however fast or small.
        if args._child_cache_dir != "none":
            jax.config.update("jax_compilation_cache_dir", args._child_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        child_compile(configs[0], dtypes[0], extra)
        return

    machine = common.machine()
    print(common.describe_machine(machine), flush=True)
    if args.restart:
        rows = restart(configs, dtypes, extra, args.repeats)
        machine["load_average_after"] = common.load_average()
        path = common.write_result(
            "restart",
            {
                "machine": machine,
                "method": "fresh processes: no cache, empty jax_compilation_cache_dir, then the same dir warm; "
                "min compile time and entry size 0",
                "results": rows,
            },
            path=args.out,
        )
        print(f"load average after: {'/'.join(f'{x:.2f}' for x in machine['load_average_after'])}")
        print(f"wrote {os.path.relpath(path)}")
        return

    peaks = load_peaks(not args.no_measure_peak)
    if peaks:
        print(
            "measured peaks (bench/results/peak.json, "
            f"{peaks['measured_utc']}): "
            + ", ".join(
                f"{d} {common.gflops(peaks['median'][d])} GFLOP/s (best {common.gflops(peaks['best'][d])})"
                for d in peaks["median"]
            )
        )
    else:
        print("no bench/results/peak.json: MFU vs measured peak left out (run bench/peak.py)")
    nominal_label, nominal = resolve_nominal(args.nominal, peaks["median"] if peaks else None)
    print(
        f"timing: {'sync once after all steps' if args.sync_once else 'block_until_ready after every step'}, "
        f"{args.steps} steps after 2 warm-up; overrides {extra or 'none'}",
        flush=True,
    )
    rows = []
    for name in configs:
        for dtype in dtypes:
            row = bench_one(
                name, dtype, steps=args.steps, sync_once=args.sync_once, extra=extra, peaks=peaks, nominal=nominal
            )
            rows.append(row)
            print(
                f"  {name:<6} {dtype:<9} {row['tokens_per_s']:>9,.0f} tok/s  "
                f"step {row['step']['median_s'] * 1e3:.1f} ms "
                f"(min {row['step']['min_s'] * 1e3:.1f})  compile {row['lower_s'] + row['compile_s']:.1f} s  "
                f"load {'/'.join(f'{x:.1f}' for x in common.load_average())}",
                flush=True,
            )
    machine["load_average_after"] = common.load_average()
    print_table(rows, nominal_label)
    print(f"load average before {machine['load_average']}, after {machine['load_average_after']}")
    path = common.write_result(
        "train",
        {
            "machine": machine,
            "peaks": peaks,
            "nominal": {"label": nominal_label, "flops_per_s": nominal},
            "results": rows,
        },
        path=args.out,
    )
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
