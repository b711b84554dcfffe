"""runtime/unknown.py: the bundle's unknown-input detector and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from transfer import calibration as C
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


def test_detectors_score_and_decide(tmp_path):
    rng = np.random.default_rng(0)
    means = rng.normal(0, 5, (3, 4))
    y = np.repeat(np.arange(3), 50)
    f = means[y] + rng.normal(size=(150, 4))
    g = C.fit_class_gaussian(f, y, 3)
    rec = {"default": "mahalanobis", "scores": {"mahalanobis": {"threshold": -20.0, "file": "unknown.npz"},
                                                "msp": {"threshold": 0.5}}}
    b = _bundle(tmp_path, rec, g.to_arrays())
    det = make_detector(b)
    far = np.full((1, 4), 100.0)
    s, known = det(np.vstack([f[:2], far]), np.full((3, 3), 1 / 3))
    assert known.tolist() == [True, True, False] and s[2] < -20
    msp = make_detector(b, "msp")
    _, known = msp(f[:2], np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]]))
    assert known.tolist() == [True, False] and msp.describe() == {"score": "msp", "threshold": 0.5}


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="no unknown-input score"):
        make_detector(_bundle(tmp_path, None))
    rec = {"default": "msp", "scores": {"msp": {"threshold": "high"}}}
    with pytest.raises(TamperedBundleError, match="not a number"):
        make_detector(_bundle(tmp_path, rec))
    rec = {"default": "mahalanobis", "scores": {"mahalanobis": {"threshold": -3.0, "file": "unknown.npz"}}}
    wrong = {"means": np.zeros((2, 4)), "whiten": np.eye(4)}  # 2 classes, bundle has 3
    with pytest.raises(TamperedBundleError, match="2 classes"):
        make_detector(_bundle(tmp_path, rec, wrong))
    with pytest.raises(ConfigError, match="accepted"):
        make_detector(_bundle(tmp_path, rec, wrong), "energy")
