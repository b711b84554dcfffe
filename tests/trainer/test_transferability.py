"""LogME: the evidence at the fixed point it finds, computed again from its definition."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.trainer.transferability import logme


def _evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """evidence / N of the Bayesian linear model F m = y, straight from its definition (the D x D
    matrix A = alpha I + beta F^T F, its log-determinant, m = beta A^-1 F^T y)."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    _, logdet = np.linalg.slogdet(a)
    res = float(np.sum((f @ m - y) ** 2))
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * logdet - beta / 2 * res - alpha / 2 * float(m @ m)
          - n / 2 * np.log(2 * np.pi)) / n
    return float(ev)


@pytest.mark.parametrize("n,d", [(120, 16), (30, 64)])  # more images than features, and fewer (rank-deficient)
def test_the_score_is_the_evidence_at_its_maximum(n, d, monkeypatch):
    import transfer.trainer.transferability as T

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    f = rng.normal(size=(n, d)) + 2.0 * np.eye(3)[y] @ rng.normal(size=(3, d))
    out = logme(f, y)
    assert out.rank == min(n, d) and out.evidence.shape == (3,)
    assert out.score == pytest.approx(float(np.mean(out.evidence)))
    for c in range(3):  # the evidence of the alpha and beta it found, from the definition
        assert out.evidence[c] == pytest.approx(_evidence(f, (y == c).astype(float), out.alpha[c], out.beta[c]),
                                                rel=1e-6, abs=1e-9)
    # the reference's 11 iterations: within 1e-3 of the converged score
    monkeypatch.setattr(T, "MAX_ITER", 1000)
    conv = logme(f, y)
    assert abs(conv.score - out.score) < 1e-3
    for c in range(3):  # converged, it is the maximum: moving alpha or beta by 10 % gains next to nothing (the
        # reference's 1e-5 guard in the updates shifts the fixed point a little when the residual is tiny)
        target = (y == c).astype(float)
        ev = _evidence(f, target, conv.alpha[c], conv.beta[c])
        for k in (0.9, 1.1):
            assert _evidence(f, target, conv.alpha[c] * k, conv.beta[c]) <= ev + 1e-3
            assert _evidence(f, target, conv.alpha[c], conv.beta[c] * k) <= ev + 1e-3


def test_features_that_separate_the_classes_score_higher_and_order_does_not_matter():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    centres = rng.normal(size=(4, 32)) * 3.0
    good = centres[y] + rng.normal(size=(200, 32))
    noise = rng.normal(size=(200, 32))
    assert logme(good, y).score > logme(noise, y).score + 0.3
    perm = rng.permutation(200)
    assert logme(good[perm], y[perm]).score == pytest.approx(logme(good, y).score, rel=1e-9)
    # a class without images scores its all-zero target, as the reference does
    assert logme(good, y, num_classes=5).evidence.shape == (5,)


def test_bad_input_is_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"features \(5,\) and 5 labels"):
        logme(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="one label per row"):
        logme(np.zeros((5, 2)), np.zeros(4))


def test_four_images_one_feature_the_score_is_the_maximum_of_the_evidence_written_out():
    """One feature f = (2, 1, -1, -2), classes (0, 0, 1, 1): F^T F = 10, F^T y = 3 (class 0), |y|^2 = 2, so
    for prior precision a and noise precision b: m = 3b / (a + 10b), |F m - y|^2 = 2 - 6m + 10m^2 and
    evidence / N = (1/2 log a + 2 log b - 1/2 log(a + 10b) - b/2 |F m - y|^2 - a/2 m^2 - 2 log 2 pi) / 4.
    Its maximum over a grid of a and b (exp(-8) .. exp(8), steps of 0.01 in the log) is LogME's score,
    and by symmetry class 1 scores the same."""
    f = np.array([[2.0], [1.0], [-1.0], [-2.0]])
    out = logme(f, np.array([0, 0, 1, 1]))
    grid = np.exp(np.linspace(-8.0, 8.0, 1601))
    a, b = np.meshgrid(grid, grid, indexing="ij")
    m = 3 * b / (a + 10 * b)
    res = 2 - 6 * m + 10 * m ** 2
    ev = (0.5 * np.log(a) + 2 * np.log(b) - 0.5 * np.log(a + 10 * b) - b / 2 * res - a / 2 * m ** 2
          - 2 * np.log(2 * np.pi)) / 4
    assert out.rank == 1 and out.evidence[0] == pytest.approx(out.evidence[1], abs=1e-12)
    assert out.score >= ev.max() - 1e-9 and out.score == pytest.approx(ev.max(), abs=1e-5)  # -1.02953
    i = np.unravel_index(ev.argmax(), ev.shape)
    assert out.alpha[0] == pytest.approx(a[i], rel=0.02) and out.beta[0] == pytest.approx(b[i], rel=0.02)


def _reference_fixed_point(f: np.ndarray, y: np.ndarray) -> tuple[list, list, list]:
    """thuml/LogME ``LogME._fit_fixed_point`` (LogME.py at 56551ca, 2023-10-06), transcribed line by line
    for classification: per class (evidence / N, alpha, beta)."""
    n, d = f.shape
    if n > d:  # the reference's truncated_svd
        u, s, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s)
        u_times_sigma = f @ vh.T
        k = int(np.sum(s > 1e-10))
        s = s.reshape(-1, 1)[:k]
        u = u_times_sigma[:, :k] / s.reshape(1, -1)
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    s = s.reshape(-1, 1)
    sigma = s ** 2
    evidences, alphas, betas = [], [], []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64).reshape(-1, 1)
        x = u.T @ y_
        x2 = x ** 2
        res_x2 = (y_ ** 2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            if abs(t_ - t) / t <= 1e-3:
                break
        evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
                    - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi)) / n
        evidences.append(evidence)
        alphas.append(alpha)
        betas.append(beta)
    return evidences, alphas, betas


@pytest.mark.parametrize("n,d", [(200, 12), (24, 48)])
def test_the_reference_implementation_finds_the_same_alpha_and_beta_and_scores_within_its_own_tolerance(n, d):
    """The fixed-point iteration is the reference's, so alpha and beta agree to rounding. The score differs
    only where this module is documented to differ: the evidence evaluated at the final alpha / beta (the
    reference keeps the previous step's m and residual: a difference within its 0.1 % stopping tolerance),
    and log|A| counting the D - k zero singular values of a rank-k feature matrix ((D - k) / 2N log alpha)."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, n)
    f = rng.normal(size=(n, d)) + 1.5 * np.eye(3)[y] @ rng.normal(size=(3, d))
    out = logme(f, y)
    ref_ev, ref_a, ref_b = _reference_fixed_point(f, y)
    np.testing.assert_allclose(out.alpha, ref_a, rtol=1e-9)
    np.testing.assert_allclose(out.beta, ref_b, rtol=1e-9)
    k = out.rank
    dropped = (d - k) / (2.0 * n) * np.log(out.alpha)  # zero singular values the reference leaves out of log|A|
    np.testing.assert_allclose(out.evidence + dropped, ref_ev, atol=1e-4)
    assert (k < d) == (n < d) and (np.abs(dropped).max() > 0.01) == (n < d)
