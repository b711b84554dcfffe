"""Calibration and unknown-input scores: the numbers, in numpy (no TensorFlow, no scikit-learn).

* How well probabilities mean what they say: :func:`ece` (expected calibration error,
  equal-width confidence bins), :func:`nll`, :func:`brier`, :func:`reliability`.
* Temperature scaling (Guo et al., ICML 2017): ``softmax(logits / T)``;
  :func:`fit_temperature_logits` picks the ``T`` of minimum negative log-likelihood, and
  :func:`check_temperature` decides whether a temperature may be applied at all: it is
  fitted on some folds of the split and scored on the fold it did not see (cross-fitting);
  only an out-of-fold NLL gain larger than its noise lets it through. A temperature that
  cannot be checked (no or one misclassified image, one class) is not applied.
* Unknown-input scores, higher = more like the training classes (:data:`SCORES`,
  :func:`unknown_score`): the maximum softmax probability (``msp``, Hendrycks & Gimpel
  2017), the energy ``logsumexp(logits)`` (``energy``, Liu et al. 2020), the negative
  Mahalanobis distance of the pooled features to the nearest class mean under one shared,
  shrunk covariance (``mahalanobis``, Lee et al. 2018), the negative distance of the
  L2-normalized features to their k-th nearest training feature (``knn``, Sun et al. 2022)
  and the virtual-logit score (``vim``, Wang et al. 2022: energy minus the scaled norm of
  the features off their principal subspace); :func:`threshold_for_acceptance` chooses the
  cut that keeps a target share of known images, :func:`auroc` and :func:`fpr_at_tpr` say
  how well a score separates known from unknown images.

The exporter fits these on a run's train / val splits, the runtime scores with them, and
analysis reports them; all three use this one module. The parameters a score needs are
plain arrays (:data:`SCORE_ARRAYS`, stored in a bundle's ``unknown.npz``) and scalars
(:data:`SCORE_PARAMS`, in its manifest).

Example::

    chk = check_temperature(val_logits, val_labels)
    if chk.applied:
        cal = temperature_probs(test_logits, chk.temperature)
        print(ece(softmax(test_logits), y), "->", ece(cal, y))
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


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (stable for any logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logsumexp(logits) -> np.ndarray:
    """Row-wise ``log(sum(exp(z)))`` in float64."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def log_probs(probs) -> np.ndarray:
    """``log p`` (clipped at :data:`EPS`): the logits up to a per-row constant, which temperature
    scaling and the softmax ignore (but the energy does not)."""
    p, _ = _check(probs)
    return np.log(np.clip(p, EPS, 1.0))


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row (float64); ``T = 1`` returns the input renormalized."""
    return temperature_probs(log_probs(probs), temperature)


def temperature_probs(logits, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` (float64): what a graph with the temperature in front of its
    softmax gives."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature))


def _nll_rows(logits: np.ndarray, y: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    return logsumexp(z) - z[np.arange(len(y)), y]


def fit_temperature_logits(logits, labels, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature of minimum NLL of ``softmax(logits / T)`` on ``(logits, labels)``
    (bounded search over log T; the NLL is convex in ``1/T``), clipped to ``bounds``.

    With no misclassified image the NLL falls as ``T`` falls, so the result is the lower
    bound: callers check the errors first (:func:`check_temperature` does).

    Raises:
        ValueError: fewer than 2 images or bad shapes.
    """
    from scipy.optimize import minimize_scalar

    z, y = _check_logits(logits, labels)
    if len(y) < 2:
        raise ValueError("fitting a temperature needs at least 2 labelled images")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(lambda log_t: float(np.mean(_nll_rows(z, y, float(np.exp(log_t))))),
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def fit_temperature(probs, labels, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """:func:`fit_temperature_logits` on ``log p`` (the same optimum: the softmax ignores the
    per-row constant by which log probabilities differ from logits).

    Raises:
        ValueError: fewer than 2 images or bad shapes.
    """
    p, y = _check(probs, labels)
    return fit_temperature_logits(log_probs(p), y, bounds=bounds)


def _check_logits(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2 or not np.isfinite(z).all():
        raise ValueError(f"logits must be finite (N, C) with N >= 1 and C >= 2, got shape {z.shape}")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"{z.shape[0]} logit rows but {y.shape[0]} labels")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be class indices 0..{z.shape[1] - 1}")
    return z, y


#: folds of the cross-fitted temperature check (fewer when the split has fewer misclassified images)
CHECK_FOLDS = 5
#: the out-of-fold NLL gain must exceed this many (corrected) standard errors of its mean (one-sided 95 %)
CHECK_Z = 1.645
#: ... and this share of the out-of-fold NLL at T = 1
CHECK_MIN_GAIN = 0.01


@dataclass(frozen=True)
class TemperatureCheck:
    """The temperature decision on one split (:func:`check_temperature`).

    ``temperature`` is what to apply (1.0 when ``applied`` is False); ``fitted`` the
    minimum-NLL temperature on the whole split (None when not identifiable); the ``oof_*``
    numbers are the cross-fitted check: each fold scored with the temperature fitted on the
    other folds, against T = 1 on the same images.
    """

    applied: bool
    temperature: float
    fitted: float | None
    reason: str
    images: int
    errors: int
    classes: int
    folds: int = 0
    fold_temperatures: tuple[float, ...] = ()
    oof_nll_before: float | None = None
    oof_nll_after: float | None = None
    oof_gain: float | None = None
    oof_gain_se: float | None = None
    min_gain: float | None = None

    def record(self) -> dict:
        """The check as plain JSON values (the bundle's ``calibration.check``)."""
        out = {"method": f"{self.folds}-fold cross-fit" if self.folds else "none", "passed": self.applied,
               "images": self.images, "errors": self.errors, "classes": self.classes}
        if self.folds:
            out.update(folds=self.folds, fold_temperatures=list(self.fold_temperatures),
                       oof_nll_before=self.oof_nll_before, oof_nll_after=self.oof_nll_after, gain=self.oof_gain,
                       gain_standard_error=self.oof_gain_se, standard_error="Nadeau-Bengio corrected",
                       z=CHECK_Z, min_gain=self.min_gain)
        return out


def _folds(wrong: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per image: misclassified images dealt round-robin first (every fold gets its
    share of them), then the others, each group in a seeded random order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(wrong), dtype=np.int64)
    offset = 0
    for group in (np.flatnonzero(wrong), np.flatnonzero(~wrong)):
        order = rng.permutation(group)
        fold[order] = (np.arange(len(order)) + offset) % k
        offset += len(order)
    return fold


def check_temperature(logits, labels, *, folds: int = CHECK_FOLDS, seed: int = 0, z: float = CHECK_Z,
                      min_gain: float = CHECK_MIN_GAIN) -> TemperatureCheck:
    """Decide whether temperature scaling fitted on ``(logits, labels)`` may be applied.

    A temperature fitted and judged on the same images always looks better; here it must
    earn its place on images it did not see. The split is cut into ``k = min(folds, errors)``
    folds (misclassified images spread over all of them); for each fold a temperature is
    fitted on the others and the fold's NLL computed with it. The temperature fitted on the
    whole split is applied only when that out-of-fold NLL beats T = 1 by more than ``z``
    standard errors of the per-image differences (Nadeau & Bengio's correction for the
    overlap of the folds' fits: the variance of the mean times ``1 + k / (k - 1)``) and by at
    least ``min_gain`` of the NLL.

    Not applied (``temperature`` 1.0, with the reason): a single class (a temperature would
    calibrate that class alone), no misclassified image (every T < 1 lowers the NLL: not
    identifiable), one misclassified image (nothing left to check it on), or a failed check.

    Example::

        chk = check_temperature(val_logits, val_labels)
        chk.applied, chk.temperature, chk.reason
    """
    zl, y = _check_logits(logits, labels)
    pred = zl.argmax(axis=1)
    wrong = pred != y
    n, errors, classes = len(y), int(wrong.sum()), int(len(np.unique(y)))
    base = dict(images=n, errors=errors, classes=classes)
    if classes < 2:
        return TemperatureCheck(False, 1.0, None, f"the split holds one class only ({n} image(s)): a temperature "
                                "fitted on it would calibrate that class alone", **base)
    if errors == 0:
        return TemperatureCheck(False, 1.0, None, f"no misclassified image among {n}: every temperature below 1 "
                                "lowers their NLL, so none is identifiable; the network's probabilities are kept",
                                **base)
    fitted = fit_temperature_logits(zl, y)
    if errors < 2:
        return TemperatureCheck(False, 1.0, fitted, f"one misclassified image among {n}: the temperature fitted on "
                                f"it ({fitted:.3g}) cannot be checked on images it did not see", **base)
    k = int(min(folds, errors))
    fold = _folds(wrong, k, seed)
    before, after, temps = _nll_rows(zl, y, 1.0), np.empty(n), []
    for f in range(k):
        held = fold == f
        t = fit_temperature_logits(zl[~held], y[~held]) if wrong[~held].any() else 1.0
        temps.append(round(float(t), 6))
        after[held] = _nll_rows(zl[held], y[held], t)
    diff = before - after
    # the k fits share most of their images, so the per-image gains are not independent: the
    # standard error of their mean is inflated as Nadeau & Bengio (2003) correct cross-validated
    # comparisons (variance x (1/n + 1/n_fit) instead of 1/n, n_fit = n (k-1)/k)
    gain = float(diff.mean())
    se = float(diff.std(ddof=1) * np.sqrt((1.0 + k / (k - 1.0)) / n))
    need = max(z * se, min_gain * float(before.mean()))
    chk = dict(folds=k, fold_temperatures=tuple(temps), oof_nll_before=float(before.mean()),
               oof_nll_after=float(after.mean()), oof_gain=gain, oof_gain_se=se, min_gain=need, **base)
    if gain > need:
        return TemperatureCheck(True, fitted, fitted, f"out-of-fold NLL {before.mean():.4g} -> {after.mean():.4g} "
                                f"({k}-fold cross-fit, gain {gain:.3g} > {need:.3g} needed)", **chk)
    return TemperatureCheck(False, 1.0, fitted, f"the temperature fitted on these images ({fitted:.3g}) does not "
                            f"hold on images it did not see: out-of-fold NLL {before.mean():.4g} -> "
                            f"{after.mean():.4g} ({k}-fold cross-fit, gain {gain:.3g}, needed > {need:.3g})", **chk)


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
    if not mu > 0:  # every image equals its class mean (one image per class): no spread to shrink toward
        return np.eye(d), 1.0
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


def network_logits(features, kernel, bias) -> np.ndarray:
    """The network's logits from its pooled features: ``features @ kernel + bias`` (float64), the
    ``probs`` layer before its softmax (the Dropout between them is the identity at inference)."""
    f = np.asarray(features, dtype=np.float64)
    w, b = np.asarray(kernel, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if f.ndim != 2 or w.ndim != 2 or f.shape[1] != w.shape[0] or b.shape != (w.shape[1],):
        raise ValueError(f"features {f.shape}, kernel {w.shape} and bias {b.shape} do not fit together")
    return f @ w + b


def energy_score(logits) -> np.ndarray:
    """The negative free energy ``logsumexp(logits)`` per image (higher = more known)."""
    return logsumexp(logits)


def normalize_rows(features) -> np.ndarray:
    """Features scaled to unit L2 norm (float32; an all-zero row stays zero)."""
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_score(features, bank, k: int, batch: int = 1024) -> np.ndarray:
    """Minus the Euclidean distance of the L2-normalized ``features`` to their ``k``-th nearest
    row of ``bank`` (normalized training features) -- Sun et al. 2022 (higher = more known).

    Raises:
        ValueError: shapes that do not match, or ``k`` outside 1..len(bank).
    """
    x = normalize_rows(features)
    bank = np.asarray(bank, dtype=np.float32)
    if x.ndim != 2 or bank.ndim != 2 or x.shape[1] != bank.shape[1]:
        raise ValueError(f"features of shape {x.shape} do not match the kNN bank {bank.shape}")
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in 1..{len(bank)} (the bank's rows), got {k!r}")
    out = np.empty(len(x))
    for i in range(0, len(x), batch):
        sim = x[i:i + batch] @ bank.T
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]  # the k-th largest cosine similarity
        out[i:i + batch] = -np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))
    return out


@dataclass(frozen=True)
class ViM:
    """The virtual-logit score's parameters (Wang et al. 2022): ``origin`` (D,) the point the
    head maps to zero logits, ``basis`` (D, R) the directions off the principal subspace of the
    training features (about ``origin``), ``alpha`` the scale matching the residual norm to the
    logits."""

    origin: np.ndarray
    basis: np.ndarray
    alpha: float


def vim_dim(feature_dim: int, num_classes: int) -> int | None:
    """The principal subspace's dimension ViM keeps (the paper's choice: 1000 for D >= 2048, 512
    for D >= 768, else D / 2, and at least the number of classes), or None when the features are
    too narrow to leave a residual (D <= C)."""
    d = 1000 if feature_dim >= 2048 else 512 if feature_dim >= 768 else feature_dim // 2
    d = max(d, num_classes)
    return d if d < feature_dim else None


def fit_vim(features, kernel, bias) -> ViM:
    """ViM's parameters from the training features and the network head.

    Raises:
        ValueError: the features are too narrow for a residual (:func:`vim_dim`), or bad shapes.
    """
    f = np.asarray(features, dtype=np.float64)
    w, b = np.asarray(kernel, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    logits = network_logits(f, w, b)
    dim = vim_dim(w.shape[0], w.shape[1])
    if dim is None:
        raise ValueError(f"{w.shape[0]}-d features for {w.shape[1]} classes leave no residual space for ViM")
    origin = -np.linalg.pinv(w.T) @ b
    x = f - origin
    vals, vecs = np.linalg.eigh(x.T @ x / len(x))
    basis = vecs[:, np.argsort(vals)[::-1][dim:]]
    residual = np.linalg.norm(x @ basis, axis=1)
    alpha = float(logits.max(axis=1).mean() / max(float(residual.mean()), 1e-12))
    return ViM(origin, basis, alpha)


def vim_score(features, kernel, bias, vim: ViM) -> np.ndarray:
    """``logsumexp(logits) - alpha * |residual|`` (higher = more known)."""
    f = np.asarray(features, dtype=np.float64)
    return logsumexp(network_logits(f, kernel, bias)) - vim.alpha * np.linalg.norm((f - vim.origin) @ vim.basis,
                                                                                     axis=1)


#: the unknown-input scores, in the order they are listed
SCORES = ("msp", "energy", "mahalanobis", "knn", "vim")
#: what each score reads besides the model's outputs: arrays of ``unknown.npz`` ...
SCORE_ARRAYS = {"msp": (), "energy": ("kernel", "bias"), "mahalanobis": ("means", "whiten"), "knn": ("bank",),
                "vim": ("kernel", "bias", "vim_origin", "vim_basis")}
#: ... and scalars of its manifest entry
SCORE_PARAMS = {"msp": (), "energy": (), "mahalanobis": (), "knn": ("k",), "vim": ("alpha",)}
#: the shape of each array: C classes, D feature width, other letters free (but positive)
ARRAY_SHAPES = {"kernel": ("D", "C"), "bias": ("C",), "means": ("C", "D"), "whiten": ("D", "D"), "bank": ("N", "D"),
                "vim_origin": ("D",), "vim_basis": ("D", "R")}
#: one line per score, for help texts and reports
SCORE_HELP = {
    "msp": "maximum softmax probability (calibrated probs)",
    "energy": "logsumexp of the network's logits",
    "mahalanobis": "distance of the features to the nearest class mean (shared shrunk covariance)",
    "knn": "distance of the normalized features to the k-th nearest training image",
    "vim": "energy minus the features' norm off their principal subspace (virtual logit)",
}


def array_problems(shapes: dict, *, feature_dim: int, num_classes: int, needed=()) -> list[str]:
    """What is wrong with the arrays of ``unknown.npz`` given as ``{name: (shape, dtype kind)}``:
    names this module does not know, missing ``needed`` ones, non-float data (an object array
    would be a pickle), shapes that contradict the feature width or the class count."""
    problems, dims = [], {"D": int(feature_dim), "C": int(num_classes)}
    for name in needed:
        if name not in shapes:
            problems.append(f"array {name!r} is missing")
    for name, (shape, kind) in shapes.items():
        spec = ARRAY_SHAPES.get(name)
        if spec is None:
            problems.append(f"array {name!r} is not one of {', '.join(ARRAY_SHAPES)}")
            continue
        if kind != "f":
            problems.append(f"array {name!r} holds {kind!r}-kind data, not floating point")
        if len(shape) != len(spec) or any(s < 1 or (d in dims and s != dims[d]) for s, d in zip(shape, spec)):
            want = "(" + ", ".join(str(dims.get(d, d)) for d in spec) + ("," if len(spec) == 1 else "") + ")"
            problems.append(f"array {name!r} has shape {tuple(shape)}, expected {want}")
    return problems


@dataclass(frozen=True)
class UnknownScorer:
    """One unknown-input score, ready to run: ``scorer(features, probs) -> scores`` (higher = more
    like the training classes). Made from a bundle's arrays and manifest scalars by
    :meth:`from_arrays`, which checks them."""

    name: str
    arrays: dict
    params: dict

    @classmethod
    def from_arrays(cls, name: str, arrays, params: dict | None = None, *, feature_dim: int,
                    num_classes: int) -> "UnknownScorer":
        """The scorer ``name`` from ``arrays`` (a dict or an open ``.npz``; only the ones it needs
        are read) and its manifest scalars ``params``.

        Raises:
            ValueError: an unknown score, a missing or misshapen array or scalar.
        """
        if name not in SCORES:
            raise ValueError(f"unknown score {name!r}; accepted: {', '.join(SCORES)}")
        params = dict(params or {})
        got = {k: np.asarray(arrays[k]) for k in SCORE_ARRAYS[name] if k in arrays}
        problems = array_problems({k: (v.shape, v.dtype.kind) for k, v in got.items()}, feature_dim=feature_dim,
                                  num_classes=num_classes, needed=SCORE_ARRAYS[name])
        for k in SCORE_PARAMS[name]:
            v = params.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                problems.append(f"scalar {k!r} is {v!r}, not a number")
        if name == "knn" and not problems and not (float(params["k"]).is_integer()
                                                   and 1 <= params["k"] <= len(got["bank"])):
            problems.append(f"k = {params['k']!r} is not a whole number in 1..{len(got['bank'])} (the bank's rows)")
        if problems:
            raise ValueError(f"{name} parameters: " + "; ".join(problems))
        # the large matrices in float32 (as stored; float64 would be ~4x slower per image), what
        # every image needs computed once here
        ready = {k: np.asarray(v, dtype=np.float64 if k in ("kernel", "bias") else np.float32)
                 for k, v in got.items()}
        if name == "mahalanobis":
            centres = (ready["means"].astype(np.float64) @ ready["whiten"].astype(np.float64))
            ready.update(centres=centres.astype(np.float32), centres_sq=np.sum(centres ** 2, axis=1))
        return cls(name, ready, params)

    def __call__(self, features, probs) -> np.ndarray:
        a = self.arrays
        if self.name == "msp":
            return msp_score(probs)
        if self.name == "energy":
            return energy_score(network_logits(features, a["kernel"], a["bias"]))
        x = np.asarray(features, dtype=np.float32)
        if self.name == "mahalanobis":
            z = x @ a["whiten"]
            d2 = (np.sum(z.astype(np.float64) ** 2, axis=1, keepdims=True)
                  - 2.0 * (z @ a["centres"].T).astype(np.float64) + a["centres_sq"][None, :])
            return -np.maximum(d2.min(axis=1), 0.0)
        if self.name == "knn":
            return knn_score(x, a["bank"], int(self.params["k"]))
        residual = np.linalg.norm(((x - a["vim_origin"]) @ a["vim_basis"]).astype(np.float64), axis=1)
        return logsumexp(network_logits(x, a["kernel"], a["bias"])) - float(self.params["alpha"]) * residual


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


def fpr_at_tpr(known_scores: Sequence[float], unknown_scores: Sequence[float], tpr: float = 0.95) -> float:
    """The share of unknown images accepted at the threshold that accepts ``tpr`` of the known
    ones (FPR at 95 % TPR, the usual companion of the AUROC).

    Raises:
        ValueError: either side is empty.
    """
    u = np.asarray(unknown_scores, dtype=np.float64).ravel()
    if u.size == 0:
        raise ValueError("FPR needs unknown scores")
    return float(np.mean(u >= threshold_for_acceptance(known_scores, tpr)))
