"""Preemption: SIGTERM (TPU VM maintenance, SLURM, Kubernetes) asks the run to save and exit 0.

The signal handler only sets a flag. The training loop asks :meth:`Preemption.requested` after
each step; with several processes they agree at the next log boundary (one all-gather of the
flags there, so no extra host sync per step), all save the same step, and exit cleanly. A
watchdog ends the process with status 143 if that has not happened within the grace period,
so a scheduler's own kill never lands in the middle of a half-written checkpoint by surprise.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np


class Preemption:
    """Tracks a SIGTERM and decides, consistently across processes, when to stop."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.triggered = False
        self._flag = threading.Event()
        self._timer: threading.Timer | None = None
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._flag.set()
        if self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        print(f"preemption: no clean exit within {self.grace_s:.0f}s; exiting with 143", file=sys.stderr, flush=True)
        os._exit(143)

    def requested(self, step: int, sync_every: int) -> bool:
        """Whether to save and stop after ``step`` (the same answer on every process)."""
        if jax.process_count() == 1:
            self.triggered = self._flag.is_set()
        elif step % sync_every == 0:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array([self._flag.is_set()], dtype=np.int32))
            self.triggered = bool(np.asarray(flags).any())
        return self.triggered

    def done(self) -> None:
        """Restore the previous SIGTERM handler and stop the watchdog."""
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
