"""`transfer data audit`: duplicates, leakage, label issues, outliers and quality on real images,
change detection, and the group-keeping split of `transfer.data.dedupe`."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers.corrupt import score_audit, write_corrupted
from transfer.analysis.audit import audit_folder
from transfer.data import dedupe
from transfer.data.fingerprint import fingerprint_array
from transfer.data.splits import Sample, split_samples


def _small_folder(pattern_data: Path, root: Path) -> Path:
    """The pattern folder plus: an exact copy under another class, a resized copy, a blank image, a broken file."""
    shutil.copytree(pattern_data, root)
    shutil.copyfile(root / "c0" / "000.png", root / "c1" / "dup_of_c0_000.png")
    with Image.open(root / "c2" / "003.png") as im:
        im.resize((32, 32), Image.Resampling.BILINEAR).save(root / "c2" / "big_003.png")
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / "c0" / "blank.png")
    (root / "c1" / "broken.png").write_bytes(b"not an image")
    return root


def _kinds(rows, path):
    return {r["kind"] for r in rows if r["path"] == path}


@pytest.fixture(scope="module")
def small_audit(pattern_data, tmp_path_factory):
    """``(data, result)``: one ONNX Runtime audit of :func:`_small_folder` (arc2, random weights,
    16 px) for the tests of this module to read; a test that changes the folder or the audit
    works on copies of both."""
    root = tmp_path_factory.mktemp("small-audit")
    data = _small_folder(pattern_data, root / "data")
    return data, audit_folder(data, backbone="arc2", weights="none", image_size=16, out=root / "audit")


def test_audit_finds_planted_problems_and_detects_changes(small_audit, tmp_path):
    res = small_audit[1]
    for f in ("audit.csv", "audit.json", "audit.html", "files.csv", "features.npy"):
        assert (res.out / f).is_file(), f
    # copies: the second half of this test changes a file and audits again
    data = shutil.copytree(small_audit[0], tmp_path / "data")
    shutil.copytree(res.out, tmp_path / "audit")
    rows = res.rows
    assert "unreadable" in _kinds(rows, "c1/broken.png")
    assert {"exact_duplicate", "conflicting_labels"} <= _kinds(rows, "c1/dup_of_c0_000.png")
    assert "near_duplicate" in _kinds(rows, "c2/big_003.png") and "near_duplicate" in _kinds(rows, "c2/003.png")
    assert "blank" in _kinds(rows, "c0/blank.png")
    s = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert s["images"] == 64 and s["readable"] == 63
    assert s["class_balance"] == {"c0": 21, "c1": 21, "c2": 21}
    assert any(set(g["paths"]) == {"c0/000.png", "c1/dup_of_c0_000.png"} for g in s["groups"])
    # the features came from ONNX Runtime, checked against Keras on the first images; the pass's
    # pixels are load_image's (a plain backbone: today's recipe)
    eng = s["feature_engine"]["source"]
    assert eng["engine"] == "onnxruntime" and eng["parity_images"] == 32 and eng["parity_relative"] <= 1e-4
    assert eng["conversion"] in ("in process", "cache")  # converted beside the reading, in this process
    assert s["feature_engine"]["pixels"]["max_abs_diff"] == 0 and s["feature_engine"]["pixels"]["images"] == 32
    # a backbone never saw the labels: one group, judged by its features and the pixels
    (judged,) = s["label_issues"]["groups"]
    assert judged["group"] == "all" and judged["images"] == 63 and set(judged["views"]) == {"backbone", "pixels"}
    with open(tmp_path / "audit" / "audit.csv", newline="") as f:
        assert list(csv.DictReader(f))[0].keys() >= {"path", "kind", "score", "group", "suggested_label"}
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "data:image/png;base64," in page and "Exact duplicates" in page
    # nothing changed: reused; a changed file: detected by its hash and audited again
    lines: list[str] = []
    again = audit_folder(data, backbone="arc2", weights="none", image_size=16, out=tmp_path / "audit",
                         progress=lines.append)
    assert again.reused and any("nothing changed" in ln for ln in lines)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "c2" / "005.png")
    lines.clear()
    third = audit_folder(data, backbone="arc2", weights="none", image_size=16, out=tmp_path / "audit",
                         progress=lines.append)
    assert not third.reused and any("1 changed, 0 added, 0 removed" in ln for ln in lines)
    assert "dark" in _kinds(third.rows, "c2/005.png") or "blank" in _kinds(third.rows, "c2/005.png")


def test_audit_features_fall_back_to_keras(small_audit, tmp_path, monkeypatch):
    """When ONNX Runtime's features differ from Keras's (forced here by a negative tolerance), the
    audit says so and computes every feature with Keras: the same features as ONNX Runtime's run."""
    from transfer.analysis import audit_engine

    data, ort = small_audit
    assert ort.summary["feature_engine"]["source"]["engine"] == "onnxruntime"
    monkeypatch.setattr(audit_engine, "PARITY_TOLERANCE", -1.0)
    lines: list[str] = []
    res = audit_folder(data, out=tmp_path / "keras", progress=lines.append, backbone="arc2", weights="none",
                       image_size=16)
    eng = res.summary["feature_engine"]["source"]
    assert eng["engine"] == "keras" and "differ from Keras's" in eng["why"] and eng["parity_images"] == 32
    assert any("features by Keras" in ln for ln in lines)
    a, b = np.load(ort.out / "features.npy"), np.load(tmp_path / "keras" / "features.npy")
    assert a.shape == b.shape == (63, 64) and np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
    assert res.summary["counts"] == json.loads((ort.out / "audit.json").read_text())["counts"]


def test_an_audit_of_the_same_model_takes_it_from_the_cache_and_a_damaged_entry_is_replaced(small_audit, tmp_path,
                                                                                             monkeypatch):
    """The small audit's conversion and Keras reference were kept (the session's user cache): the
    same folder audited into another folder takes both from there -- no TensorFlow at all -- and
    gets the same features, checked as ever on its own pixels. A kept reference that was cut short
    is noticed and computed again (nothing is converted: the conversion is kept), then
    replaced: the next audit takes both from the cache again."""
    data, first = small_audit
    kw = {"backbone": "arc2", "weights": "none", "image_size": 16}
    lines: list[str] = []
    again = audit_folder(data, out=tmp_path / "again", progress=lines.append, **kw)
    eng = again.summary["feature_engine"]["source"]
    assert eng["conversion"] == eng["keras_reference"] == "cache" and eng["engine"] == "onnxruntime"
    assert eng["parity_images"] == 32 and eng["parity_relative"] <= 1e-4
    assert any("from the cache" in ln for ln in lines)
    assert not any("child process" in ln or "in this process" in ln for ln in lines), lines
    np.testing.assert_array_equal(np.load(again.out / "features.npy"), np.load(first.out / "features.npy"))
    # damage a private copy of the entry (other tests read the session's)
    entry = Path(eng["cache"])
    private = tmp_path / "cache" / "audit-onnx" / entry.name
    shutil.copytree(entry, private)
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    for npz in private.glob("parity-*.npz"):
        npz.write_bytes(npz.read_bytes()[:-100])
    lines.clear()
    fixed = audit_folder(data, out=tmp_path / "fixed", progress=lines.append, **kw)
    eng = fixed.summary["feature_engine"]["source"]
    assert eng["conversion"] == "cache" and eng["keras_reference"] == "in process", eng
    assert eng["engine"] == "onnxruntime" and eng["parity_relative"] <= 1e-4 and eng["cache"] == str(private)
    assert any("cached Keras features of source are not used" in ln for ln in lines), lines
    assert any("the ONNX conversion is cached" in ln for ln in lines), lines
    np.testing.assert_array_equal(np.load(fixed.out / "features.npy"), np.load(first.out / "features.npy"))
    third = audit_folder(data, out=tmp_path / "third", **kw)
    assert third.summary["feature_engine"]["source"]["keras_reference"] == "cache"


def test_audit_cli(pattern_data, tmp_path):
    import transfer.commands.data  # noqa: F401  (attaches `data audit`)
    from transfer.cli import cli

    data = _small_folder(pattern_data, tmp_path / "data")
    r = CliRunner().invoke(cli, ["data", "audit", str(data), "--backbone", "arc2", "--weights", "none",
                                 "--image-size", "16", "--out", str(tmp_path / "a"), "-q"])
    assert r.exit_code == 0, r.output
    assert "64 images (63 readable)" in r.output and "exact_duplicate" in r.output
    r = CliRunner().invoke(cli, ["data", "audit", str(data), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--run" in r.output and "needs features" in r.output
    r = CliRunner().invoke(cli, ["data", "audit", str(data), "--backbone", "arc2", "--weights", "none",
                                 "--near-threshold", "1.5"])
    assert r.exit_code == 2 and "--near-threshold" in r.output


def test_grouped_split_keeps_groups_on_one_side():
    samples = [Sample(f"c{i % 2}/{i:03d}.png", i % 2) for i in range(60)]
    groups = [[0, 2, 4, 6], [1, 3], [10, 12, 14]]
    parts = dedupe.grouped_split(samples, groups, lambda s: split_samples(s, val=0.3, test=0.3, seed=1))
    assert sorted(x.path for p in parts.values() for x in p) == sorted(s.path for s in samples)
    paths = [[samples[i].path for i in g] for g in groups]
    assert dedupe.straddling_groups(parts, paths) == []
    plain = split_samples(samples, val=0.3, test=0.3, seed=1)
    assert dedupe.straddling_groups(plain, paths)  # a plain split does put some group across parts


@pytest.mark.slow
def test_audit_bars_on_corrupted_digits(tmp_path):
    """scikit-learn's real digits (32x32), corrupted: 40 flipped labels, 60 resized / re-compressed /
    cropped copies of train images in val and test, 10 blank and 10 noise images; features of an
    arc2 trial trained on the corrupted folder."""
    from sklearn.datasets import load_digits

    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    d = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((32, 32),
                                                                                         Image.Resampling.BILINEAR))
                     for im in d.images])
    truth = write_corrupted(imgs, d.target, [str(i) for i in range(10)], tmp_path / "data", flips=40, copies=60,
                            blanks=10, noise=10)
    cfg = load_config(None, {"data": str(tmp_path / "data"), "out": str(tmp_path / "run"), "backbones": "arc2",
                             "trainable": "1", "weights": "none", "epochs": 10, "image_size": 32,
                             "batch_size": 32, "patience": 0, "lr": 2e-3})
    assert run_sweep(cfg, progress=lambda s: None).ok
    res = audit_folder(tmp_path / "data", run=tmp_path / "run")
    got = score_audit(res.rows, res.summary, truth)
    by_kind = {}
    for kind in ("resized", "recompressed", "cropped"):
        mine = [p for p in truth["copies"] if kind in p[1]]
        by_kind[kind] = score_audit(res.rows, res.summary, {**truth, "copies": mine})["dup_recall"]
    print(got, by_kind)
    assert got["dup_recall"] >= 0.95 and got["dup_precision"] >= 0.9
    assert min(by_kind.values()) >= 0.9  # resized, re-compressed and cropped copies alike
    assert got["flip_precision_at_k"] >= 0.6
    assert got["blank_noise_recall"] >= 0.9
    # the run's report gains a data-audit section (the audit went to RUN/audit)
    from transfer.analysis.report import write_report

    out = write_report(tmp_path / "run")
    assert "audit" in out["present"]
    page = out["html"].read_text()
    assert "Data audit" in page and "Duplicates across splits (leakage)" in page


def test_near_pairs_on_photo_patches():
    """Patches of scikit-learn's two sample photos: resized and re-compressed copies of two patches
    are found, and no pair of different patches is. (A crop of 3 px off a 64 px textured patch is
    not found at the default threshold: a measured limit, docs/audit.md.)"""
    from sklearn.datasets import load_sample_images

    from helpers.corrupt import _copy

    rng = np.random.default_rng(0)
    patches = []
    for photo in load_sample_images().images:
        for y in range(0, photo.shape[0] - 64, 70):
            for x in range(0, photo.shape[1] - 64, 90):
                patches.append(np.ascontiguousarray(photo[y:y + 64, x:x + 64]))
    n = len(patches)
    planted = {}
    for k, kind in enumerate(("resized", "recompressed", "cropped")):
        i = 5 + 11 * k
        planted[(i, len(patches))] = kind
        patches.append(np.asarray(_copy(Image.fromarray(patches[i]), kind, rng).convert("RGB")))
    fps = [fingerprint_array(p) for p in patches]
    found = {(i, j) for i, j, _ in dedupe.near_pairs(fps)}
    assert n > 80 and found <= set(planted), (found, planted)
    assert {planted[p] for p in found} >= {"resized", "recompressed"}
    groups = dedupe.duplicate_groups(fps)
    assert sorted(map(tuple, groups)) == sorted(found)


def test_a_conversion_in_this_process_leaves_the_callers_random_streams_alone(tmp_path):
    """Asked to (``CONVERT_IN``), a process with TensorFlow loaded converts in a thread of its own (no
    second TensorFlow); the backbone is built with its seed there (``keras.utils.set_random_seed(0)``),
    yet the caller's Python, NumPy and TensorFlow random numbers go on as if nothing had run."""
    import random

    import tensorflow as tf

    from transfer.analysis.audit_model import InProcess, in_process_blocker

    assert in_process_blocker(loaded=True) is None

    def draws():
        return random.random(), float(np.random.rand()), float(tf.random.uniform(()))

    def seed():
        random.seed(7)
        np.random.seed(7)
        tf.random.set_seed(123)

    seed()
    expected = draws()
    seed()
    spec = {"models": [{"name": "source", "backbone": "arc2", "weights": "none", "image_size": 16,
                        "onnx": str(tmp_path / "m.onnx"), "reference": str(tmp_path / "r.npz")}],
            "parity": [], "size": [16, 16], "limit": 0, "recipe": None}
    conversion = InProcess(spec)
    out, err = conversion.communicate()
    assert conversion.returncode == 0 and out.startswith("RESULT source ") and not err, (out, err)
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert draws() == expected


def test_what_a_conversion_in_process_shares_is_put_back_and_bad_settings_are_refused(small_audit, tmp_path,
                                                                                       monkeypatch):
    """The environment a conversion may set (tf2onnx sets TF_CPP_MIN_LOG_LEVEL when imported) is put
    back with the random state; a Keras floatx other than the default sends the conversion to the
    child (the cache's key assumes the default); a misspelt CONVERT_IN is a clear error."""
    import keras

    from transfer.analysis import audit_engine
    from transfer.analysis.audit_model import _SharedState, in_process_blocker
    from transfer.errors import ConfigError

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    kept = _SharedState()
    np.random.seed(3)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    kept.restore()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1" and "KERAS_BACKEND" not in os.environ
    assert np.random.get_state()[1][0] == kept.np[1][0]
    keras.config.set_floatx("float64")
    try:
        assert "floatx float64" in in_process_blocker(loaded=True)
    finally:
        keras.config.set_floatx("float32")
    assert in_process_blocker(loaded=True) is None
    monkeypatch.setattr(audit_engine, "CONVERT_IN", "thread")
    with pytest.raises(ConfigError, match="invalid audit_engine.CONVERT_IN: 'thread'; accepted: one of child"):
        audit_folder(small_audit[0], backbone="arc2", weights="none", image_size=16, out=tmp_path / "a")
