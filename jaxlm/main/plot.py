"""``jaxlm plot WORKDIR [WORKDIR ...] --out FILE.png``: training curves from ``metrics.jsonl``.

One panel per logged metric (``loss`` and ``eval_loss`` first, then the others by name), the
metric against the step, one line per workdir so that runs can be compared. A metric that a
workdir never logged is simply absent from its panel. Non-finite values (written as
``"nan"``/``"inf"``) leave a gap; text labels (a metric's implementation and version) are not
plotted. When a resumed run logged a step twice, its last record counts. A truncated last line
(a run killed mid-write) is skipped.

Needs matplotlib (``pip install 'jaxlm[plot]'``); the figure is drawn without pyplot, so no
display or global state is involved.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from jaxlm.common_types import UserError
from jaxlm.main import workdir as workdir_lib
from jaxlm.metric_writer import METRICS_FILE

# Bookkeeping fields of every record, not metrics.
NOT_METRICS = ("step", "time")
# Panels shown first, in this order, when logged.
FIRST = ("loss", "eval_loss")

Series = dict[str, dict[int, float]]  # metric -> step -> value


def read_series(workdir: str) -> Series:
    """The numeric metrics of ``workdir/metrics.jsonl`` as ``{metric: {step: value}}``.

    Raises a :class:`UserError` when the workdir or its metrics are missing or empty.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isdir(workdir):
        raise UserError(f"{workdir} is not a directory; give the workdir of a training run")
    if not os.path.isfile(path):
        raise UserError(f"{workdir} has no {METRICS_FILE}; train there first (jaxlm train --workdir {workdir})")
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    series: Series = {}
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run killed while writing its last line
                continue
            raise UserError(f"{path}, line {i + 1}, is not JSON; fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}, line {i + 1}, has no integer 'step'; fix or remove that line")
        for key, value in record.items():
            number = _number(value)
            if key not in NOT_METRICS and number is not None:
                series.setdefault(key, {})[record["step"]] = number
    if not series:
        raise UserError(f"{path} holds no metrics yet; train longer (metrics are written every train.log_every steps)")
    return series


def _number(value: Any) -> float | None:
    """A plottable float: numbers as they are, ``"nan"``/``"inf"`` as non-finite; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(value)
    return None


def metric_order(names: set[str]) -> list[str]:
    """``loss`` and ``eval_loss`` first, then the other metrics by name."""
    return [n for n in FIRST if n in names] + sorted(names - set(FIRST))


def _labels(workdirs: Sequence[str]) -> list[str]:
    """Short legend labels: the directory names, or the full paths where names repeat."""
    names = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def run(workdirs: Sequence[str], out: str, *, metrics: Sequence[str] = ()) -> list[str]:
    """Draw the curves of ``workdirs`` into ``out`` (its extension picks the format); returns the metrics drawn.

    ``metrics`` limits the panels to those names (default: every metric any workdir logged).
    """
    if not workdirs:
        raise UserError("jaxlm plot needs at least one WORKDIR; e.g. jaxlm plot runs/a runs/b --out curves.png")
    paths = [workdir_lib.check_path(w, must_exist=True) for w in workdirs]
    data = [read_series(p) for p in paths]
    logged = set().union(*data)
    if metrics:
        unknown = [m for m in metrics if m not in logged]
        if unknown:
            raise UserError(
                f"--metrics {','.join(unknown)} not logged by these workdirs; logged: {', '.join(metric_order(logged))}"
            )
        names = list(metrics)
    else:
        names = metric_order(logged)

    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("jaxlm plot needs matplotlib; pip install 'jaxlm[plot]'") from None
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; give an image file such as {os.path.join(out, 'curves.png')}")
    fmt = os.path.splitext(out)[1].lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"--out {out}: unknown image format {fmt!r}; use one of: {', '.join(sorted(supported))}")

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(5 * cols, 3.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for label, series in zip(_labels(workdirs), data):
            if name in series:
                steps = sorted(series[name])
                ax.plot(steps, [series[name][s] for s in steps], label=label, marker="." if len(steps) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UserError(f"--out {out} cannot be written ({e.strerror or e}); pick another path") from None
    return names
