"""calibration.py and unknown_scores.py: the calibration metrics, temperature scaling and unknown-input scores."""

from __future__ import annotations

import numpy as np
import pytest

from transfer import calibration as C
from transfer import unknown_scores as U


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
    cov, alpha = U._shrunk_covariance(xc, None)
    ref, ref_alpha = ledoit_wolf(xc, assume_centered=True)
    assert alpha == pytest.approx(ref_alpha, rel=1e-6)
    np.testing.assert_allclose(cov, ref, rtol=1e-6, atol=1e-9)


def test_mahalanobis_score_equals_the_direct_formula_and_ranks_outliers_low():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0, 0], [5, 5, 0], [0, 5, 5]])
    y = np.repeat(np.arange(3), 100)
    x = means[y] + rng.normal(0, 1, (300, 3)) * [1, 2, 0.5]
    g = U.fit_class_gaussian(x, y, 3, shrinkage=0.0)
    cov = np.cov((x - g.means[y]).T, bias=True)
    inv = np.linalg.inv(cov)
    q = rng.normal(0, 3, (20, 3))
    direct = -np.min([[(v - m) @ inv @ (v - m) for m in g.means] for v in q], axis=1)
    np.testing.assert_allclose(U.mahalanobis_score(q, g), direct, rtol=1e-6)
    far = np.array([[30.0, -30, 30]])
    assert U.mahalanobis_score(far, g)[0] < np.percentile(U.mahalanobis_score(x, g), 1)
    g2 = U.ClassGaussian.from_arrays(g.to_arrays())
    np.testing.assert_allclose(U.mahalanobis_score(q, g2), U.mahalanobis_score(q, g), rtol=1e-4)


def test_threshold_accepts_the_target_share():
    s = np.random.default_rng(0).normal(size=1000)
    thr = U.threshold_for_acceptance(s, 0.95)
    assert np.mean(s >= thr) == pytest.approx(0.95, abs=0.002)
    assert np.mean(s >= U.threshold_for_acceptance(s, 1.0)) == 1.0
    with pytest.raises(ValueError):
        U.threshold_for_acceptance(s, 0.0)
    with pytest.raises(ValueError):
        U.fit_class_gaussian(np.zeros((4, 2)), [0, 0, 0, 0], 2)


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    k, u = np.round(rng.normal(1, 1, 300), 1), np.round(rng.normal(0, 1, 200), 1)  # rounded: many ties
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[k, u])
    assert U.auroc(k, u) == pytest.approx(ref, abs=1e-12)
    assert U.auroc([2, 3], [0, 1]) == 1.0 and U.auroc([0], [0]) == 0.5
    with pytest.raises(ValueError):
        U.auroc([], [1])


def test_ece_floor_is_what_a_calibrated_model_shows_on_a_small_set():
    p, _ = _overconfident(n=300, sharpen=1.0)
    floor = C.ece_floor(p)
    assert 0.0 < floor < 0.1
    rng = np.random.default_rng(5)  # labels drawn from p itself: calibrated by construction
    cum = np.cumsum(p, 1)
    y = np.minimum((rng.random((300, 1)) > cum).sum(1), p.shape[1] - 1)
    assert C.ece(p, y) < 3 * floor
    assert C.ece_floor(np.tile(p, (10, 1))) < floor  # more images, lower floor


def _logits_overconfident(n=1500, c=5, sharpen=3.0, seed=0):
    """Labels drawn from softmax(z); the model's logits are sharpen * z (overconfident by T = sharpen)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, c))
    true_p = _softmax(z)
    y = np.array([rng.choice(c, p=p) for p in true_p])
    return sharpen * z, y


def test_check_applies_a_temperature_that_holds_out_of_fold():
    z, y = _logits_overconfident(sharpen=3.0)
    chk = C.check_temperature(z, y)
    assert chk.applied and chk.temperature == chk.fitted == pytest.approx(3.0, rel=0.15)
    assert chk.folds == 5 and len(chk.fold_temperatures) == 5
    assert chk.oof_nll_after < chk.oof_nll_before and chk.oof_gain > chk.min_gain
    rec = chk.record()
    assert rec["passed"] and rec["method"] == "5-fold cross-fit" and rec["errors"] == chk.errors
    # on fresh images from the same model the applied temperature lowers the NLL
    z2, y2 = _logits_overconfident(sharpen=3.0, seed=1)
    assert C.nll(C.temperature_probs(z2, chk.temperature), y2) < C.nll(C.softmax(z2), y2)


def test_check_keeps_a_calibrated_model_as_it_is():
    z, y = _logits_overconfident(n=400, sharpen=1.0, seed=2)
    chk = C.check_temperature(z, y)
    assert not chk.applied and chk.temperature == 1.0 and chk.fitted is not None
    assert "does not hold" in chk.reason and chk.oof_gain <= chk.min_gain


def test_check_refuses_what_cannot_be_checked():
    # the case: a near-perfect model, one confident error: the fitted T sharpens (< 1)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (288, 8))
    y = rng.integers(0, 8, 288)
    z[np.arange(288), y] += 9.0
    one = z.copy()
    one[0, (y[0] + 1) % 8] += 12.0  # image 0 confidently wrong
    chk = C.check_temperature(one, y)
    assert chk.errors == 1 and chk.fitted < 1 and not chk.applied and chk.temperature == 1.0
    assert "one misclassified image" in chk.reason
    chk = C.check_temperature(z, y)
    assert chk.errors == 0 and not chk.applied and chk.fitted is None and "not identifiable" in chk.reason.replace(
        "none is identifiable", "not identifiable")
    chk = C.check_temperature(z[y == y[0]], y[y == y[0]])
    assert chk.classes == 1 and not chk.applied and "one class" in chk.reason
    with pytest.raises(ValueError):
        C.check_temperature(z[:, :1], y)
    with pytest.raises(ValueError):
        C.check_temperature(np.full((3, 2), np.nan), [0, 1, 0])


def test_folds_spread_the_errors():
    wrong = np.zeros(50, bool)
    wrong[[3, 9, 20, 41]] = True
    fold = C._folds(wrong, 4, seed=0)
    assert sorted(fold[wrong]) == [0, 1, 2, 3]  # one error per fold
    assert np.bincount(fold).tolist() in ([13, 13, 12, 12], [12, 13, 13, 12], [13, 12, 12, 13], [12, 12, 13, 13])


def test_temperature_on_logits_equals_temperature_on_log_probs():
    z, y = _logits_overconfident(n=300)
    assert C.fit_temperature_logits(z, y) == pytest.approx(C.fit_temperature(C.softmax(z), y), rel=1e-3)
    np.testing.assert_allclose(C.temperature_probs(z, 2.0), C.apply_temperature(C.softmax(z), 2.0), atol=1e-9)
    with pytest.raises(ValueError):
        C.temperature_probs(z, -1.0)


def test_energy_knn_and_vim_by_hand():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 5))
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    logits = f @ w + b
    np.testing.assert_allclose(C.network_logits(f, w, b), logits)
    np.testing.assert_allclose(U.energy_score(logits), np.log(np.exp(logits).sum(1)))
    bank = U.normalize_rows(rng.normal(size=(20, 5)))
    for k in (1, 3, 20):
        d = np.linalg.norm(U.normalize_rows(f)[:, None, :] - bank[None], axis=2)
        np.testing.assert_allclose(U.knn_score(f, bank, k), -np.sort(d, axis=1)[:, k - 1], atol=1e-5)
    with pytest.raises(ValueError):
        U.knn_score(f, bank, 21)
    train = rng.normal(size=(200, 5)) * [3, 2, 1, 0.1, 0.1]
    vim = U.fit_vim(train, w, b)
    assert vim.basis.shape == (5, 2)  # D / 2 = 2 < C = 3: three principal axes kept, two residual
    np.testing.assert_allclose(vim.origin @ w + b, 0, atol=1e-9)  # the head maps the origin to zero logits
    x = f - vim.origin
    expect = np.log(np.exp(logits).sum(1)) - vim.alpha * np.linalg.norm(x @ vim.basis, axis=1)
    np.testing.assert_allclose(U.vim_score(f, w, b, vim), expect)
    assert U.vim_dim(3, 3) is None and U.vim_dim(2048, 10) == 1000 and U.vim_dim(1280, 10) == 512
    with pytest.raises(ValueError, match="no residual"):
        U.fit_vim(train[:, :3], w[:3], b)


def test_mahalanobis_with_fewer_images_than_features_is_shrunk_not_singular():
    rng = np.random.default_rng(0)
    d = 64
    means = rng.normal(0, 3, (3, d))
    y = np.array([0, 0, 1, 1, 2, 2])  # 6 images, 64 features
    x = means[y] + rng.normal(size=(6, d))
    g = U.fit_class_gaussian(x, y, 3)
    s = U.mahalanobis_score(np.vstack([x, means[0] + 40]), g)
    assert np.isfinite(s).all() and s[-1] < s[:-1].min()
    g1 = U.fit_class_gaussian(means, [0, 1, 2], 3)  # one image per class: no spread at all
    assert np.isfinite(U.mahalanobis_score(x, g1)).all()
    np.testing.assert_allclose(g1.whiten, np.eye(d))


def test_scorers_check_their_arrays():
    rng = np.random.default_rng(0)
    arrays = {"kernel": rng.normal(size=(4, 3)), "bias": np.zeros(3), "bank": U.normalize_rows(rng.normal(size=(9, 4)))}
    f, p = rng.normal(size=(5, 4)), C.softmax(rng.normal(size=(5, 3)))
    e = U.UnknownScorer.from_arrays("energy", arrays, feature_dim=4, num_classes=3)
    np.testing.assert_allclose(e(f, p), U.energy_score(f @ arrays["kernel"]))
    k = U.UnknownScorer.from_arrays("knn", arrays, {"k": 2}, feature_dim=4, num_classes=3)
    np.testing.assert_allclose(k(f, p), U.knn_score(f, arrays["bank"], 2), atol=1e-6)
    np.testing.assert_allclose(U.UnknownScorer.from_arrays("msp", {}, feature_dim=4, num_classes=3)(f, p), p.max(1))
    bad = [("energy", {"kernel": arrays["kernel"]}, {}, "'bias' is missing"),
           ("energy", {**arrays, "bias": np.zeros(2)}, {}, "expected (3,)"),
           ("knn", arrays, {"k": 10}, "1..9"),
           ("knn", arrays, {}, "'k'"),
           ("knn", {"bank": np.array([[None] * 4], dtype=object)}, {"k": 1}, "not floating point"),
           ("entropy", arrays, {}, "unknown score")]
    for name, arr, params, msg in bad:
        with pytest.raises(ValueError) as info:
            U.UnknownScorer.from_arrays(name, arr, params, feature_dim=4, num_classes=3)
        assert msg in str(info.value), (name, str(info.value))
    assert U.array_problems({"means": ((3, 4), "f"), "extra": ((1,), "f")}, feature_dim=4, num_classes=3,
                            needed=("means", "whiten")) == ["array 'whiten' is missing",
                                                            "array 'extra' is not one of " + ", ".join(U.ARRAY_SHAPES)]


def test_fpr_at_tpr():
    known, unknown = np.arange(100.0), np.array([-1.0, 4.0, 50.0, 99.0])
    # the threshold keeping 95 of 100 known scores is 5: unknown 50 and 99 pass
    assert U.fpr_at_tpr(known, unknown, 0.95) == 0.5
    with pytest.raises(ValueError):
        U.fpr_at_tpr(known, [])
