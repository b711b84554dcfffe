"""Calibration: how well probabilities mean what they say, and temperature scaling, in numpy
(no TensorFlow, no scikit-learn).

* :func:`ece` (expected calibration error, equal-width confidence bins), :func:`nll`,
  :func:`brier`, :func:`reliability`, :func:`calibration_metrics`.
* Temperature scaling (Guo et al., ICML 2017): ``softmax(logits / T)``;
  :func:`fit_temperature_logits` picks the ``T`` of minimum negative log-likelihood, and
  :func:`check_temperature` decides whether a temperature may be applied at all: it is
  fitted on some folds of the split and scored on the fold it did not see (cross-fitting);
  only an out-of-fold NLL gain larger than its noise lets it through. A temperature that
  cannot be checked (no or one misclassified image, one class) is not applied.
* The logit arithmetic both this module and the unknown-input scores
  (:mod:`transfer.unknown_scores`) use: :func:`softmax`, :func:`logsumexp`,
  :func:`log_probs`, :func:`network_logits`.

The exporter decides the temperature on a run's val split, the runtime and analysis report
with these numbers; all use this one module.

Example::

    chk = check_temperature(val_logits, val_labels)
    if chk.applied:
        cal = temperature_probs(test_logits, chk.temperature)
        print(ece(softmax(test_logits), y), "->", ece(cal, y))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the smallest probability whose log is taken (float32 softmax outputs can be exactly 0)
EPS = 1e-12
ECE_BINS = 15


def check_probs(probs, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(probs, labels)`` as float64 (N, C) and int64 (N,), or ValueError saying what does not fit."""
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
    p, y = check_probs(probs, labels)
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
    p, _ = check_probs(probs)
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
    p, y = check_probs(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over images of sum over classes of (p - onehot)^2."""
    p, y = check_probs(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_metrics(probs, labels, bins: int = ECE_BINS) -> dict:
    """``{"ece", "ece_floor", "nll", "brier", "accuracy", "images", "reliability"}`` of one set of
    probabilities (``ece_floor``: what a perfectly calibrated model would show here,
    :func:`ece_floor`; ``reliability``: the bins of :func:`reliability`, for the diagram)."""
    p, y = check_probs(probs, labels)
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


def network_logits(features, kernel, bias) -> np.ndarray:
    """The network's logits from its pooled features: ``features @ kernel + bias`` (float64), the
    ``probs`` layer before its softmax (the Dropout between them is the identity at inference)."""
    f = np.asarray(features, dtype=np.float64)
    w, b = np.asarray(kernel, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if f.ndim != 2 or w.ndim != 2 or f.shape[1] != w.shape[0] or b.shape != (w.shape[1],):
        raise ValueError(f"features {f.shape}, kernel {w.shape} and bias {b.shape} do not fit together")
    return f @ w + b


def log_probs(probs) -> np.ndarray:
    """``log p`` (clipped at :data:`EPS`): the logits up to a per-row constant, which temperature
    scaling and the softmax ignore (but the energy does not)."""
    p, _ = check_probs(probs)
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
    p, y = check_probs(probs, labels)
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
