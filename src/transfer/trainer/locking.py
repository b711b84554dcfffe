"""One writer per run folder: an advisory lock that ``transfer train`` holds while it writes.

``with run_lock(folder, command="transfer train"):`` takes an exclusive ``flock`` on
``folder/.transfer.lock`` and records who holds it (PID, host, command, since when) in
``folder/.transfer.lock.json``. A second process gets :class:`FolderLockedError` naming
the holder at once. The operating system releases the lock when its holder dies (even
by SIGKILL), so a lock left by a killed process is simply taken over; the stale holder
record is overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from ..errors import TransferError
from ..fsutil import write_json_atomic

LOCK_FILE = ".transfer.lock"
HOLDER_FILE = ".transfer.lock.json"


class FolderLockedError(TransferError):
    """Another process is writing the folder."""


def _holder(folder: Path) -> str:
    for _ in range(20):  # the holder writes its record right after taking the lock
        try:
            info = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
            return (f"PID {info.get('pid')} on {info.get('host')} ({info.get('command')}, since "
                    f"{info.get('since')})")
        except (OSError, ValueError):
            time.sleep(0.05)
    return "another process"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, *, command: str) -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block.

    Raises:
        FolderLockedError: another process holds it (the message names it).
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderLockedError(f"{folder} is in use by {_holder(folder)}",
                                hint="wait until that run ends (or stop it), or write to another folder") from None
    try:
        write_json_atomic(folder / HOLDER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / HOLDER_FILE).unlink()
        lock.release()
