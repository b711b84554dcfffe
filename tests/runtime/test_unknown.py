"""runtime/unknown.py: the bundle's unknown-input detectors, their refusals, and what
bundle.py checks of the unknown-input records and arrays before any score runs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers.bundle_factory import known_images, make_bundle, rehash, unknown_image
from transfer import calibration as C
from transfer import unknown_scores as U
from transfer.bundle import Bundle
from transfer.errors import ConfigError, TamperedBundleError
from transfer.runtime.unknown import make_detector


def _bundle(tmp_path, record, arrays=None, classes=3, dim=4):
    files = {}
    if arrays is not None:
        np.savez(tmp_path / "unknown.npz", **arrays)
        files["unknown.npz"] = {"sha256": "x"}
    m = {"class_names": [str(i) for i in range(classes)], "feature_dim": dim, "files": files}
    if record is not None:
        m["unknown"] = record
    return Bundle(tmp_path, m)


def _fitted(rng, n=150, d=4, c=3):
    means = rng.normal(0, 5, (c, d))
    y = np.repeat(np.arange(c), n // c)
    f = means[y] + rng.normal(size=(n, d))
    kernel, bias = means.T / 5, -np.sum(means ** 2, axis=1) / 10
    g = U.fit_class_gaussian(f, y, c)
    vim = U.fit_vim(f, kernel, bias)
    arrays = {**g.to_arrays(), "kernel": kernel, "bias": bias, "bank": U.normalize_rows(f).astype(np.float16),
              "vim_origin": vim.origin, "vim_basis": vim.basis}
    return f, y, kernel, bias, arrays, vim.alpha


def test_every_score_detects_with_the_bundles_arrays(tmp_path):
    rng = np.random.default_rng(0)
    f, y, kernel, bias, arrays, alpha = _fitted(rng)
    probs = C.softmax(f @ kernel + bias)
    far = np.full((1, 4), 100.0)
    thr = U.threshold_for_acceptance(U.knn_score(f, arrays["bank"], 3), 0.9)
    rec = {"default": "knn", "scores": {
        "msp": {"threshold": 0.5}, "energy": {"threshold": 1.0, "file": "unknown.npz"},
        "mahalanobis": {"threshold": -20.0, "file": "unknown.npz"},
        "knn": {"threshold": thr, "file": "unknown.npz", "k": 3},
        "vim": {"threshold": -50.0, "file": "unknown.npz", "alpha": alpha}}}
    b = _bundle(tmp_path, rec, arrays)
    det = make_detector(b)
    assert det.score == "knn" and det.describe() == {"score": "knn", "threshold": thr}
    s, known = det(f, probs)
    np.testing.assert_allclose(s, U.knn_score(f, arrays["bank"], 3), atol=1e-6)
    assert known.tolist() == (s >= thr).tolist() and known.mean() == pytest.approx(0.9, abs=0.01)
    _, known = make_detector(b, "mahalanobis")(np.vstack([f[:2], far]), np.vstack([probs[:2], [[1 / 3] * 3]]))
    assert known.tolist() == [True, True, False]
    expect = {"energy": U.energy_score(f[:5] @ kernel + bias),
              "mahalanobis": U.mahalanobis_score(f[:5], U.fit_class_gaussian(f, y, 3)),
              "vim": U.vim_score(f[:5], kernel, bias, U.fit_vim(f, kernel, bias)),
              "msp": probs[:5].max(1)}
    for name, want in expect.items():
        got = make_detector(b, name).scores(f[:5], probs[:5])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)  # float32 storage
    msp = make_detector(b, "msp")
    _, known = msp(f[:2], np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]]))
    assert known.tolist() == [True, False]


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="no unknown-input score"):
        make_detector(_bundle(tmp_path, None))
    with pytest.raises(ConfigError, match="no val split"):  # the reason the export recorded
        make_detector(_bundle(tmp_path, {"method": "none", "reason": "the run has no val split"}))
    rec = {"default": "msp", "scores": {"msp": {"threshold": "high"}}}
    with pytest.raises(TamperedBundleError, match="not a number"):
        make_detector(_bundle(tmp_path, rec))
    rec = {"default": "mahalanobis", "scores": {"mahalanobis": {"threshold": -3.0, "file": "unknown.npz"}}}
    wrong = {"means": np.zeros((2, 4)), "whiten": np.eye(4)}  # 2 classes, bundle has 3
    with pytest.raises(TamperedBundleError, match="3 classes"):
        make_detector(_bundle(tmp_path, rec, wrong))
    with pytest.raises(ConfigError, match="accepted") as info:
        make_detector(_bundle(tmp_path, rec, wrong), "entropy")
    assert info.value.option == "unknown_score"
    with pytest.raises(ConfigError, match="has no 'knn' score"):
        make_detector(_bundle(tmp_path, rec, wrong), "knn")
    rec = {"default": "knn", "scores": {"knn": {"threshold": -0.1, "file": "unknown.npz", "k": 5}}}
    small = {"bank": np.eye(4, dtype=np.float16)[:3]}  # 3 rows, k = 5
    with pytest.raises(TamperedBundleError, match="bank"):
        make_detector(_bundle(tmp_path, rec, small))


# ---- bundle.py: the records and the arrays, checked on load -----------------------------

@pytest.fixture
def unknown_bundle(tmp_path):
    return make_bundle(tmp_path / "b", unknown=True)


def _edit_and_rehash(bundle: Path, fn) -> None:
    """An adversary who edits the manifest (and calibration.json to match) and rehashes every file."""
    def both(m):
        fn(m)
        rec = {k: m[k] for k in ("calibration", "unknown") if k in m}
        (bundle / "calibration.json").write_text(json.dumps(rec))
    rehash(bundle, both)


@pytest.mark.parametrize("what, edit, message", [
    ("score name", lambda m: m["unknown"]["scores"].update(entropy={"threshold": 1.0}), "not a score this transfer"),
    ("knn without k", lambda m: m["unknown"]["scores"].update(
        knn={"threshold": 1.0, "file": "unknown.npz"}), "knn.k"),
    ("vim without alpha", lambda m: m["unknown"]["scores"].update(
        vim={"threshold": 1.0, "file": "unknown.npz"}), "vim.alpha"),
    ("acceptance", lambda m: m["unknown"]["scores"]["msp"].update(val_acceptance=3), "fraction"),
    ("applied without temperature", lambda m: m["calibration"].update(method="temperature (logits)", applied=True),
     "temperature"),
    ("temperature not applied", lambda m: m["calibration"].update(temperature=0.5), "no temperature was applied"),
    ("no reason", lambda m: m["calibration"].pop("reason"), "does not say why"),
    ("calibrated flag", lambda m: m["models"]["onnx-fp32"].update(calibrated=True), "calibrated"),
    ("none with scores", lambda m: m["unknown"].update(method="none", reason="x"), "no scores"),
])
def test_bundle_refuses_records_that_do_not_hold(unknown_bundle, what, edit, message):
    from transfer.bundle import load_bundle

    load_bundle(unknown_bundle)  # as exported
    _edit_and_rehash(unknown_bundle, edit)
    with pytest.raises(TamperedBundleError, match=message):
        load_bundle(unknown_bundle)


def _write_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_bundle_reads_the_array_headers_before_any_score(unknown_bundle):
    from transfer.bundle import load_bundle

    with np.load(unknown_bundle / "unknown.npz") as z:
        good = {k: z[k] for k in z.files}
    cases = {
        "a pickle": {**good, "whiten": np.array([None] * 16, dtype=object).reshape(4, 4)},
        "wrong width": {**good, "whiten": np.eye(5, dtype=np.float32)},
        "missing": {"means": good["means"]},
        "stranger": {**good, "payload": np.zeros(3, np.float32)},
    }
    for what, arrays in cases.items():
        _write_npz(unknown_bundle / "unknown.npz", arrays)
        rehash(unknown_bundle)
        with pytest.raises(TamperedBundleError, match="unknown.npz"):
            load_bundle(unknown_bundle)
    (unknown_bundle / "unknown.npz").write_bytes(b"not a zip")
    rehash(unknown_bundle)
    with pytest.raises(TamperedBundleError, match="not the unknown-input parameters"):
        load_bundle(unknown_bundle)
    with zipfile.ZipFile(unknown_bundle / "unknown.npz", "w") as zf:
        zf.writestr("means.npy", b"\x93NUMPY garbage")
    rehash(unknown_bundle)
    with pytest.raises(TamperedBundleError):
        load_bundle(unknown_bundle)
    _write_npz(unknown_bundle / "unknown.npz", good)
    rehash(unknown_bundle)
    assert make_detector(load_bundle(unknown_bundle)).score == "mahalanobis"


def test_evaluate_unknown_reports_every_score_overall_and_per_group(unknown_bundle, tmp_path):
    from PIL import Image

    from transfer.bundle import load_bundle
    from transfer.runtime.unknown import evaluate_unknown

    x, _ = known_images(40, seed=3)
    known, red, noise = [], [], []
    for i, img in enumerate(x):
        known.append(tmp_path / f"k{i}.png")
        Image.fromarray(img).save(known[-1])
    for i in range(5):
        red.append(tmp_path / f"red{i}.png")
        Image.fromarray(unknown_image()).save(red[-1])
        noise.append(tmp_path / f"noise{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(noise[-1])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    b = load_bundle(unknown_bundle)
    res = evaluate_unknown(b, known, red + noise + [tmp_path / "broken.png"],
                           groups=["red"] * 5 + ["noise"] * 5 + ["noise"])
    assert res["known"] == 40 and res["unknown"] == 10 and res["unreadable"] == 1 and res["default"] == "mahalanobis"
    assert set(res["scores"]) == set(b.manifest["unknown"]["scores"]) and res["highest_auroc"] in res["scores"]
    for name, s in res["scores"].items():
        assert set(s) == {"auroc", "fpr_at_tpr", "threshold", "known_accept_rate", "false_accept_rate"}
        assert 0 <= s["auroc"] <= 1 and 0 <= s["fpr_at_tpr"] <= 1
    assert res["scores"]["mahalanobis"]["auroc"] == 1.0  # saturated red is far from every grey class
    assert set(res["by_group"]) == {"red", "noise"} and res["by_group"]["red"]["images"] == 5
    assert res["by_group"]["red"]["scores"]["mahalanobis"]["false_accept_rate"] == 0.0
    with pytest.raises(ConfigError, match="no readable unknown image"):
        evaluate_unknown(b, known, [tmp_path / "broken.png"])
    with pytest.raises(ValueError, match="group names"):
        evaluate_unknown(b, known, red, groups=["x"])
