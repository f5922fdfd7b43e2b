"""Where a train step's time goes: per-op time from a ``jax.profiler`` trace, grouped by kind.

Builds the step exactly as ``bench/train.py`` does (same configs, ``--set`` overrides), runs it
under ``jax.profiler.trace`` for ``--steps`` steps after warm-up, and sums the trace's op events
(XLA:CPU thunks, named after the optimized HLO instructions) per instruction. Each instruction is
classified from the compiled HLO text: ``matmul`` (a dot, or a fusion that contains one),
``copy`` (copies, transposes, and fusions that only move data), ``reduce`` (fusions with a
reduction: softmax sums, LayerNorm statistics, loss), ``elementwise`` (every other fusion),
``other`` (collectives, conditionals, rng, ...). On a GPU, kernels of libraries (cuBLAS, cuDNN) that
run inside a command buffer are not HLO instructions: they are classified by kernel name
(``matmul``, ``attention``, ``other``). Op time sums the time of every op event, so on
2 cores with independent ops running side by side it can exceed the step's wall time.

Prints the wall time per step, the op time per kind (ms per step and share), and the top ops,
with their matmul FLOP/s where the HLO gives the shapes. The question it answers is the issue's
"what bounds a shape": the share of step time in matmuls vs everything else, per op.

    python bench/profile_step.py --configs baby
    python bench/profile_step.py --configs small --dtype bfloat16 --top 15
    python bench/profile_step.py --from_trace bench/results/h200/trace_gpt2.json.gz --steps 3 --top 25

Figures only; writes ``bench/results/profile_<config>_<dtype>.json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import train as train_bench  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_MOVES = {"copy", "transpose", "bitcast", "broadcast", "slice", "dynamic-slice", "concatenate", "pad", "reshape"}
_MOVES |= {"dynamic-update-slice", "parameter", "constant", "tuple", "get-tuple-element", "convert", "iota"}


def _dims(shape: str) -> list[int]:
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(line: str, shape: str, instrs: dict[str, dict[str, Any]]) -> float:
    """``2 * |output| * |contracted|`` of one HLO dot line (0 when its lhs shape is unknown)."""
    lhs = re.search(r"dot\(%?([\w.\-]+)", line)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if not lhs or not contracting or lhs.group(1) not in instrs:
        return 0.0
    lhs_dims = _dims(instrs[lhs.group(1)]["shape"])
    k = 1
    for i in (int(x) for x in contracting.group(1).split(",") if x):
        k *= lhs_dims[i]
    out = 1
    for d in _dims(shape):
        out *= d
    return 2.0 * out * k


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Instruction name -> ``{"opcode", "shape", "ops", "flops", "what"}``.

    For fusions ``ops`` is the set of the fused computation's opcodes and ``flops`` its dots'
    FLOPs; ``what`` is the JAX operation the instruction came from (its ``op_name`` metadata).
    """
    comps: dict[str, list[str]] = {}
    dots: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    instrs: dict[str, dict[str, Any]] = {}
    current = None
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m and current is not None:
            name, shape, opcode = m.groups()
            comps[current].append(opcode)
            if opcode == "dot":
                dots[current].append((line, shape))
            calls = _CALLS.search(line)
            what = re.search(r'op_name="([^"]*)"', line)
            instrs[name] = {
                "opcode": opcode,
                "shape": shape,
                "calls": calls.group(1) if calls else None,
                "line": line,
                "what": what.group(1).split("/", 1)[-1] if what else "",
            }
            continue
        c = _COMP.match(line)
        if c and "=" not in line.split("{")[0]:
            current = c.group(1)
            comps[current] = []
    for info in instrs.values():
        info["ops"] = set(comps.get(info["calls"], [])) if info["calls"] else {info["opcode"]}
        lines = dots.get(info["calls"], []) if info["calls"] else []
        if info["opcode"] == "dot":
            lines = [(info["line"], info["shape"])]
        info["flops"] = sum(_dot_flops(line, shape, instrs) for line, shape in lines)
    return instrs


def classify(info: dict[str, Any] | None) -> str:
    """The kind of one instruction (see the module docstring)."""
    if info is None:
        return "other"
    ops = info["ops"]
    if ops & {"dot", "convolution"} or "__onednn$matmul" in info["line"]:
        return "matmul"
    if info["opcode"] in {"copy", "transpose"} or (info["opcode"] == "fusion" and ops <= _MOVES):
        return "copy"
    if info["opcode"] == "fusion" and ops & {"reduce", "reduce-window", "scatter", "sort"}:
        return "reduce"
    if info["opcode"] == "fusion" or ops <= _MOVES | {"add", "multiply", "subtract", "divide", "select"}:
        return "elementwise"
    return "other"


def _union(spans: list[tuple[float, float, bool]]) -> float:
    """Length of the union of ``(start, end, _)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b, _ in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _overlap(spans: list[tuple[float, float, bool]]) -> float:
    """Length of the time covered by two or more of the intervals."""
    points = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])
    total, depth, last = 0.0, 0, 0.0
    for t, d in points:
        if depth >= 2:
            total += t - last
        depth += d
        last = t
    return total


def read_trace(path: str, *, device_only: bool = False) -> list[dict[str, Any]]:
    """Complete ('X') events of a Perfetto trace file (``*.trace.json.gz``).

    ``device_only``: only the events of accelerator processes (``/device:GPU:0``...), where the
    trace has any: on a GPU the host's launch events carry the same op names as the kernels and
    would count each op twice.
    """
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    devices = {
        e.get("pid")
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "/device:" in str(e.get("args", {}).get("name", ""))
        and "CPU" not in str(e.get("args", {}).get("name", ""))
    }
    keep = devices if device_only and devices else None
    return [e for e in events if e.get("ph") == "X" and "dur" in e and (keep is None or e.get("pid") in keep)]


def trace_events(trace_dir: str, *, device_only: bool = False) -> list[dict[str, Any]]:
    """:func:`read_trace` of the trace ``jax.profiler`` wrote under ``trace_dir``."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: this jax did not write a Perfetto trace")
    return read_trace(sorted(paths)[-1], device_only=device_only)


def op_name(event: dict[str, Any], instrs: dict[str, dict[str, Any]]) -> str:
    """The HLO instruction of a trace event: its name (CPU thunks, XLA's own GPU kernels), else its ``hlo_op``."""
    name = event["name"].split(":")[0].strip()
    return name if name in instrs else str(event.get("args", {}).get("hlo_op") or name)


def library_kind(kernel: str) -> str:
    """The kind of a GPU kernel that is not an HLO instruction (a library's, inside a command buffer)."""
    k = kernel.lower()
    if any(s in k for s in ("sdpa", "fmha", "flash", "cudnn::fusion")):
        return "attention"
    if any(s in k for s in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
        return "matmul"
    return "other"


def kernel_kind(kernel: str) -> str:
    """The kind of a GPU kernel from its name alone (a saved trace without its HLO): XLA names its
    kernels after the fusion (``gemm_fusion_*``, ``input_reduce_fusion_*``, ``loop_*_fusion``...)."""
    kind = library_kind(kernel)
    if kind != "other":
        return kind
    k = kernel.lower()
    if "reduce" in k:
        return "reduce"
    if "transpose" in k or "copy" in k:
        return "copy"
    if "memset" in k or "memcpy" in k:
        return "other"
    return "elementwise"


def summarize_trace(path: str, steps: int, top: int) -> dict[str, Any]:
    """Kernel time by kind (named as :func:`kernel_kind` says) of a saved trace of ``steps`` steps."""
    kernels = read_trace(path, device_only=True)
    per: dict[str, float] = collections.defaultdict(float)
    for e in kernels:
        per[e["name"]] += e["dur"] / 1e3 / steps
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, ms in per.items():
        kinds[kernel_kind(name)] += ms
    spans = [(e["ts"], e["ts"] + e["dur"], False) for e in kernels]
    first, last = min(e["ts"] for e in kernels), max(e["ts"] + e["dur"] for e in kernels)
    return {
        "trace": path,
        "steps": steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_ms": sum(per.values()),
        "busy_ms": _union(spans) / 1e3 / steps,
        "span_ms": (last - first) / 1e3 / steps,
        "ms_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [(name, ms, kernel_kind(name)) for name, ms in sorted(per.items(), key=lambda kv: -kv[1])[:top]],
    }


def profile(name: str, dtype: str, extra: dict[str, str], steps: int, trace_dir: str | None = None) -> dict[str, Any]:
    """Build, warm up, trace ``steps`` steps; op time per instruction and kind (the trace kept in ``trace_dir``)."""
    config = train_bench.make_config(name, dtype, extra)
    built = train_bench.build_step(config)
    instrs = parse_hlo(built["compiled"].as_text())
    step, batch, rng, state = built["step"], built["batch"], built["rng"], built["state"]
    with jax.set_mesh(built["exp"].mesh), nn.logical_axis_rules(built["exp"].rules):
        for _ in range(3):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        with tempfile.TemporaryDirectory() as tmp:
            out = trace_dir or tmp
            with jax.profiler.trace(out, create_perfetto_trace=True):
                t0 = time.perf_counter()
                for _ in range(steps):
                    state, metrics = step(state, batch, rng)
                    jax.block_until_ready((state, metrics))
                wall = (time.perf_counter() - t0) / steps
            events = trace_events(out, device_only=jax.default_backend() != "cpu")
    per_op: dict[str, float] = collections.defaultdict(float)
    kind_of: dict[str, str] = {}
    spans = []
    for e in events:
        base = op_name(e, instrs)
        if base in instrs:
            kind_of[base] = classify(instrs[base])
        elif jax.default_backend() != "cpu":  # cuBLAS / cuDNN kernels run inside a command buffer op
            base = e["name"]
            kind_of[base] = library_kind(base)
        else:
            continue
        per_op[base] += e["dur"] / 1e3 / steps  # microseconds -> ms per step
        spans.append((e["ts"], e["ts"] + e["dur"], kind_of[base] == "matmul"))
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in per_op.items():
        kinds[kind_of[op]] += ms
    # The matmuls' speed over the ones whose FLOPs the HLO gives (library kernels have no shapes).
    counted = [op for op in per_op if op in instrs and instrs[op]["flops"]]
    matmul_flops = sum(instrs[op]["flops"] for op in counted)
    matmul_ms = sum(per_op[op] for op in counted)
    tokens = config.data.batch_size * config.data.seq_len
    return {
        # Time in which at least one op ran (the union of their intervals), and of it the time with
        # two or more running at once: wall - busy is the runtime between ops (dispatch, waits).
        "busy_ms": _union(spans) / 1e3 / steps,
        "overlap_ms": _overlap(spans) / 1e3 / steps,
        "matmul_busy_ms": _union([sp for sp in spans if sp[2]]) / 1e3 / steps,
        "config": name,
        "dtype": dtype,
        "overrides": extra,
        "steps": steps,
        "wall_ms": 1e3 * wall,
        "tokens_per_s": tokens / wall,
        "op_ms_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "op_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
        "kind_of": kind_of,
        "flops_of": {op: instrs[op]["flops"] for op in counted},
        "what_of": {op: instrs[op]["what"] if op in instrs else "library kernel" for op in per_op},
        # FLOPs of the dots that ran over their op time: the matmuls' own average speed.
        "matmul_gflops_per_s": matmul_flops / max(matmul_ms, 1e-9) / 1e6,
        "matched_events": sum(1 for e in events if op_name(e, instrs) in instrs),
        "events": len(events),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="baby", help="comma-separated bench/train.py configs")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="ops listed per config")
    p.add_argument("--trace_dir", default=None, help="keep the jax.profiler trace here (default: a temp dir)")
    p.add_argument("--out", default=None, help="result path (default bench/results/profile_<config>_<dtype>.json)")
    p.add_argument("--from_trace", default=None, help="summarize a saved GPU trace (*.trace.json.gz) of --steps steps")
    args = p.parse_args()
    if args.from_trace:
        r = summarize_trace(args.from_trace, args.steps, args.top)
        print(
            f"{r['trace']}: {r['kernels_per_step']:.0f} kernels per step, {r['kernel_ms']:.1f} ms of kernel time, "
            f"busy {r['busy_ms']:.1f} ms of a {r['span_ms']:.1f} ms span per step"
        )
        for kind, ms in r["ms_by_kind"].items():
            print(f"  {kind:12s} {ms:8.2f} ms  {100 * ms / r['kernel_ms']:5.1f}%")
        for name, ms, kind in r["top"]:
            print(f"    {ms:7.3f} ms  {kind:11s} {name[:100]}")
        if args.out:
            print(f"wrote {common.write_result('profile_trace', r, path=args.out)}")
        return
    extra = dict(kv.split("=", 1) for kv in args.set)
    machine = common.machine()
    print(common.describe_machine(machine), flush=True)
    for name in args.configs.split(","):
        r = profile(name, args.dtype, extra, args.steps, args.trace_dir)
        total = sum(r["op_ms_by_kind"].values())
        print(
            f"{name} {args.dtype}: {r['wall_ms']:.1f} ms/step wall ({r['tokens_per_s']:,.0f} tok/s), "
            f"op time {total:.1f} ms/step ({r['matched_events']} of {r['events']} trace events are HLO ops)"
        )
        print(
            f"  ops running {r['busy_ms']:.1f} ms/step (matmuls {r['matmul_busy_ms']:.1f}), two or more at once "
            f"{r['overlap_ms']:.1f} ms; between ops {r['wall_ms'] - r['busy_ms']:.1f} ms"
        )
        for kind, ms in r["op_ms_by_kind"].items():
            print(f"  {kind:12s} {ms:8.1f} ms  {100 * ms / max(total, 1e-9):5.1f}%")
        print(f"  matmuls: {r['matmul_gflops_per_s']:.1f} GFLOP/s over their op time")
        print(f"  top {args.top} ops:")
        for op, ms in list(r["op_ms"].items())[: args.top]:
            flops = r["flops_of"].get(op, 0.0)
            speed = f"{flops / ms / 1e6:6.1f} GFLOP/s" if flops else " " * 14
            print(f"    {ms:7.2f} ms  {r['kind_of'][op]:11s} {speed}  {op}  {r['what_of'][op][:70]}")
        r["machine"] = machine
        print(f"wrote {common.write_result(f'profile_{name}_{args.dtype}', r, path=args.out)}", flush=True)


if __name__ == "__main__":
    main()
