"""calibration.py: the calibration metrics, temperature scaling and unknown-input scores."""

from __future__ import annotations

import numpy as np
import pytest

from transfer import calibration as C


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _overconfident(n=4000, c=5, sharpen=3.0, seed=0):
    """Labels drawn from softmax(z); the model reports softmax(sharpen * z): overconfident by T = sharpen."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, c))
    true_p = _softmax(z)
    y = np.array([rng.choice(c, p=p) for p in true_p])
    return _softmax(sharpen * z), y


def test_ece_nll_brier_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1])
    # bins of width 1/15: 0.9 -> bin 13, 0.6 -> bin 8, 0.7 -> bin 10, 0.8 -> bin 11; one image each
    # |acc - conf|: |1-.9|, |0-.6|, |1-.7|, |1-.8| -> mean 0.3
    assert C.ece(p, y) == pytest.approx(0.3)
    assert C.nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    assert C.brier(p, y) == pytest.approx(np.mean([2 * 0.1 ** 2, 2 * 0.6 ** 2, 2 * 0.3 ** 2, 2 * 0.2 ** 2]))
    r = C.reliability(p, y)
    assert sum(r["count"]) == 4 and len(r["edges"]) == 16


def test_temperature_recovers_the_sharpening_and_halves_ece():
    p, y = _overconfident(sharpen=3.0)
    t = C.fit_temperature(p, y)
    assert t == pytest.approx(3.0, rel=0.1)
    cal = C.apply_temperature(p, t)
    assert (cal.argmax(1) == p.argmax(1)).all()          # accuracy unchanged
    assert C.ece(cal, y) <= 0.5 * C.ece(p, y)
    assert C.nll(cal, y) < C.nll(p, y)


def test_temperature_one_is_identity_and_bad_input_is_refused():
    p, y = _overconfident(n=50)
    np.testing.assert_allclose(C.apply_temperature(p, 1.0), p, atol=1e-9)
    with pytest.raises(ValueError):
        C.apply_temperature(p, 0.0)
    with pytest.raises(ValueError):
        C.fit_temperature(p[:1], y[:1])
    with pytest.raises(ValueError):
        C.ece(p, y[:-1])


def test_shrunk_covariance_matches_ledoit_wolf():
    from sklearn.covariance import ledoit_wolf

    x = np.random.default_rng(1).normal(size=(40, 12)) @ np.random.default_rng(2).normal(size=(12, 12))
    xc = x - x.mean(0)
    cov, alpha = C._shrunk_covariance(xc, None)
    ref, ref_alpha = ledoit_wolf(xc, assume_centered=True)
    assert alpha == pytest.approx(ref_alpha, rel=1e-6)
    np.testing.assert_allclose(cov, ref, rtol=1e-6, atol=1e-9)


def test_mahalanobis_score_equals_the_direct_formula_and_ranks_outliers_low():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0, 0], [5, 5, 0], [0, 5, 5]])
    y = np.repeat(np.arange(3), 100)
    x = means[y] + rng.normal(0, 1, (300, 3)) * [1, 2, 0.5]
    g = C.fit_class_gaussian(x, y, 3, shrinkage=0.0)
    cov = np.cov((x - g.means[y]).T, bias=True)
    inv = np.linalg.inv(cov)
    q = rng.normal(0, 3, (20, 3))
    direct = -np.min([[(v - m) @ inv @ (v - m) for m in g.means] for v in q], axis=1)
    np.testing.assert_allclose(C.mahalanobis_score(q, g), direct, rtol=1e-6)
    far = np.array([[30.0, -30, 30]])
    assert C.mahalanobis_score(far, g)[0] < np.percentile(C.mahalanobis_score(x, g), 1)
    g2 = C.ClassGaussian.from_arrays(g.to_arrays())
    np.testing.assert_allclose(C.mahalanobis_score(q, g2), C.mahalanobis_score(q, g), rtol=1e-4)


def test_threshold_accepts_the_target_share():
    s = np.random.default_rng(0).normal(size=1000)
    thr = C.threshold_for_acceptance(s, 0.95)
    assert np.mean(s >= thr) == pytest.approx(0.95, abs=0.002)
    assert np.mean(s >= C.threshold_for_acceptance(s, 1.0)) == 1.0
    with pytest.raises(ValueError):
        C.threshold_for_acceptance(s, 0.0)
    with pytest.raises(ValueError):
        C.fit_class_gaussian(np.zeros((4, 2)), [0, 0, 0, 0], 2)


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    k, u = np.round(rng.normal(1, 1, 300), 1), np.round(rng.normal(0, 1, 200), 1)  # rounded: many ties
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[k, u])
    assert C.auroc(k, u) == pytest.approx(ref, abs=1e-12)
    assert C.auroc([2, 3], [0, 1]) == 1.0 and C.auroc([0], [0]) == 0.5
    with pytest.raises(ValueError):
        C.auroc([], [1])


def test_ece_floor_is_what_a_calibrated_model_shows_on_a_small_set():
    p, _ = _overconfident(n=300, sharpen=1.0)
    floor = C.ece_floor(p)
    assert 0.0 < floor < 0.1
    rng = np.random.default_rng(5)  # labels drawn from p itself: calibrated by construction
    cum = np.cumsum(p, 1)
    y = np.minimum((rng.random((300, 1)) > cum).sum(1), p.shape[1] - 1)
    assert C.ece(p, y) < 3 * floor
    assert C.ece_floor(np.tile(p, (10, 1))) < floor  # more images, lower floor
