"""Advisory locks on the files and folders a command writes, so two processes never race.

``with locked(path):`` holds an exclusive lock on ``path`` (a run folder, a bundle folder
that export replaces, a predictions file) for as long as the block runs. The lock is the
kernel's ``flock`` on a small file beside the target, ``.NAME.lock``, which records the
holder: PID, command line, host and start time. A second process that asks for the same
path does not wait: it gets :class:`LockedError` (exit code 1) naming the holder.

A process that dies (a kill, a crash, a power cut) releases its ``flock`` with it; its
``.NAME.lock`` file may stay behind, and the next process takes it over (and says whose it
was). Inside one process the lock is re-entrant: an export holding a run folder can call
code that locks the same run folder again.

Locks are advisory: they keep ``transfer`` processes apart, not other programs. On a
network file system without ``flock`` support they protect nothing across machines.

Example::

    from transfer.locks import locked

    with locked(run_dir, purpose="train"):
        ...   # write the run folder; `transfer train --out run_dir` elsewhere now exits 1
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ._lazy import require
from .errors import OutputError, TransferError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: locks need the filelock package there
    fcntl = None


class LockedError(TransferError):
    """Another process holds the lock; ``holder`` is what it recorded (pid, command, since, host)."""

    exit_code = 1

    def __init__(self, message: str, *, holder: dict | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.holder = holder or {}


@dataclass
class Lock:
    """A held lock: the target, the lock file and, when a dead process's lock was taken over,
    what that process had recorded (``stale``)."""

    target: Path
    path: Path
    stale: dict | None = None


@dataclass
class _Held:
    fd: int
    lock: Lock
    count: int = 1


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.NAME.lock`` beside it (a folder that is replaced as a
    whole, such as a bundle, keeps its lock outside itself)."""
    t = _absolute(target)
    return t.parent / f".{t.name}.lock"


def _absolute(target: str | os.PathLike) -> Path:
    t = Path(os.path.abspath(os.fspath(target)))
    return Path(os.path.realpath(t.parent)) / t.name  # one key for every spelling of the path


def _me(purpose: str | None) -> dict:
    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv and sys.argv[0] else []
    command = " ".join(argv)[:300] or "python"
    return {"pid": os.getpid(), "command": command, "purpose": purpose, "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None


def pid_alive(pid) -> bool:
    """True when a process with this PID runs on this machine (or may: no permission to ask)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict | None) -> str:
    """``PID 123 (`transfer export runs/x`) on host, since 2026-...`` or a note that it is unknown."""
    if not holder:
        return "another process (it has not said which yet)"
    where = f" on {holder['host']}" if holder.get("host") and holder.get("host") != socket.gethostname() else ""
    return f"PID {holder.get('pid')} (`{holder.get('command')}`){where}, since {holder.get('since')}"


def _open_locked(path: Path, target: Path, purpose: str | None) -> tuple[int, dict | None]:
    """Open and flock ``path`` (retrying if a releasing holder removed it meanwhile); returns the
    descriptor and what a previous holder left in the file."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write {target} (its lock file {path}): {exc.strerror or exc}",
                              hint="choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = None
            for _ in range(10):  # the holder writes its record right after it locks
                holder = _read_holder(fd)
                if holder:
                    break
                time.sleep(0.05)
            os.close(fd)
            raise LockedError(f"{target} is in use by {describe(holder)}",
                              holder=holder,
                              hint="wait for that process to finish (or stop it); a lock left by a process that "
                                   "ended is taken over automatically") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_holder(fd)
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one


@contextlib.contextmanager
def locked(target: str | os.PathLike, *, purpose: str | None = None) -> Iterator[Lock]:
    """Hold the lock of ``target`` (a file or folder path; it need not exist yet).

    Args:
        target: what is about to be written.
        purpose: a word recorded for the holder's description (``export``, ``infer``).

    Yields:
        :class:`Lock` (``stale``: the record of a dead process whose lock was taken over).

    Raises:
        LockedError: another process holds it (the message names PID, command and since when).
        OutputError: the lock file cannot be created.
    """
    t = _absolute(target)
    key = str(t)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
    if held is not None:  # re-entrant inside one process
        try:
            yield held.lock
        finally:
            with _GUARD:
                held.count -= 1
        return
    if fcntl is None:  # pragma: no cover - Windows
        yield from _filelock(t)
        return
    path = lock_path(t)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {t}: {exc.strerror or exc} ({exc.filename or path.parent})",
                          hint="choose a folder you can write to") from None
    fd, previous = _open_locked(path, t, purpose)
    stale = previous if previous and previous.get("pid") != os.getpid() else None
    me = _me(purpose)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
    lock = Lock(t, path, stale)
    with _GUARD:
        _HELD[key] = _Held(fd, lock)
    try:
        yield lock
    finally:
        with _GUARD:
            _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a waiting opener sees the inode change and retries
        os.close(fd)


def _filelock(t: Path) -> Iterator[Lock]:  # pragma: no cover - Windows

    filelock = require("filelock", purpose="locks on Windows")
    lk = filelock.FileLock(str(lock_path(t)), timeout=0)
    try:
        lk.acquire()
    except filelock.Timeout:
        raise LockedError(f"{t} is in use by another transfer process",
                          hint="wait for that process to finish (or stop it)") from None
    try:
        yield Lock(t, lock_path(t))
    finally:
        lk.release()


def holder(target: str | os.PathLike) -> dict | None:
    """What the current holder of ``target``'s lock recorded, or ``None`` when it is free."""
    path = lock_path(target)
    if fcntl is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


__all__ = ["LockedError", "Lock", "locked", "lock_path", "holder", "describe", "pid_alive"]
