"""What jaxlm needs to know about the device: matmul peaks (for MFU), the CPU's features, and the CPU-tuned switches.

**Peaks.** ``config.train.peak_flops = 0`` (the default) takes the peak by the device's
``device_kind`` and ``config.model.dtype``; a positive value overrides it. The accelerator
figures are the vendors' dense (no sparsity) numbers; float32 on GPUs is the TF32 tensor-core
figure because XLA's default matmul precision uses TF32 there, and on TPUs float32 runs on the
bf16 MXU passes (default precision), so it gets the bf16 figure. On a CPU the peak is this
machine's own: a short matmul probe (:func:`measured_cpu_peak`, ~1 s) the first time a CPU
model is seen, cached per CPU model, ISA and core count in ``~/.cache/jaxlm/cpu_peak.json``
(probed again while the cached figure was measured under load; delete the file to re-probe).
``PEAKS["cpu"]`` is only the fallback when the probe cannot run.

**CPU features.** :func:`cpu_info` reads ``/proc/cpuinfo`` once and classifies the matmul ISA
(:data:`ISAS`): ``amx`` (AMX tiles with bf16), ``avx512_bf16`` (AVX-512 with bf16 dot
products), ``avx512``, ``avx2`` (AVX2 + FMA), ``other`` (anything else, e.g. Arm or no
``/proc/cpuinfo``).

**Switches.** ``model.grad_barrier``, ``model.fuse_qkv``, ``train.cond_update`` and
``model.matmul_dtype`` are ``auto`` by default; :func:`auto_switch` decides them by backend and,
on a CPU, by ISA from :data:`CPU_SWITCHES`, each entry A/B measured with ``bench/ab.py`` on the
machines named in bench/README.md. :func:`describe_switches` is the line the trainer prints.

**Initializers.** :func:`init_compiler_options` compiles a small model's one-off ``init`` program
with XLA:CPU's cheap settings (0.43x and 0.63x the compile time of the tiny and quick-start GPTs at
level 0; without the MLIR fusion emitters as well, a further 0.73x and 0.92x).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

# Preset -> {compute dtype: FLOP/s per device}.
PEAKS: dict[str, dict[str, float]] = {
    # Fallback only (the probe measures the machine at hand): the 2-core AVX-512 Zen 5 of bench/README.md.
    "cpu": {"float32": 4.9e11, "bfloat16": 9.5e11, "float16": 4.9e11},
    "a100": {"float32": 156e12, "bfloat16": 312e12, "float16": 312e12},  # A100 SXM, TF32 / bf16
    "h100": {"float32": 494.5e12, "bfloat16": 989e12, "float16": 989e12},  # H100 / H200 SXM, TF32 / bf16
    "v4": {"float32": 275e12, "bfloat16": 275e12, "float16": 275e12},  # TPU v4
    "v5e": {"float32": 197e12, "bfloat16": 197e12, "float16": 197e12},  # TPU v5e ("TPU v5 lite")
    "v5p": {"float32": 459e12, "bfloat16": 459e12, "float16": 459e12},  # TPU v5p ("TPU v5")
    "v6e": {"float32": 918e12, "bfloat16": 918e12, "float16": 918e12},  # TPU v6e ("TPU v6 lite")
}

# Lower-cased ``jax.Device.device_kind`` substrings -> preset, the first match wins (so the
# "lite" parts come before the names they contain).
DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    ("h100", "h100"),
    ("h200", "h100"),
    ("a100", "a100"),
    ("tpu v4", "v4"),
    ("tpu v5 lite", "v5e"),
    ("tpu v5e", "v5e"),
    ("tpu v5", "v5p"),
    ("tpu v6 lite", "v6e"),
    ("tpu v6e", "v6e"),
    ("cpu", "cpu"),
)

ISAS = ("amx", "avx512_bf16", "avx512", "avx2", "other")

# Switch -> ISA -> (on?, why). Measured A/B on a 2-core Zen 5 (avx512_bf16; bench/README.md "Where
# the time goes"), with bench/ab.py (interleaved rounds, median ratios) on a 2-core Zen 3 class
# EPYC (avx2, a heavily loaded machine: ratios, not absolute figures) and on a quiet 2-core Intel
# Xeon with AMX (ratios are tokens/s with the switch off over on, tiny / small / baby f32); plain
# "avx512" was not measured and follows avx512_bf16. Figures: bench/README.md, "CPU switches by ISA".
CPU_SWITCHES: dict[str, dict[str, tuple[bool, str]]] = {
    "grad_barrier": {
        "amx": (True, "tiny/small/baby f32 tokens/s without it 0.86x/0.82x/0.76x"),
        "avx512_bf16": (True, "baby f32 -8% step time"),
        "avx512": (True, "as avx512_bf16"),
        "avx2": (True, "CPU time per step -7 to -10% at tiny/small/baby f32"),
        "other": (True, "as avx2"),
    },
    "fuse_qkv": {
        "amx": (True, "a wash: tiny/small/baby tokens/s off 1.00x/1.00x/1.02x; kept like avx512_bf16"),
        "avx512_bf16": (True, "baby f32 +7%"),
        "avx512": (True, "as avx512_bf16"),
        "avx2": (True, "no difference measured at tiny/small f32; kept like AVX-512"),
        "other": (True, "as avx2"),
    },
    "cond_update": {
        "amx": (True, "tiny/small/baby tokens/s without it 0.94x/0.98x/0.98x"),
        "avx512_bf16": (True, "baby +3%, step memory -9%"),
        "avx512": (True, "as avx512_bf16"),
        "avx2": (True, "tiny f32 +12% tokens/s, CPU time -5%; step memory -9%"),
        "other": (True, "as avx2"),
    },
    # On: the matmul takes bf16 operands when model.dtype is bfloat16; off: it upcasts them to f32.
    "bf16_matmul": {
        "amx": (True, "AMX bf16 tiles: 5.9x the f32 matmul peak; bf16 runs 2.0-2.3x tokens/s vs f32 operands"),
        "avx512_bf16": (True, "bf16 dot products: 1.9x the f32 matmul peak"),
        "avx512": (False, "no bf16 dot instructions"),
        "avx2": (False, "no bf16 dot instructions: f32 operands +15-18% tokens/s in bf16 runs"),
        "other": (False, "no known bf16 dot instructions"),
    },
}


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The host CPU as far as matmul speed goes."""

    model: str
    flags: frozenset[str]
    cores: int

    @property
    def isa(self) -> str:
        """The best matmul instruction set of :data:`ISAS` this CPU has."""
        f = self.flags
        if "amx_bf16" in f:
            return "amx"
        if "avx512f" in f:
            return "avx512_bf16" if "avx512_bf16" in f else "avx512"
        if "avx2" in f and "fma" in f:
            return "avx2"
        return "other"

    @property
    def key(self) -> str:
        """What identifies this CPU for the peak cache: model, ISA and core count."""
        return f"{self.model} | {self.isa} | {self.cores} cores"


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (first ``model name`` and ``flags``)."""
    model = re.search(r"^model name\s*:(.*)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    return CpuInfo(
        model=model.group(1).strip() if model else (platform.processor() or platform.machine()),
        flags=frozenset(flags.group(1).split()) if flags else frozenset(),
        cores=cores,
    )


@functools.cache
def cpu_info() -> CpuInfo:
    """The host's CPU, read once from ``/proc/cpuinfo`` (ISA ``other`` where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def auto_switch(name: str, setting: str, *, backend: str | None = None, isa: str | None = None) -> bool:
    """Resolve an ``auto`` / ``on`` / ``off`` switch of :data:`CPU_SWITCHES`.

    ``auto`` is off on accelerators (a GPU conditional can copy its predicate to the host;
    fusing kernels sharded over heads costs a reshuffle; bf16 matmuls are native there, so
    ``bf16_matmul`` is on) and on a CPU follows the ISA's measured entry.
    """
    if setting != "auto":
        return setting == "on"
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return name == "bf16_matmul"
    return CPU_SWITCHES[name][isa or cpu_info().isa][0]


def cpu_auto(setting: str, name: str | None = None) -> bool:
    """:func:`auto_switch` for ``model.grad_barrier``, ``model.fuse_qkv`` or ``train.cond_update`` (``name``).

    Without ``name`` (a CPU trick not in :data:`CPU_SWITCHES`), ``auto`` is on for any CPU.
    """
    if name is None:
        return setting == "on" or (setting == "auto" and _on_cpu())
    return auto_switch(name, setting)


# Below this many parameters an initializer is compiled with XLA:CPU's cheap settings
# (:func:`init_compiler_options`). Measured on a 2-core Intel Xeon with AMX (GPT, f32, state = params
# + AdamW moments, fresh process, no compile cache): 0.12 M parameters compile 1.59 -> 0.69 s, run
# 4 -> 11 ms; 0.84 M (the quick start) 1.88 -> 1.18 s, 12 -> 59 ms; 10.9 M 2.40 -> 1.50 s, 0.11 ->
# 0.48 s; 25.5 M 2.93 -> 1.95 s, 0.24 -> 1.10 s (break-even); 86 M 4.49 -> 3.20 s, 0.81 -> 3.89 s (a
# loss). The threshold leaves room for a CPU on which the unoptimized program runs relatively slower.
CHEAP_INIT_MAX_PARAMS = 16_000_000


def init_compiler_options(num_params: int, *, backend: str | None = None) -> dict[str, Any]:
    """XLA options for a program that initializes ``num_params`` parameters once (e.g. a jitted ``init``).

    An initializer runs once, and for a small model XLA:CPU spends far longer optimizing its random
    draws than the optimized program saves, so on a CPU below :data:`CHEAP_INIT_MAX_PARAMS` it is
    compiled at backend optimization level 0 without LLVM's expensive passes, and with XLA's older
    elemental emitters instead of the MLIR fusion emitters: 0.73x the compile time for the tiny
    GPT, 0.76x the tiny BERT, 0.92x the quick-start GPT, 0.89x the d512 one, about the same for the
    tiny T5 and the baby GPT (2-core AMX Xeon; run time 0-10% longer), and the same bits as with
    the fusion emitters on all six. The values it draws are the same random numbers as XLA's
    default options draw, up to the last bit of float32 rounding. Empty (XLA's defaults) on
    accelerators and for larger models.
    """
    if (backend or jax.default_backend()) != "cpu" or num_params >= CHEAP_INIT_MAX_PARAMS:
        return {}
    return {
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    }


def matmul_operand_dtype(setting: str, compute_dtype: Any) -> Any:
    """The operand dtype of :func:`jaxlm.nn.matmul.einsum` for ``model.matmul_dtype`` and the compute dtype.

    ``compute``: the compute dtype; ``float32``: always float32; ``auto``: the compute dtype
    unless it is bfloat16 on a CPU without bf16 dot instructions, where bf16 operands are slower
    than float32 ones (XLA:CPU converts them to f32 inside its matmul kernels).
    """
    compute_dtype = jnp.dtype(compute_dtype)
    if setting == "float32":
        return jnp.dtype(jnp.float32)
    if setting == "auto" and compute_dtype == jnp.bfloat16 and not auto_switch("bf16_matmul", "auto"):
        return jnp.dtype(jnp.float32)
    return compute_dtype


def describe_switches(grad_barrier: str, fuse_qkv: str, cond_update: str, matmul_dtype: str, dtype: str) -> str:
    """One line: what the switches resolved to on this machine and why (the trainer prints it first)."""
    backend = jax.default_backend()
    where = f"CPU {cpu_info().isa}" if backend == "cpu" else backend
    parts = []
    for name, setting in (("grad_barrier", grad_barrier), ("fuse_qkv", fuse_qkv), ("cond_update", cond_update)):
        value = "on" if auto_switch(name, setting) else "off"
        if setting != "auto":
            why = "set"
        elif backend == "cpu":
            why = CPU_SWITCHES[name][cpu_info().isa][1]
        else:
            why = "CPU-only trick"
        parts.append(f"{name} {value} ({why})")
    operand = jnp.dtype(matmul_operand_dtype(matmul_dtype, dtype)).name
    if matmul_dtype != "auto":
        why = "set"
    elif jnp.dtype(dtype) != jnp.bfloat16:
        why = f"model.dtype {dtype}"
        # The dtype is the user's choice (not auto), but a CPU whose bf16 matmuls are faster says so.
        bf16_fast, reason = CPU_SWITCHES["bf16_matmul"][cpu_info().isa] if backend == "cpu" else (False, "")
        if bf16_fast:
            why += f"; model.dtype=bfloat16 would multiply bf16 here: {reason}"
    elif backend == "cpu":
        why = CPU_SWITCHES["bf16_matmul"][cpu_info().isa][1]
    else:
        why = "native bf16 matmuls"
    parts.append(f"matmul operands {operand} ({why})")
    return f"{where}: " + ", ".join(parts)


# ---- Peaks.


def preset_for(device_kind: str) -> str | None:
    """The :data:`PEAKS` preset of a ``device_kind`` string, or None for an unknown device."""
    kind = device_kind.lower()
    return next((preset for needle, preset in DEVICE_KINDS if needle in kind), None)


PROBE_SIZE = 1024  # square matmul: 2.1 GFLOP, 5-25 ms on 2 cores; large enough to reach the kernels' peak
PROBE_SECONDS = 0.4


def _probe(dtype: str) -> float:
    """FLOP/s of a jitted square matmul with ``dtype`` operands and f32 accumulation: the best of ~0.4 s of calls."""
    n = PROBE_SIZE
    op = jnp.dtype(dtype if dtype in ("float32", "bfloat16") else "float32")
    x = jnp.ones((n, n), op)
    y = jnp.ones((n, n), op)
    device = jax.local_devices(backend="cpu")[0]
    x, y = jax.device_put(x, device), jax.device_put(y, device)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(x, y))
    best, start = float("inf"), time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - start < PROBE_SECONDS:
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, y))
        best = min(best, time.perf_counter() - t0)
        calls += 1
    # The best call, not the median: other load on a shared machine only ever slows a call down.
    return 2.0 * n**3 / best


def peak_cache_path() -> str:
    """Where measured CPU peaks are cached: ``$XDG_CACHE_HOME/jaxlm`` or ``~/.cache/jaxlm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxlm", "cpu_peak.json")


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


@functools.cache
def measured_cpu_peak(dtype: str) -> float:
    """The host CPU's matmul FLOP/s for ``dtype`` operands (whole machine), probed and cached on disk.

    An entry probed on a quiet machine (1-minute load average below the core count) is reused as
    is. One probed under load is too low; it is probed again (once per process) while that stays
    true, keeping the larger figure, so the cache climbs to the machine's real peak.
    """
    cpu = cpu_info()
    path = peak_cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(cpu.key, {})
    if dtype in entry and entry.get(f"{dtype}_load", 0.0) < cpu.cores:
        return float(entry[dtype])
    load = _load()
    value = _probe(dtype)
    if dtype in entry and float(entry[dtype]) >= value:
        value, load = float(entry[dtype]), min(load, entry.get(f"{dtype}_load", load))
    entry.update({dtype: value, f"{dtype}_load": round(load, 2)})
    cache[cpu.key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the probe runs again next time
    return value


def peak_flops(configured: float, device_kind: str, dtype: str) -> float | None:
    """FLOP/s per device for MFU: ``configured`` if positive, else the device's peak.

    On a CPU, this machine's measured peak (:func:`measured_cpu_peak`) shared among its local
    CPU devices; elsewhere the :data:`PEAKS` preset. None when nothing is configured and the
    device is not in the table (the trainer then logs no MFU rather than a made-up one).
    """
    if configured > 0:
        return float(configured)
    preset = preset_for(device_kind)
    if preset is None:
        return None
    if preset == "cpu" and _on_cpu():
        try:
            return measured_cpu_peak(dtype) / max(1, jax.local_device_count("cpu"))
        except Exception:  # noqa: BLE001 - an odd platform: fall back to the table rather than fail training
            pass
    return PEAKS[preset].get(dtype, PEAKS[preset]["float32"])
