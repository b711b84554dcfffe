"""Unknown-input scores, in numpy: how much an image looks like the training classes (higher =
more known), the parameters each score reads and the numbers that say how well a score
separates known from unknown images.

* The scores (:data:`SCORES`, run by :class:`UnknownScorer`): the maximum softmax probability
  (``msp``, Hendrycks & Gimpel 2017), the energy ``logsumexp(logits)`` (``energy``, Liu et al.
  2020), the negative Mahalanobis distance of the pooled features to the nearest class mean
  under one shared, shrunk covariance (``mahalanobis``, Lee et al. 2018), the negative
  distance of the L2-normalized features to their k-th nearest training feature (``knn``, Sun
  et al. 2022) and the virtual-logit score (``vim``, Wang et al. 2022: energy minus the scaled
  norm of the features off their principal subspace).
* Their parameters are plain arrays (:data:`SCORE_ARRAYS`, stored in a bundle's
  ``unknown.npz``, shapes in :data:`ARRAY_SHAPES`, checked by :func:`array_problems`) and
  scalars (:data:`SCORE_PARAMS`, in its manifest).
* :func:`threshold_for_acceptance` chooses the cut that keeps a target share of known images;
  :func:`auroc` and :func:`fpr_at_tpr` say how well a score separates known from unknown.

The exporter fits these on a run's train / val splits, the runtime scores with them, and
analysis reports them; all three use this one module. The logit arithmetic is
:mod:`transfer.calibration`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .calibration import check_probs, logsumexp, network_logits


def msp_score(probs) -> np.ndarray:
    """Maximum softmax probability per image (higher = more like a known class)."""
    p, _ = check_probs(probs)
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
