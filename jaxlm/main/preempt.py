"""Preemption and Ctrl-C: SIGTERM and a first SIGINT save the current step and stop the run.

SIGTERM (TPU VM maintenance, SLURM, Kubernetes) asks the run to save and exit 0; the first
SIGINT (Ctrl-C) does the same and then exits 130; a second SIGINT exits at once.

The signal handler only sets a flag. The training loop asks :meth:`Preemption.requested` after
each step; with several processes they agree at the next log boundary (one all-gather of the
flags there, so no extra host sync per step), all save the same step, and exit cleanly. A
watchdog ends the process with status 143 if that has not happened within the grace period,
so a scheduler's own kill never lands in the middle of a half-written checkpoint by surprise.

Ctrl-C: the handler is installed only while training steps run and only where SIGINT is not
ignored (a job started with ``nohup`` or in the background of a script keeps ignoring it).
The second SIGINT ends the process at once with status 130, also while the main thread is
inside a long native call (a device sync, a checkpoint wait), where Python would run its
handler only afterwards and see two presses as one: a watcher thread reads the signal wakeup
file descriptor and counts each press as it arrives. Checkpoints are written into a temporary
directory and renamed when complete, so the newest complete one is never damaged; the workdir
lock is removed on the way out. After a run stopped by Ctrl-C,
:func:`exit_if_interrupted` raises :class:`Interrupted` so the command exits with 130.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C
_state = {"interrupted": False, "exiting": False}


class Interrupted(KeyboardInterrupt):
    """The run stopped after the first Ctrl-C, its state saved."""


def exit_if_interrupted() -> None:
    """Raise :class:`Interrupted` if the run that just ended was stopped by Ctrl-C (the CLI exits 130)."""
    if _state["interrupted"]:
        _state["interrupted"] = False
        raise Interrupted("stopped by Ctrl-C after saving a checkpoint; rerun the same command to resume")


class Preemption:
    """Tracks SIGTERM and SIGINT and decides, consistently across processes, when to stop."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.triggered = False
        self._flag = threading.Event()
        self._timer: threading.Timer | None = None
        self._previous: Any = None
        self._previous_int: Any = None
        self._sigints = 0
        self._arrived = 0
        self._watch: _WakeupWatch | None = None
        _state["interrupted"] = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._previous_int = signal.signal(signal.SIGINT, self._on_signal)
                self._watch = _WakeupWatch(self._on_arrival)

    def _on_arrival(self, signum: int) -> None:
        # Runs on the watcher thread the moment a signal arrives, even while the main thread is
        # inside a long native call (a device sync, a checkpoint wait) where _on_signal must wait.
        if signum == signal.SIGINT:
            self._arrived += 1
            if self._arrived > 1:
                _hard_exit()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                _hard_exit()
            _state["interrupted"] = True
            _say("Ctrl-C: finishing this step and saving a checkpoint, then exiting (Ctrl-C again exits at once)")
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
        """Restore the previous SIGTERM and SIGINT handlers and stop the watchdog."""
        if self._timer is not None:
            self._timer.cancel()
        if threading.current_thread() is threading.main_thread():
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)
                self._previous = None
            if self._previous_int is not None:
                signal.signal(signal.SIGINT, self._previous_int)
                self._previous_int = None
            if self._watch is not None:
                self._watch.close()
                self._watch = None


# The watcher thread and the main thread's handler can both see the second press and race into
# _hard_exit; without one owner, the second caller found the lock already taken out of the held
# list (its fd cleared, the file not yet unlinked) and called os._exit before the first had
# removed WORKDIR/.lock. An RLock, because a third press can re-enter on the main thread.
_EXIT_LOCK = threading.RLock()


def _hard_exit() -> None:
    with _EXIT_LOCK:  # another thread waits here until the owner's os._exit ends the process
        if _state["exiting"]:
            return  # re-entered on the thread already exiting (a third press): let it finish
        _state["exiting"] = True
        _say("second Ctrl-C: exiting now; the newest complete checkpoint is kept, rerun to resume from it")
        _release_locks()
        os._exit(EXIT_INTERRUPTED)


class _WakeupWatch:
    """Calls ``on_signal(signum)`` from a thread as each handled signal arrives (``signal.set_wakeup_fd``).

    Python runs signal handlers on the main thread between bytecodes only; the wakeup file
    descriptor is written by the C-level handler at once, so a thread reading it sees the signal
    while the main thread is still blocked in native code.
    """

    def __init__(self, on_signal: Any) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._closed = False
        try:
            self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            self._previous_fd = None
            self._closed = True
            return
        self._thread = threading.Thread(target=self._run, args=(on_signal,), name="jaxlm-sigint", daemon=True)
        self._thread.start()

    def _run(self, on_signal: Any) -> None:
        while True:
            data = os.read(self._read, 64)
            if self._closed or not data:
                return
            for signum in data:
                on_signal(signum)

    def close(self) -> None:
        """Give the wakeup fd back to its previous owner and end the thread."""
        if self._closed:
            return
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        self._closed = True
        os.write(self._write, b"\0")  # wakes the thread, which sees _closed and returns
        self._thread.join(timeout=5)
        os.close(self._write)
        os.close(self._read)


def _say(message: str) -> None:
    # os.write, not print: a signal handler may run while the main thread is inside a print.
    os.write(2, (message + "\n").encode())


def _release_locks() -> None:
    from jaxlm.main import lock

    lock.release_all()
