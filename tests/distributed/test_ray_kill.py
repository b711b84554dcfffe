"""Kill a ``transfer train --ray`` sweep mid-trial (the whole process group: driver, Ray
and its workers) and re-run the same command: it resumes from the last finished epoch."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason='Ray is optional: pip install "transfer[distributed]"')
from helpers.trainer import make_pattern_folder

EPOCHS = 40  # long enough that the orphaned workers die before they finish (see docs/distributed.md)


def _cmd(data, run):
    exe = Path(sys.executable).with_name("transfer")
    return [str(exe), "train", str(data), "--backbone", "arc2", "--trainable", "0,1", "--weights", "none",
            "--epochs", str(EPOCHS), "--image-size", "16", "--batch-size", "8", "--patience", "0", "--lr", "3e-3",
            "--workers", "1", "--ray", "--cpus-per-trial", "1", "--out", str(run)]


def _epoch(run, name):
    p = run / "trials" / name / "state.json"
    try:
        return json.loads(p.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def _state(run, name):
    try:
        return json.loads((run / "trials" / name / "status.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_killed_ray_sweep_resumes(tmp_path):
    data = make_pattern_folder(tmp_path / "data", per_class=24)
    run = tmp_path / "run"
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    p = subprocess.Popen(_cmd(data, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env=env)
    names = ("arc2-t000", "arc2-t100")
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if max(_epoch(run, n) for n in names) >= 3:
            break
        time.sleep(0.2)
    assert p.poll() is None, "the sweep ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    # Ray's workers notice the dead raylet within seconds and exit; a worker may still
    # commit the epoch it was finishing: wait until the trial folders stop changing
    before, stable_since = {n: _epoch(run, n) for n in names}, time.time()
    while time.time() - stable_since < 4:
        time.sleep(0.5)
        now = {n: _epoch(run, n) for n in names}
        if now != before:
            before, stable_since = now, time.time()
    done_before = {n: _state(run, n) == "done" for n in names}
    assert max(before.values()) >= 3 and min(before.values()) < EPOCHS, before
    assert not (run / "sweep.csv").exists()

    r = subprocess.run(_cmd(data, run), capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    for n in names:
        tdir = run / "trials" / n
        assert json.loads((tdir / "status.json").read_text())["state"] == "done"
        with open(tdir / "history.csv", newline="") as fh:
            epochs = [int(row["epoch"]) for row in csv.DictReader(fh)]
        assert epochs == list(range(1, EPOCHS + 1)), (n, epochs)
        if 1 <= before[n] < EPOCHS:  # resumed from its last committed epoch, not retrained
            assert f"[{n}] resuming after epoch {before[n]}" in out, [l for l in out.splitlines() if "arc2-t" in l]
        if done_before[n]:
            assert f"{n}: already done, skipped" in out
    with open(run / "sweep.csv", newline="") as fh:
        assert len(list(csv.reader(fh))) >= 2
