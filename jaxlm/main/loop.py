"""The cadence helpers every training program shares: logging, eval and checkpoint timing, numerics, progress.

``jaxlm train`` (language models and fine-tuning) and the other programs (text GANs, PEFT)
each read top to bottom and call these, instead of a trainer class with hooks: the loop body
stays visible in the program while what it does every N steps is written once.

Step metrics are flat dicts of scalars. :func:`average` reduces one log interval's worth
generically (mean of every key; ``nonfinite`` is counted), so a program can log any metrics it
likes (``d_loss``, ``g_loss``) without touching this module.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from jaxlm.common_types import UserError
from jaxlm.config_lib import Config


class NonFiniteError(UserError):
    """Training produced non-finite losses or gradients more often than the policy allows."""


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When to log, evaluate and checkpoint, from the validated config (cadences already resolved)."""

    log_every: int
    eval_every: int
    checkpoint_every: int
    end: int

    @classmethod
    def from_config(cls, config: Config, end: int) -> Cadence:
        """The config's cadences for a run that stops after step ``end``."""
        return cls(config.train.log_every, config.train.eval_every, config.checkpoint.every_steps, end)

    def log_due(self, step: int) -> bool:
        """Log (and sync with the host) after this step."""
        return step % self.log_every == 0 or step == self.end

    def eval_due(self, step: int) -> bool:
        """Run a periodic evaluation after this step (the final one is the program's)."""
        return bool(self.eval_every) and step % self.eval_every == 0 and step != self.end

    def checkpoint_due(self, step: int) -> bool:
        """Save a checkpoint after this step."""
        return step % self.checkpoint_every == 0 or step == self.end


class Interval:
    """Step metrics of one log interval, kept on the device until the interval ends (one host sync)."""

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, Any]) -> None:
        """Keep one step's metrics (device arrays; nothing is fetched here)."""
        self.pending.append(metrics)

    def close(self) -> tuple[list[dict[str, Any]], float]:
        """Fetch the interval's metrics (the host sync) and return them with the seconds per step."""
        fetched = jax.device_get(self.pending)
        seconds = (time.perf_counter() - self.start) / max(len(fetched), 1)
        self.pending, self.start = [], time.perf_counter()
        return fetched, seconds

    def restart_clock(self) -> None:
        """Exclude what just happened (an evaluation, a save) from the next interval's timing."""
        self.start = time.perf_counter()


def average(fetched: list[dict[str, Any]]) -> dict[str, float | int]:
    """One interval's step metrics as one flat dict: each key's mean over the steps that logged it.

    ``nonfinite`` becomes a count (``nonfinite_steps``).
    """
    out: dict[str, float | int] = {}
    keys = {k for m in fetched for k in m}  # programs that alternate steps (GANs) log different keys per step
    for key in sorted(keys, key=lambda k: (not k.endswith("loss"), k)):  # losses first, as read
        values = [float(np.asarray(m[key])) for m in fetched if key in m]
        if key == "nonfinite":
            out["nonfinite_steps"] = int(sum(values))
        else:
            out[key] = float(np.mean(values))
    return out


def check_numerics(fetched: list[dict[str, Any]], step: int, run: int, config: Config) -> int:
    """Apply ``config.train.nonfinite_policy`` to the steps of one log interval (their ``nonfinite`` flags).

    Returns the length of the current run of non-finite steps; raises when the policy says stop.
    The state itself never takes a non-finite update (see ``steps.lm.train_step``), so every
    checkpoint already written, and the one the run resumes from, is finite.
    """
    first = step - len(fetched) + 1
    for i, m in enumerate(fetched):
        if float(m["nonfinite"]) == 0.0:
            run = 0
            continue
        run += 1
        limit = 1 if config.train.nonfinite_policy == "stop" else config.train.max_nonfinite_steps
        if run >= limit:
            raise NonFiniteError(
                f"training stopped at step {first + i}: non-finite loss or gradients in {run} step(s) in a row "
                f"(config.train.nonfinite_policy={config.train.nonfinite_policy!r}); lower config.optim.lr, "
                "check the data, or resume from the last checkpoint"
            )
    return run


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (a no-op with one process)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(start: int, end: int, enabled: bool, desc: str = "train") -> Any:
    """A tqdm bar on stderr when it is a terminal (or JAXLM_PROGRESS=1), else a no-op with the same methods."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(
        total=end,
        initial=start,
        desc=desc,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not os.isatty(2) and os.environ.get("JAXLM_PROGRESS", "") != "1",
    )
