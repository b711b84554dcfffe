"""Pass/fail rules of verification and the safe bundle folder handling (no models needed)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from transfer.errors import BundleError
from transfer.export.bundle_writer import check_out, staged_bundle, tool_versions
from transfer.export.verify import accuracy_check, parity_check, summary_line

P = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
Y = np.array([0, 1, 0, 1])


def test_parity_check_limits():
    ok = parity_check(P, P + 5e-5, Y, atol=1e-4, min_agreement=0.999, reference_name="Keras")
    assert ok["passed"] and ok["limits"] == {"atol": 1e-4, "min_agreement": 0.999} and ok["reference"] == "Keras"
    assert "PASS" in summary_line("onnx-fp32", ok) and "vs Keras on 4 images" in summary_line("onnx-fp32", ok)
    assert not parity_check(P, P + 2e-4, Y, atol=1e-4, min_agreement=0.999, reference_name="k")["passed"]
    flipped = P.copy()
    flipped[2] = [0.4, 0.6]  # one top-1 flip of four
    v = parity_check(P, flipped, Y, atol=1.0, min_agreement=0.999, reference_name="k")
    assert not v["passed"] and v["top1_agreement"] == 0.75 and "FAIL" in summary_line("x", v)
    nan = P.copy()
    nan[0, 0] = np.nan
    assert not parity_check(P, nan, Y, atol=1.0, min_agreement=0.0, reference_name="k")["passed"]


def test_accuracy_check_limits():
    worse = P.copy()
    worse[2] = [0.4, 0.6]  # accuracy 1.0 -> 0.75
    v = accuracy_check(P, worse, Y, max_accuracy_drop=0.01, reference_name="onnx-fp32")
    assert not v["passed"] and v["accuracy_drop"] == pytest.approx(0.25)
    assert "drop 25.00 points, limit 1.00" in summary_line("onnx-int8", v)
    assert accuracy_check(P, worse, Y, max_accuracy_drop=0.3, reference_name="r")["passed"]
    assert accuracy_check(P, P * 0.9 + 0.05, Y, max_accuracy_drop=0.0, reference_name="r")["passed"]
    nan = P.copy()
    nan[:, :] = np.nan
    assert not accuracy_check(P, nan, Y, max_accuracy_drop=1.0, reference_name="r")["passed"]
    with pytest.raises(ValueError):
        accuracy_check(P, P, None, max_accuracy_drop=0.01, reference_name="r")


def test_check_out_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    check_out(tmp_path / "new", False, run)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", False, run)  # empty: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        check_out(tmp_path / "file", True, run)
    with pytest.raises(BundleError, match="would replace the run"):
        check_out(tmp_path, True, run)
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.onnx").write_text("m")
    (b / "manifest.json").write_text(json.dumps({"format": "transfer-bundle", "files": {"model.onnx": {}}}))
    with pytest.raises(BundleError, match="already holds a bundle"):
        check_out(b, False, run)
    check_out(b, True, run)
    (b / ".hidden-partial").write_text("tmp")  # hidden files do not count
    check_out(b, True, run)


@pytest.mark.parametrize("manifest, extra", [
    ({"name": "my web app"}, None),  # a manifest.json, but not a bundle's
    ({"format": "transfer-bundle", "files": {"model.onnx": {}}}, "src/important.txt"),  # a bundle plus user files
])
def test_force_never_replaces_a_folder_holding_anything_but_a_bundle(tmp_path, manifest, extra):
    """--force deletes the old folder: a web app's manifest.json or a user's notes inside a
    bundle must stop it (a reviewer lost a folder this way)."""
    b = tmp_path / "out"
    (b / "src").mkdir(parents=True)
    (b / "model.onnx").write_text("m")
    (b / "manifest.json").write_text(json.dumps(manifest))
    (b / "src" / "important.txt").write_text("precious")
    with pytest.raises(BundleError, match=extra or "no transfer manifest.json"):
        check_out(b, True, None)


def test_staged_bundle_swaps_in_or_leaves_the_old_one(tmp_path):
    out = tmp_path / "bundle"
    with staged_bundle(out) as tmp:
        assert tmp.name.startswith(".") and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with staged_bundle(out) as tmp:
            (tmp / "a.txt").write_text("2")
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "1"  # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no leftovers
    with staged_bundle(out) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_tool_versions_name_the_converters():
    v = tool_versions()
    for k in ("transfer", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "scikit-learn", "skl2onnx"):
        assert v.get(k), k


def test_out_inside_the_runs_own_folders_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "trials" / "arc2-t100").mkdir(parents=True)
    check_out(run / "bundle", False, run)  # the default
    check_out(run / "bundle-int8", False, run)  # any new name directly in the run
    for bad in ("trials/arc2-t100", "trials/new", "splits", "heads/x", "features"):
        with pytest.raises(BundleError, match="inside the run's own"):
            check_out(run / bad, True, run)


def test_a_folder_holding_only_hidden_files_is_not_in_the_way(tmp_path):
    out = tmp_path / "b"
    (out / ".git").mkdir(parents=True)
    check_out(out, False, None)  # e.g. a fresh repository for the bundle


def test_replacing_a_bundle_keeps_its_hidden_files(tmp_path):
    out = tmp_path / "bundle"
    with staged_bundle(out) as tmp:
        (tmp / "a.txt").write_text("1")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(KeyboardInterrupt):  # an interrupted replacement keeps everything
        with staged_bundle(out) as tmp:
            (tmp / "a.txt").write_text("2")
            raise KeyboardInterrupt
    assert (out / ".git" / "HEAD").is_file() and (out / "a.txt").read_text() == "1"
    with staged_bundle(out) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [".git", "b.txt"]
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_staging_folders_of_killed_exports_are_cleared(tmp_path):
    from transfer.export.bundle_writer import remove_stale_staging

    dead = 2 ** 22 + 12345  # above the usual pid_max: no such process
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    partial = tmp_path / f".bundle.partial-{dead}"
    (partial / ".git").mkdir(parents=True)  # hidden files it carried from the old bundle
    (partial / "model.onnx").write_text("half")
    (tmp_path / f".bundle.trt-{dead}").mkdir()
    alive = tmp_path / f".bundle.partial-{os.getppid()}"  # a live process's: not touched
    alive.mkdir()
    lines = []
    removed = remove_stale_staging(out, lines.append)
    assert sorted(removed) == sorted([partial.name, f".bundle.trt-{dead}"]) and alive.is_dir()
    assert (out / ".git").is_dir() and not partial.exists() and "killed" in lines[0]
    # killed between moving the old bundle aside and putting the new one in: the old one comes back
    shutil.move(out, tmp_path / f".bundle.old-{dead}")
    remove_stale_staging(out)
    assert (out / "manifest.json").is_file() and not (tmp_path / f".bundle.old-{dead}").exists()
