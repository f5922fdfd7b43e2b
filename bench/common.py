"""Shared helpers of the benchmarks: machine description, timing, memory, peaks and JSON results.

Every bench writes ``bench/results/<name>.json`` holding the machine it ran on (CPU model,
cores, jax version, device kind, load average before and after) next to its figures, so a table
in ``bench/README.md`` can always be traced back to where and under which load it was measured.
Figures only: nothing here passes or fails on time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from jaxlm import hardware

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")

# Nominal dense matmul peaks per device, FLOP/s: ``jaxlm.hardware.PEAKS`` (what ``jaxlm train``
# logs its MFU against when ``config.train.peak_flops`` is 0, its default), plus ``cpu`` for
# "this machine's measured peak" (bench/peak.py), resolved at run time, and ``trainer``, the
# table's entry for the device the bench runs on.
NOMINAL_PEAKS: dict[str, dict[str, float] | None] = {"cpu": None, "trainer": None, **hardware.PEAKS}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The matmul-relevant CPU flags (AVX-512, bf16, AMX, VNNI) present on this machine."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return []
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = match.group(1).split() if match else []
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return [f for f in wanted if f in flags]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on the machine skews every figure)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """Where a figure was measured: CPU, cores, memory, jax versions and devices, load."""
    import jax
    import jaxlib

    devices = jax.devices()
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": load_average(),
    }


def describe_machine(m: dict[str, Any]) -> str:
    """One line for the top of a bench's output."""
    load = "/".join(f"{x:.2f}" for x in m["load_average"])
    return (
        f"{m['cpu_model']} ({m['cores']} cores, {' '.join(m['cpu_flags']) or 'no AVX-512'}), "
        f"jax {m['jax']}, {m['device_count']} x {m['device_kind']} ({m['backend']}), load avg {load}"
    )


def write_result(name: str, payload: dict[str, Any], *, path: str | None = None) -> str:
    """Write ``payload`` (plus the command line and a UTC timestamp) to ``bench/results/<name>.json``."""
    path = path or os.path.join(RESULTS, f"{name}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    record = {
        "bench": name,
        "command": " ".join(["python"] + sys.argv),
        "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **payload,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def read_result(name: str, *, path: str | None = None) -> dict[str, Any] | None:
    """A previously written result (``bench/results/<name>.json`` or ``path``), or None."""
    path = path or os.path.join(RESULTS, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (which must block until its work is done), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, min and max of a list of timings (min: the best-of on a shared machine)."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "n": len(seconds),
    }


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux ``clear_refs`` 5); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> tuple[int, str]:
    """Peak resident memory of this process and where it came from.

    ``VmHWM`` from /proc/self/status (the high-water mark since the last :func:`reset_peak_rss`),
    else ``resource.getrusage`` ``ru_maxrss`` (since the process started).
    """
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if match:
            return int(match.group(1)) * 1024, "process peak RSS (VmHWM since reset)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS (getrusage)"


def device_peak_memory() -> tuple[int | None, str]:
    """Peak device memory from ``jax`` ``memory_stats`` (GPU/TPU); None on backends without it (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None, "jax memory_stats unavailable"
    return int(stats["peak_bytes_in_use"]), "jax device memory_stats peak_bytes_in_use"


def measured_peaks() -> dict[str, float] | None:
    """``{'float32': FLOP/s, 'bfloat16': FLOP/s}`` from ``bench/results/peak.json`` (None if absent)."""
    data = read_result("peak")
    if not data or "peak" not in data:
        return None
    return {k: float(v) for k, v in data["peak"].items()}


def gflops(x: float) -> str:
    """FLOP/s as a short GFLOP/s string."""
    return f"{x / 1e9:,.1f}"


def mib(n: int | None) -> str:
    """Bytes as a whole number of MiB ('-' for None)."""
    return "-" if n is None else f"{n / 2**20:,.0f}"


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled executable (bytes), or None when the backend gives none.

    ``total`` = arguments + outputs - aliased (donated) + temporaries.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def dir_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``--set model.remat=dots`` items -> ``{'model.remat': 'dots'}`` (a leading ``config.`` is dropped)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected section.key=value, e.g. model.remat=dots")
        key, value = item.split("=", 1)
        out[key.strip().removeprefix("config.")] = value.strip()
    return out
