"""How well a backbone's features suit a labelled target, before any fine-tuning: LogME.

LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021) is the log marginal likelihood (evidence) of a Bayesian linear model from
the features ``F`` (N x D) to each class's one-hot target ``y``, with a Gaussian prior of
precision ``alpha`` on the weights and noise of precision ``beta``, both set to the values that
maximize it; the score is the mean over classes of ``evidence / N``. Higher is better; the
absolute value means little, the order of candidate backbones on one dataset is the point.

For given ``alpha`` and ``beta``, with ``A = alpha I + beta F^T F`` and ``m = beta A^-1 F^T y``::

    evidence = D/2 log alpha + N/2 log beta - 1/2 log|A| - beta/2 |F m - y|^2 - alpha/2 |m|^2 - N/2 log 2 pi

and the maximum is the fixed point ``gamma = sum_i beta s_i / (alpha + beta s_i)``,
``alpha = gamma / |m|^2``, ``beta = (N - gamma) / |F m - y|^2`` (``s_i``: the eigenvalues of
``F^T F``). Everything is computed along the singular vectors of ``F`` once for all classes, as in
the authors' fixed-point implementation (github.com/thuml/LogME, ``LogME._fit_fixed_point``:
11 iterations at most, stopping when ``alpha / beta`` moves by less than 0.1 %). Three choices
differ from that code, all towards the formula above: ``log|A|`` counts the ``D - k`` zero
singular values of a rank-``k`` feature matrix (``(D - k) log alpha``; the reference drops them
when it truncates the SVD, as the authors' first, ICML implementation did not), and the
evidence is evaluated at the ``alpha`` and ``beta`` found (the reference reuses the previous
step's ``m`` and residual). The rank is decided relative to the largest singular value (numpy's
``matrix_rank`` tolerance) instead of an absolute ``1e-10``, so features of any scale are
treated alike.

NumPy only (no TensorFlow); the features come from the trainer's frozen-prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the reference's bound on fixed-point iterations and its relative tolerance on alpha / beta
MAX_ITER = 11
TOLERANCE = 1e-3
_EPS = 1e-5  # the reference's guard in the alpha and beta updates


@dataclass(frozen=True)
class LogME:
    """The LogME score of features for a labelling, with what it was made of.

    Attributes:
        score: mean over classes of the maximum evidence per sample.
        evidence: per class (index = label), the maximum evidence per sample.
        alpha, beta: per class, the prior and noise precisions at the maximum.
        rank: the rank of the feature matrix.
    """

    score: float
    evidence: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    rank: int


def _spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(u, s2)``: left singular vectors of ``f`` and the squared singular values of its rank."""
    n, d = f.shape
    if n > d:  # the D x D Gram matrix is the cheaper decomposition
        s2, v = np.linalg.eigh(f.T @ f)
        s2, v = s2[::-1], v[:, ::-1]
        s = np.sqrt(np.clip(s2, 0.0, None))
        k = int(np.sum(s > s[0] * max(n, d) * np.finfo(np.float64).eps)) if s.size and s[0] > 0 else 0
        u = (f @ v[:, :k]) / s[:k]
        return u, s2[:k]
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    k = int(np.sum(s > s[0] * max(n, d) * np.finfo(np.float64).eps)) if s.size and s[0] > 0 else 0
    return u[:, :k], s[:k] ** 2


def logme(features, labels, *, num_classes: int | None = None) -> LogME:
    """The LogME score of ``features`` (N x D) for integer ``labels`` (N,).

    Args:
        features: one row per image (pooled features of a backbone).
        labels: class index of each row.
        num_classes: classes to score (default ``labels.max() + 1``; a class without images
            scores its all-zero target, as in the reference).

    Returns:
        A :class:`LogME`; ``score`` is the number to compare backbones by (higher is better).

    Raises:
        ValueError: not a 2-D feature matrix with one label per row, or fewer than 2 rows.

    Example::

        logme(x_train, y_train).score   # e.g. 0.93 for good features, near -0.7 for noise
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] < 2:
        raise ValueError(f"LogME needs an N x D feature matrix with N >= 2 and one label per row; got features "
                         f"{f.shape} and {y.shape[0]} labels")
    n, d = f.shape
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    targets = np.zeros((n, c))
    targets[np.arange(n), y] = 1.0
    u, s2 = _spectrum(f)
    k = s2.shape[0]
    sigma = s2[:, None]  # (k, 1)
    x2 = (u.T @ targets) ** 2  # (k, C): the targets along the singular vectors
    rest = (targets ** 2).sum(axis=0) - x2.sum(axis=0)  # the part of each target outside the span of F

    alpha, beta = np.ones(c), np.ones(c)
    active = np.ones(c, dtype=bool)
    for _ in range(MAX_ITER):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum(axis=0)
        m2 = (sigma * x2 / (t + sigma) ** 2).sum(axis=0)
        res2 = (x2 / (1.0 + sigma / t) ** 2).sum(axis=0) + rest
        alpha_new = gamma / (m2 + _EPS)
        beta_new = (n - gamma) / (res2 + _EPS)
        moved = np.abs(alpha_new / beta_new - t) / t
        alpha = np.where(active, alpha_new, alpha)
        beta = np.where(active, beta_new, beta)
        active &= moved > TOLERANCE
        if not active.any():
            break
    t = alpha / beta  # the evidence at the alpha and beta found (the reference reuses the last step's m and residual)
    m2 = (sigma * x2 / (t + sigma) ** 2).sum(axis=0)
    res2 = (x2 / (1.0 + sigma / t) ** 2).sum(axis=0) + rest
    log_det = np.log(alpha[None, :] + beta[None, :] * sigma).sum(axis=0) + (d - k) * np.log(alpha)
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * log_det - beta / 2.0 * res2
                - alpha / 2.0 * m2 - n / 2.0 * np.log(2.0 * np.pi)) / n
    return LogME(score=float(evidence.mean()), evidence=evidence, alpha=alpha, beta=beta, rank=k)


__all__ = ["LogME", "logme"]
