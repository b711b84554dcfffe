"""Calibration and unknown-input scores: the numbers, in numpy (no TensorFlow, no scikit-learn).

* How well probabilities mean what they say: :func:`ece` (expected calibration error,
  equal-width confidence bins), :func:`nll`, :func:`brier`, :func:`reliability`.
* Temperature scaling (Guo et al., ICML 2017): ``softmax(log p / T)``; :func:`fit_temperature`
  picks the ``T`` of minimum negative log-likelihood on held-out images.
* Unknown-input scores, higher = more like the training classes: the maximum softmax
  probability (:func:`msp_score`, Hendrycks & Gimpel 2017) and the negative Mahalanobis
  distance of the pooled features to the nearest class mean under one shared covariance
  (:func:`mahalanobis_score`, Lee et al. 2018), with :func:`threshold_for_acceptance`
  choosing the cut that keeps a target share of known images.

The exporter fits these on a run's val / train splits, the runtime scores with them, and
analysis reports them; all three use this one module.

Example::

    T = fit_temperature(val_probs, val_labels)
    cal = apply_temperature(test_probs, T)
    print(ece(test_probs, y), "->", ece(cal, y))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: the smallest probability whose log is taken (float32 softmax outputs can be exactly 0)
EPS = 1e-12
ECE_BINS = 15


def _check(probs, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"probabilities must be (N, C) with N >= 1 and C >= 2, got shape {p.shape}")
    if labels is None:
        return p, None
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"{p.shape[0]} probability rows but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be class indices 0..{p.shape[1] - 1}")
    return p, y


def reliability(probs, labels, bins: int = ECE_BINS) -> dict:
    """Confidence vs accuracy in ``bins`` equal-width bins of the top-1 confidence.

    Returns:
        ``{"edges": [bins + 1], "confidence": [bins], "accuracy": [bins], "count": [bins]}``
        (empty bins: confidence and accuracy ``None``), plain lists ready for JSON.
    """
    p, y = _check(probs, labels)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin k holds confidences in (edges[k], edges[k+1]]; a confidence of exactly 0 goes to bin 0
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for k in range(bins):
        m = idx == k
        n = int(m.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[m].mean()) if n else None)
        out["accuracy"].append(float((pred[m] == y[m]).mean()) if n else None)
    return out


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over bins."""
    r = reliability(probs, labels, bins)
    n = sum(r["count"])
    return float(sum(c * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c) / n)


def ece_floor(probs, *, draws: int = 200, seed: int = 0, bins: int = ECE_BINS) -> float:
    """The ECE a perfectly calibrated model would show on a set like this one: the mean ECE over
    ``draws`` label sets drawn from the probabilities themselves. ECE of a finite set is biased
    upward; on a few hundred images this floor is often 0.02 - 0.03, so an ECE near it is as
    good as the set can show."""
    p, _ = _check(probs)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    out = []
    for _ in range(draws):
        u = rng.random((len(p), 1))
        y = np.minimum((u > cum).sum(axis=1), p.shape[1] - 1)
        out.append(ece(p, y, bins))
    return float(np.mean(out))


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    p, y = _check(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over images of sum over classes of (p - onehot)^2."""
    p, y = _check(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_metrics(probs, labels, bins: int = ECE_BINS) -> dict:
    """``{"ece", "ece_floor", "nll", "brier", "accuracy", "images", "reliability"}`` of one set of
    probabilities (``ece_floor``: what a perfectly calibrated model would show here,
    :func:`ece_floor`; ``reliability``: the bins of :func:`reliability`, for the diagram)."""
    p, y = _check(probs, labels)
    return {"ece": ece(p, y, bins), "ece_floor": ece_floor(p, bins=bins), "nll": nll(p, y), "brier": brier(p, y),
            "accuracy": float(np.mean(p.argmax(1) == y)), "images": int(len(y)), "reliability": reliability(p, y, bins)}


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row (float64); ``T = 1`` returns the input renormalized."""
    p, _ = _check(probs)
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    z = np.log(np.clip(p, EPS, 1.0)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs, labels, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature of minimum NLL on ``(probs, labels)`` (bounded search over log T).

    NLL of temperature scaling is convex in ``1/T``, so a bounded scalar search finds the
    optimum; the result is clipped to ``bounds``.

    Raises:
        ValueError: fewer than 2 images or bad shapes.
    """
    from scipy.optimize import minimize_scalar

    p, y = _check(probs, labels)
    if len(y) < 2:
        raise ValueError("fitting a temperature needs at least 2 labelled images")
    logp = np.log(np.clip(p, EPS, 1.0))
    rows = np.arange(len(y))

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y]))

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


# -- unknown-input scores ------------------------------------------------------------------------

def msp_score(probs) -> np.ndarray:
    """Maximum softmax probability per image (higher = more like a known class)."""
    p, _ = _check(probs)
    return p.max(axis=1)


@dataclass(frozen=True)
class ClassGaussian:
    """Class means and one shared covariance of pooled features, stored as the whitening map.

    ``whiten`` is ``L`` with ``L @ L.T`` = the inverse covariance, so the squared
    Mahalanobis distance to class ``c`` is ``|| (f - mean_c) @ L ||^2``.
    """

    means: np.ndarray   # (C, D)
    whiten: np.ndarray  # (D, D)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means.astype(np.float32), "whiten": self.whiten.astype(np.float32)}

    @classmethod
    def from_arrays(cls, arrays) -> "ClassGaussian":
        means, whiten = np.asarray(arrays["means"], np.float64), np.asarray(arrays["whiten"], np.float64)
        if means.ndim != 2 or whiten.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"inconsistent Mahalanobis parameters: means {means.shape}, whiten {whiten.shape}")
        return cls(means, whiten)


def fit_class_gaussian(features, labels, num_classes: int, *, shrinkage: float | None = None) -> ClassGaussian:
    """Class means and a shared covariance of ``features`` (N, D) with labels 0..C-1.

    The covariance of the class-centred features is shrunk toward a scaled identity
    (Ledoit-Wolf's formula when ``shrinkage`` is None), so it is invertible even with fewer
    images than dimensions.

    Raises:
        ValueError: a class without images, or shapes that do not match.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} and labels {y.shape} do not match")
    missing = [c for c in range(num_classes) if not np.any(y == c)]
    if missing:
        raise ValueError(f"classes without images: {missing}")
    means = np.stack([x[y == c].mean(axis=0) for c in range(num_classes)])
    centred = x - means[y]
    cov, alpha = _shrunk_covariance(centred, shrinkage)
    # eigen-decomposition: inverse square root, robust to tiny eigenvalues
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, 1e-10 * max(float(w.max()), 1e-30))
    whiten = v @ np.diag(1.0 / np.sqrt(w))
    return ClassGaussian(means, whiten)


def _shrunk_covariance(centred: np.ndarray, shrinkage: float | None) -> tuple[np.ndarray, float]:
    n, d = centred.shape
    emp = centred.T @ centred / max(n, 1)
    mu = float(np.trace(emp)) / d
    if shrinkage is None:  # Ledoit & Wolf (2004), as sklearn.covariance.ledoit_wolf computes it
        x2 = centred ** 2
        beta_ = float(np.sum(x2.T @ x2)) / n
        delta_ = float(np.sum(emp ** 2))
        beta = (beta_ / n - delta_ / n)  # sum of variances of the entries of emp, estimated
        delta = delta_ - 2.0 * mu * np.trace(emp) + d * mu ** 2
        shrinkage = 0.0 if delta <= 0 else min(max(beta / delta, 0.0), 1.0)
    cov = (1.0 - shrinkage) * emp + shrinkage * mu * np.eye(d)
    return cov, float(shrinkage)


def mahalanobis_score(features, gaussian: ClassGaussian, batch: int = 4096) -> np.ndarray:
    """Negative squared Mahalanobis distance to the nearest class mean (higher = more known)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != gaussian.means.shape[1]:
        raise ValueError(f"features of shape {x.shape} do not match the {gaussian.means.shape[1]}-d class means")
    m = gaussian.means @ gaussian.whiten  # (C, D) in the whitened space
    m2 = np.sum(m ** 2, axis=1)
    out = np.empty(len(x))
    for i in range(0, len(x), batch):
        z = x[i:i + batch] @ gaussian.whiten
        d2 = np.sum(z ** 2, axis=1, keepdims=True) - 2.0 * z @ m.T + m2[None, :]
        out[i:i + batch] = -np.maximum(d2.min(axis=1), 0.0)
    return out


def threshold_for_acceptance(known_scores: Sequence[float], accept: float = 0.95) -> float:
    """The score threshold that accepts (score >= threshold) ``accept`` of the known images.

    Raises:
        ValueError: ``accept`` outside (0, 1] or no scores.
    """
    s = np.sort(np.asarray(known_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no scores to choose a threshold from")
    if not 0 < accept <= 1:
        raise ValueError(f"acceptance must be in (0, 1], got {accept!r}")
    k = int(np.floor((1.0 - accept) * s.size))  # reject the k lowest-scoring known images
    return float(s[min(k, s.size - 1)])


def auroc(known_scores: Sequence[float], unknown_scores: Sequence[float]) -> float:
    """Area under the ROC curve of telling known from unknown images by score (higher = known):
    the probability that a random known image scores above a random unknown one (ties count
    half), computed from ranks (Mann-Whitney U).

    Raises:
        ValueError: either side is empty.
    """
    k = np.asarray(known_scores, dtype=np.float64).ravel()
    u = np.asarray(unknown_scores, dtype=np.float64).ravel()
    if k.size == 0 or u.size == 0:
        raise ValueError("AUROC needs known and unknown scores")
    allv = np.concatenate([k, u])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size)
    ranks[order] = np.arange(1, allv.size + 1)
    vals, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    if len(vals) < allv.size:  # average ranks of ties
        sums = np.bincount(inv, weights=ranks)
        ranks = (sums / counts)[inv]
    u_stat = ranks[: k.size].sum() - k.size * (k.size + 1) / 2.0
    return float(u_stat / (k.size * u.size))
