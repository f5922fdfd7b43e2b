"""One writer per workdir: ``jaxlm train`` holds an exclusive lock on its workdir while it runs.

The lock is the file ``WORKDIR/.lock``. It holds a JSON record of the holder (host, pid, start
time, command), for the message a second run prints, and is locked with ``fcntl.flock`` where
the filesystem supports it, so the operating system releases it when the holder dies, however
it dies. A second ``jaxlm train`` on the same workdir stops with a one-line
:class:`~jaxlm.common_types.CheckpointError` naming the holder.

A record left behind by a killed run (kill -9, a crashed node) is stale: the OS lock is free,
or, where the filesystem has no OS locks, the recorded process no longer exists on this host.
The next run takes it over and says so in one line. On a filesystem without OS locks a record
written by another host cannot be checked and is refused; the message says how to clear it.

With several processes only process 0 takes the lock (they share one workdir); the others
wait for its answer and stop with it if the workdir is taken. ``eval``, ``generate``,
``predict`` and ``info`` only read a workdir and never take the lock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from typing import Any, TextIO

import jax
import numpy as np

from jaxlm.common_types import CheckpointError

LOCK_FILE = ".lock"
# flock errors that mean "this filesystem has no OS-level locks" (some network filesystems).
_NO_OS_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

try:
    import fcntl
except ImportError:  # not POSIX: the record alone decides
    fcntl = None  # type: ignore[assignment]

_HELD: list[WorkdirLock] = []  # locks this process holds, for release_all on a hard exit


class WorkdirLock:
    """The lock on one workdir, held by this process until :meth:`release`."""

    def __init__(self, workdir: str, fd: int | None, created_dir: bool) -> None:
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = fd
        self._created_dir = created_dir
        if fd is not None:
            _HELD.append(self)

    @property
    def held(self) -> bool:
        """Whether this process still holds the lock (False on processes other than 0)."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the OS lock; remove the workdir again if this run created it empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if self in _HELD:
            _HELD.remove(self)
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)  # while still locked, so no other run can lock the old file
        except OSError:
            pass
        finally:
            os.close(fd)
        if self._created_dir:
            try:
                os.rmdir(self.workdir)  # only succeeds when the run wrote nothing (it failed its checks)
            except OSError:
                pass

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def release_all() -> None:
    """Release every lock this process holds (before ``os._exit`` on a second Ctrl-C)."""
    for held in list(_HELD):
        held.release()


def acquire(workdir: str, *, command: str = "jaxlm train", stream: TextIO | None = None) -> WorkdirLock:
    """Take the lock on ``workdir`` (process 0; the others wait for its answer), creating the directory.

    Raises CheckpointError (one line) when another live run holds it or the directory cannot
    be created or written.
    """
    stream = stream or sys.stderr
    if jax.process_count() == 1:
        return _take(workdir, command, stream)
    from jax.experimental import multihost_utils

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = _take(workdir, command, stream)
        except CheckpointError as e:
            error = e
    ok = multihost_utils.broadcast_one_to_all(np.array(error is None, dtype=np.int32))
    if error is not None:
        raise error
    if not int(ok):
        raise CheckpointError(
            f"--workdir {workdir} cannot be locked by process 0 (its message says why); "
            "fix that and restart all processes"
        )
    return lock or WorkdirLock(workdir, None, False)


def read_holder(workdir: str) -> dict[str, Any] | None:
    """The record of the run holding (or that last held) the lock on ``workdir``, or None."""
    try:
        with open(os.path.join(workdir, LOCK_FILE), encoding="utf-8") as f:
            return _parse(f.read())
    except OSError:
        return None


def _take(workdir: str, command: str, stream: TextIO) -> WorkdirLock:
    created = not os.path.isdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise CheckpointError(_cannot_write(workdir, e)) from None
    path = os.path.join(workdir, LOCK_FILE)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(_cannot_write(workdir, e)) from None
        try:
            os_locked = _flock(fd)
            if os_locked and not _same_file(fd, path):
                os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
                continue
            holder = _parse(_read(fd))
            if os_locked is False or (os_locked is None and holder and _alive_elsewhere(holder)):
                raise CheckpointError(_busy_message(workdir, holder, os_locked is None))
            if holder:
                print(f"notice: --workdir {workdir}: {_stale_note(holder)}", file=stream, flush=True)
            _write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "command": command})
        except CheckpointError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise CheckpointError(_cannot_write(workdir, e)) from None
        return WorkdirLock(workdir, fd, created)
    raise CheckpointError(f"--workdir {workdir}: its lock file keeps changing; another run is starting there")


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: no OS locks on this filesystem."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_OS_LOCKS:
            return None
        raise


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _write(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _parse(text: str) -> dict[str, Any] | None:
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"host": "?", "pid": 0, "started": "?", "command": "?"}  # damaged: stale unless OS-locked
    return record if isinstance(record, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _alive_elsewhere(holder: dict[str, Any]) -> bool:
    """Without OS locks: whether the recorded holder may still be running (unknowable on another host)."""
    if holder.get("host") != socket.gethostname():
        return holder.get("host") != "?"
    return holder.get("pid") != os.getpid() and _pid_alive(holder.get("pid"))


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return (
        f"{holder.get('command', 'jaxlm train')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')})"
    )


def _busy_message(workdir: str, holder: dict[str, Any] | None, record_only: bool) -> str:
    how = (
        f"wait for it to finish, stop it (kill {holder.get('pid')} on {holder.get('host')}; "
        "rerunning resumes from its last checkpoint), or use another --workdir"
        if holder
        else "wait for it to finish or use another --workdir"
    )
    if record_only and holder and holder.get("host") != socket.gethostname():
        how += f"; if no run uses it any more, delete {os.path.join(workdir, LOCK_FILE)}"
    return f"--workdir {workdir} is in use by {_describe(holder)}; {how}"


def _stale_note(holder: dict[str, Any]) -> str:
    gone = holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))
    why = "which is no longer running" if gone else "which no longer holds it"
    return f"taking over the lock left by {_describe(holder)}, {why}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _cannot_write(path: str, e: OSError) -> str:
    """One line naming the path that cannot be created or written, why, and the fix."""
    return writable_dir_message(f"--workdir {path}", path, e)


def writable_dir_message(what: str, path: str, e: OSError) -> str:
    """``what`` cannot be created/written at ``path`` because of ``e``: one line with the fix."""
    where = e.filename if isinstance(e.filename, str) and e.filename != path else ""
    reason = e.strerror or str(e)
    fix = {
        errno.ENOENT: "create its parent directory first or pick another path",
        errno.ENOTDIR: "a part of the path is a file, not a directory; pick another path",
        errno.EACCES: "no write permission; fix the permissions or pick another path",
        errno.EPERM: "no write permission; fix the permissions or pick another path",
        errno.EROFS: "the filesystem is read-only; pick a path on a writable one",
        errno.ENOSPC: "the disk is full; free space or pick another disk",
        errno.EDQUOT: "the disk quota is exceeded; free space or pick another disk",
        errno.EEXIST: "a file is in the way; remove it or pick another path",
    }.get(e.errno or 0, "pick a writable path")
    return f"{what} cannot be created or written ({reason}{' at ' + where if where else ''}); {fix}"
