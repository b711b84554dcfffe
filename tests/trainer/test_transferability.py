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
