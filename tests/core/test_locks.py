"""Locks with real processes: a second process gets LockedError naming the first (PID, command,
since when); a killed holder's lock is taken over; two `transfer infer --out same.csv` never
interleave rows (the second exits 1 naming the first)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess

import pytest

from helpers.bundle_factory import make_bundle
from helpers.image_files import solid_pngs
from helpers.processes import ENV, TRANSFER, hold_lock, wait_until_locked_by
from transfer.locks import LockedError, holder, lock_path, locked


def test_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    target = tmp_path / "run"
    p = hold_lock(target)
    try:
        with pytest.raises(LockedError) as e:
            with locked(target):
                pass
        assert f"PID {p.pid}" in e.value.message and "hold" in e.value.message and "since" in e.value.message
        assert e.value.exit_code == 1 and e.value.holder["pid"] == p.pid
        assert holder(target)["pid"] == p.pid
    finally:
        p.send_signal(signal.SIGKILL)  # killed: no chance to clean up
        p.wait()
    assert lock_path(target).exists()  # its lock file stays behind ...
    with locked(target) as lk:  # ... and is taken over
        assert lk.stale["pid"] == p.pid
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert not lock_path(target).exists() and holder(target) is None


def test_locks_are_reentrant_inside_one_process(tmp_path):
    with locked(tmp_path / "x") as a:
        with locked(tmp_path / "x") as b:  # e.g. export holding a run, then fitting a head into it
            assert a is b
        assert lock_path(tmp_path / "x").exists()
    assert not lock_path(tmp_path / "x").exists()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """2,000 image files (links to a few real PNGs)."""
    d = tmp_path_factory.mktemp("many")
    real = solid_pngs(d / "real", [10, 100, 200], (8, 8))
    folder = d / "imgs"
    folder.mkdir()
    for i in range(2000):
        os.symlink(real[i % 3], folder / f"{i:05d}.png")
    return folder


def test_infer_out_held_by_another_process_is_refused(tmp_path, many_images):
    b = make_bundle(tmp_path / "b")
    out = tmp_path / "same.csv"
    out.write_text("the previous predictions\n")
    p = hold_lock(out)
    try:
        r = subprocess.run([*TRANSFER, "infer", str(b), str(many_images / "00001.png"), "--out", str(out)],
                           capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        p.stdin.close()
        p.wait()
    assert r.returncode == 1 and f"PID {p.pid}" in r.stderr and "hint:" in r.stderr, r.stderr
    assert out.read_text() == "the previous predictions\n"  # untouched, no partial file either
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".same")]


def test_two_infers_on_one_out_exactly_one_proceeds(tmp_path, many_images):
    b = make_bundle(tmp_path / "b")
    out = tmp_path / "same.csv"
    args = ["infer", str(b), str(many_images), "--out", str(out), "--batch", "4", "--workers", "1", "-q"]
    first = subprocess.Popen([*TRANSFER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_until_locked_by(out, first)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run (as a slow disk would), so the two surely overlap
    try:
        second = subprocess.run([*TRANSFER, *args], capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 1 and f"PID {first.pid}" in second.stderr, second.stderr
    data = out.read_bytes()
    assert b"\x00" not in data
    rows = list(csv.DictReader(data.decode().splitlines()))
    assert len(rows) == 2000 and [r["path"] for r in rows] == sorted(str(f) for f in many_images.iterdir())
    assert not list(tmp_path.glob(".same.csv*"))
