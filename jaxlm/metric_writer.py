"""Metrics to stdout, ``WORKDIR/metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> float | int | str:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, str):  # a label beside the numbers, e.g. the metric's implementation and version
        return value
    return value if isinstance(value, int) else float(value)


def _summary_writer_class() -> Any:
    """The ``tensorboardX.SummaryWriter`` class, or None when tensorboardX is not installed (logging is optional).

    tensorboardX imports torch at import time when torch is installed, only to recognize torch
    tensors: 2 s of every ``jaxlm train`` start (2-core AVX2 EPYC). jaxlm hands it Python floats, so
    torch is hidden while tensorboardX is imported (unless something already imported it).
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if hide:
            sys.modules.pop("torch", None)  # a later `import torch` (e.g. the HF interop) works as usual
    return SummaryWriter


class MetricWriter:
    """Writes one JSON object per event (``{"step": N, "loss": ...}``) and TensorBoard scalars.

    Only the lead process (``write=True``) writes files; every process may call it.
    """

    def __init__(self, workdir: str, *, write: bool = True, stream: TextIO | None = None) -> None:
        self._write = write
        self._stream = stream if stream is not None else sys.stdout
        self._jsonl = None
        self._tb = None
        if write:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
            SummaryWriter = _summary_writer_class()  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def write(self, step: int, metrics: dict[str, Any], *, echo: bool = True) -> dict[str, float | int | str]:
        """Record ``metrics`` at ``step``; returns them as Python scalars (strings pass through, not to TensorBoard)."""
        values = {k: _scalar(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": int(step), "time": round(time.time(), 3)}
            record.update({k: (v if isinstance(v, str) or math.isfinite(v) else str(v)) for k, v in values.items()})
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if not isinstance(v, str):
                    self._tb.add_scalar(k, v, int(step))
        if echo and self._write:
            text = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            print(f"step {step}: {text}", file=self._stream, flush=True)
        return values

    def close(self) -> None:
        """Flush and close the files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(v: float | int | str) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``WORKDIR/metrics.jsonl`` (empty if none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
