"""Commands that write into a run folder hold its lock: while another process writes the run
(a resumed `transfer train`, another analysis command), they exit 1 naming it and write nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers.processes import ENV, TRANSFER, hold_lock


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run folder as `transfer train` leaves it before its first trial (enough to be opened)."""
    from transfer.runfolder import RunWriter

    run = tmp_path / "run"
    w = RunWriter(run)
    w.write_run_json("test")
    w.write_config("data: x\n")
    w.write_dataset({"root": str(tmp_path), "class_names": ["a", "b"], "num_images": 0})
    (run / "splits").mkdir()
    return run


@pytest.mark.parametrize("args", [["heads"], ["evaluate"], ["features"], ["gradcam"], ["resolution"]],
                         ids=lambda a: a[0])
def test_a_command_that_writes_into_a_held_run_is_refused(run_dir, args):
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    holder = hold_lock(run_dir)
    try:
        r = subprocess.run(TRANSFER + args + [str(run_dir)], capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert r.returncode == 1, r.stderr
    assert f"is in use by PID {holder.pid}" in r.stderr and "test holder" not in r.stdout
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
