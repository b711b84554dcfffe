"""Real Python processes for the tests: one with some packages made unimportable (what an
install without them looks like), and one that holds a transfer lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

#: the environment of a child process: this test run's import path (the worktree's sources first)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

#: ``transfer ARGS`` as a child process
TRANSFER = [sys.executable, "-c", "import sys; from transfer.cli import main; main(sys.argv[1:])"]


def run_without(packages: tuple[str, ...], code: str, timeout: float = 120, args: tuple[str, ...] = ()
                ) -> subprocess.CompletedProcess:
    """Run ``code`` (its ``sys.argv[1:]``: ``args``) in a fresh interpreter where ``packages``
    (top-level names) cannot be imported."""
    prelude = textwrap.dedent(f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(packages)!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, _Block())
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def hold_lock(target: Path) -> subprocess.Popen:
    """Another process that takes the lock of ``target`` and keeps it until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from transfer.locks import locked
        with locked({str(target)!r}, purpose="test holder"):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code, "hold", str(target)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def wait_until_locked_by(target: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``proc`` holds the lock of ``target`` (its PID is in the lock file)."""
    from transfer.locks import lock_path

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(lock_path(target).read_text() or "{}").get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"process {proc.pid} did not take the lock of {target} (exit code {proc.poll()})")
