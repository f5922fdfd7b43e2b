"""Where the test suite's time goes: compilations, tracing and lowering per test, from JAX's own monitoring events.

A pytest plugin and its report. Run the suite with it loaded (any pytest options; xdist workers
each write their own file), then summarize::

    PYTHONPATH=bench/plugins .venv/bin/python -m pytest -n 2 --dist loadfile -p suite_profile
    python bench/plugins/suite_profile.py [--dir DIR] [--top 40]

It sits in a folder of its own because ``PYTHONPATH=bench`` would put ``bench/peft.py`` and
``bench/data.py`` in front of Hugging Face's ``peft`` and the tests' ``data`` package.

Per test it records wall and CPU seconds of the test's protocol (setup, call, teardown) in the
pytest process, and the seconds of JAX's ``jaxpr_trace``, ``jaxpr_to_mlir_module`` (lowering) and
``backend_compile`` events (the last includes reading a persistent-cache hit), each compilation
by the jitted function's name (``jit(multiply)`` and the like are op-by-op dispatches of eager
code), and each compilation's call site: the innermost frame of ``tests/`` or ``jaxlm/`` that led
to it, so that eager code's many small compilations can be traced to the lines that dispatch them.
Subprocesses a test starts are not seen: their time shows as wall without CPU. Files go to
``$JAXLM_SUITE_PROFILE_DIR`` (default ``/tmp/jaxlm-suite-profile``), two per process.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import time
import traceback
from typing import Any

DEFAULT_DIR = "/tmp/jaxlm-suite-profile"
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}

_current: dict[str, str | None] = {"test": None}
_tests: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_compiles: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_sites: collections.Counter = collections.Counter()
_slow: list[dict[str, Any]] = []  # compilations of at least SLOW_COMPILE seconds, with their signatures
_clock: dict[str, float] = {}  # this process's start (pytest_configure) as Unix time, for the workers' timeline
SLOW_COMPILE = 0.3
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _call_site() -> str:
    """The innermost frame in the repository's own code (tests/ or jaxlm/) that led to this compilation."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.relpath(frame.filename, _REPO)
        if path.startswith(("tests" + os.sep, "jaxlm" + os.sep)):
            return f"{path}:{frame.lineno} {frame.name}"
    return "?"


def _signature() -> str:
    """The compiled module's ``main`` signature (argument and result types), read from JAX's compiling frame.

    Two compilations of one function with different signatures are two programs; listing them
    shows tests that compile near-identical programs (same model, another batch size) which one
    shared shape would turn into cache hits.
    """
    import sys

    frame = sys._getframe()
    while frame is not None and frame.f_code.co_name != "_cached_compilation":
        frame = frame.f_back
    computation = frame.f_locals.get("computation") if frame is not None else None
    if computation is None:
        return "?"
    for op in computation.body.operations:
        if "sym_name" in op.attributes and str(op.attributes["sym_name"]) == '"main"':
            return re.sub(r"\{[^{}]*\}", "", str(op.attributes["function_type"]))
    return "?"


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    test, kind = _current["test"], EVENTS.get(event)
    if test is None or kind is None:
        return
    _tests[test][kind] += duration
    if kind == "compile":
        _tests[test]["compiles"] += 1
        name = kwargs.get("fun_name", "?")
        _compiles[test][name] += duration
        _compiles[test][name + " #"] += 1
        site = f"{_call_site()} -> {name}"
        _sites[site] += duration
        _sites[site + " #"] += 1
        if duration >= SLOW_COMPILE:
            _slow.append({"test": test, "name": name, "seconds": duration, "site": site, "signature": _signature()})


def _on_event(event: str, **kwargs: Any) -> None:
    if _current["test"] is not None and event == "/jax/compilation_cache/cache_hits":
        _tests[_current["test"]]["cache_hits"] += 1


def _directory() -> str:
    return os.environ.get("JAXLM_SUITE_PROFILE_DIR", DEFAULT_DIR)


def pytest_configure(config: Any) -> None:
    import jax

    if "PYTEST_XDIST_WORKER" not in os.environ:  # the run's first process: drop an earlier run's files
        for pattern in ("*.json", "*.sites", "*.slow", "*.clock"):
            for path in glob.glob(os.path.join(_directory(), pattern)):
                os.remove(path)

    _clock["configure"] = time.time()
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def pytest_runtest_protocol(item: Any, nextitem: Any) -> None:
    _current["test"] = item.nodeid
    _tests[item.nodeid]["_wall0"] = time.perf_counter()
    _tests[item.nodeid].setdefault("start", time.time())
    _tests[item.nodeid]["_cpu0"] = time.process_time()


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    counts = _tests.get(nodeid)
    if counts is None or "_wall0" not in counts:  # xdist's controller reports tests its workers ran
        return
    counts["wall"] += time.perf_counter() - counts.pop("_wall0")
    counts["cpu"] += time.process_time() - counts.pop("_cpu0")
    counts["end"] = time.time()
    _current["test"] = None


def pytest_unconfigure(config: Any) -> None:
    if not _tests:
        return
    directory = _directory()
    os.makedirs(directory, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(directory, f"{worker}.json"), "w") as f:
        json.dump({t: {"times": dict(c), "compiles": dict(_compiles[t])} for t, c in _tests.items()}, f)
    with open(os.path.join(directory, f"{worker}.sites"), "w") as f:
        json.dump(dict(_sites), f)
    with open(os.path.join(directory, f"{worker}.slow"), "w") as f:
        json.dump(_slow, f)
    with open(os.path.join(directory, f"{worker}.clock"), "w") as f:
        json.dump(_clock, f)


def summarize(directory: str, top: int) -> str:
    """The report: totals, the compiled functions that cost most, then the files and tests that cost most."""
    tests: dict[str, Any] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            tests.update(json.load(f))
    if not tests:
        raise SystemExit(f"no profile files in {directory}: run pytest with -p suite_profile first")
    keys = ("wall", "cpu", "trace", "lower", "compile", "compiles", "cache_hits")
    total = collections.Counter()
    by_name, by_file = collections.Counter(), collections.defaultdict(collections.Counter)
    for test, record in tests.items():
        for k in keys:
            total[k] += record["times"].get(k, 0)
            by_file[test.split("::")[0]][k] += record["times"].get(k, 0)
        by_file[test.split("::")[0]]["tests"] += 1
        for name, value in record["compiles"].items():
            by_name[name] += value
    lines = [
        f"{len(tests)} tests: {total['wall']:.1f} s of test wall time (summed over workers), {total['cpu']:.1f} CPU-s "
        f"in the pytest processes; JAX compile {total['compile']:.1f} s in {int(total['compiles'])} compilations "
        f"({int(total['cache_hits'])} persistent-cache hits), "
        f"trace {total['trace']:.1f} s, lower {total['lower']:.1f} s",
        "",
        f"{'seconds':>8} {'count':>6}  compiled function",
    ]
    names = [n for n in by_name if not n.endswith(" #")]
    for name in sorted(names, key=lambda n: -by_name[n])[:top]:
        lines.append(f"{by_name[name]:8.1f} {int(by_name[name + ' #']):6d}  {name}")
    sites: collections.Counter = collections.Counter()
    for path in glob.glob(os.path.join(directory, "*.sites")):
        with open(path) as f:
            sites.update(json.load(f))
    if sites:
        lines += ["", f"{'seconds':>8} {'count':>6}  where it was compiled from (innermost tests/ or jaxlm/ frame)"]
        for site in sorted((k for k in sites if not k.endswith(" #")), key=lambda k: -sites[k])[:top]:
            lines.append(f"{sites[site]:8.1f} {int(sites[site + ' #']):6d}  {site}")
    header = f"{'wall':>7} {'compile':>7} {'trace':>6} {'lower':>6} {'#comp':>6} {'tests':>5}  "
    lines += ["", header + "file"]
    for path, c in sorted(by_file.items(), key=lambda kv: -kv[1]["wall"])[:top]:
        lines.append(
            f"{c['wall']:7.1f} {c['compile']:7.1f} {c['trace']:6.1f} {c['lower']:6.1f} {int(c['compiles']):6d} "
            f"{int(c['tests']):5d}  {path}"
        )
    lines += ["", header.replace("tests", "     ") + "test"]
    for test, record in sorted(tests.items(), key=lambda kv: -kv[1]["times"].get("wall", 0))[:top]:
        t = record["times"]
        lines.append(
            f"{t.get('wall', 0):7.1f} {t.get('compile', 0):7.1f} {t.get('trace', 0):6.1f} {t.get('lower', 0):6.1f} "
            f"{int(t.get('compiles', 0)):6d}        {test}"
        )
    return "\n".join(lines + _timeline(directory))


def _timeline(directory: str) -> list[str]:
    """Each worker's start-up (configure to its first test), busy time, and when its last test ended.

    With ``--dist loadfile`` a worker that runs out of files idles while the other finishes its
    last one; the gap between the workers' last ends is that idle tail.
    """
    starts = []
    for path in sorted(glob.glob(os.path.join(directory, "*.clock"))):
        with open(path) as f:
            starts.append(json.load(f)["configure"])
    if not starts:
        return []
    t0, lines = min(starts), ["", "worker   start-up  first test  last end   busy  last files (end, s)"]
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        worker = os.path.basename(path)[: -len(".json")]
        with open(os.path.join(directory, f"{worker}.clock")) as f:
            configure = json.load(f)["configure"]
        with open(path) as f:
            ran = {t: r["times"] for t, r in json.load(f).items() if "start" in r["times"] and "end" in r["times"]}
        if not ran:
            continue
        times = list(ran.values())
        first = min(t["start"] for t in times)
        files: dict[str, float] = {}
        for test in sorted(ran, key=lambda t: ran[t]["end"]):
            files[test.split("::")[0]] = ran[test]["end"] - t0
        tail = ", ".join(f"{name} ({end:.0f})" for name, end in list(files.items())[-3:])
        lines.append(
            f"{worker:8} {first - configure:8.1f} {first - t0:11.1f} {max(t['end'] for t in times) - t0:9.1f} "
            f"{sum(t.get('wall', 0) for t in times):6.1f}  {tail}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=_directory())
    parser.add_argument("--top", type=int, default=40, help="rows per table")
    args = parser.parse_args()
    print(summarize(args.dir, args.top))


if __name__ == "__main__":
    main()
