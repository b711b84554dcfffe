"""Answering "unknown": a bundle's unknown-input score and threshold, applied at serving time.

A bundle exported with calibration carries an ``unknown`` record in its manifest (the
scores it offers, each with a threshold chosen on validation images for a target share of
known images) and, for the feature-space score, ``unknown.npz`` (class means and the
whitening map of the shared covariance; hashed like every file). ``transfer infer --reject``
and ``transfer serve --reject`` mark an image ``unknown`` when its score is below the
threshold. Scores are computed in numpy from the model's ``features`` / ``probs`` outputs,
so every backend gets the same rule.

Example::

    det = make_detector(bundle)            # the bundle's default score
    scores, known = det(features, probs)   # known[i] False -> report "unknown"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import calibration as cal
from ..bundle import Bundle
from ..errors import BundleError, ConfigError, TamperedBundleError

SCORES = ("mahalanobis", "msp")


@dataclass(frozen=True)
class UnknownDetector:
    """``(scores, known) = detector(features, probs)``; ``known = score >= threshold``."""

    score: str
    threshold: float
    gaussian: cal.ClassGaussian | None = None

    def scores(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        if self.score == "msp":
            return cal.msp_score(probs)
        return cal.mahalanobis_score(features, self.gaussian)

    def __call__(self, features: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores(features, probs)
        return s, s >= self.threshold

    def describe(self) -> dict:
        """What every output row records about the decision rule."""
        return {"score": self.score, "threshold": self.threshold}


def unknown_record(bundle: Bundle) -> dict | None:
    """The manifest's ``unknown`` record, or None for a bundle exported without one."""
    rec = bundle.manifest.get("unknown")
    return rec if isinstance(rec, dict) and rec.get("scores") else None


def make_detector(bundle: Bundle, score: str | None = None) -> UnknownDetector:
    """The detector of ``score`` (default: the bundle's own default score).

    Raises:
        ConfigError: the bundle has no unknown-input score, or not the one asked for.
        TamperedBundleError: the score's parameters are missing or inconsistent.
    """
    rec = unknown_record(bundle)
    if rec is None:
        raise ConfigError(f"bundle {bundle.path} has no unknown-input score to reject images with",
                          hint="re-export it with this transfer (calibration and unknown scores are on by default), "
                               "or run without rejecting", option="reject")
    name = score or rec.get("default") or "msp"
    if name not in SCORES:
        raise ConfigError(f"unknown score {name!r}; accepted: {', '.join(SCORES)}", option="reject")
    entry = rec["scores"].get(name)
    if not isinstance(entry, dict):
        raise ConfigError(f"bundle {bundle.path} has no {name!r} score (it has: {', '.join(rec['scores'])})",
                          option="reject")
    thr = entry.get("threshold")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not np.isfinite(thr):
        raise TamperedBundleError(f"{bundle.path}: the {name} threshold is not a number ({thr!r})",
                                  hint="re-export the bundle")
    if name == "msp":
        return UnknownDetector("msp", float(thr))
    rel = entry.get("file")
    if not isinstance(rel, str):
        raise TamperedBundleError(f"{bundle.path}: the {name} score names no parameter file", hint="re-export the bundle")
    try:
        with np.load(bundle.file(rel), allow_pickle=False) as z:
            gauss = cal.ClassGaussian.from_arrays({"means": z["means"], "whiten": z["whiten"]})
    except BundleError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise TamperedBundleError(f"{bundle.path / rel}: cannot read the {name} parameters: {exc}",
                                  hint="re-export the bundle") from None
    n_classes = len(bundle.class_names)
    dim = bundle.manifest.get("feature_dim")
    if gauss.means.shape[0] != n_classes or (isinstance(dim, int) and gauss.means.shape[1] != dim):
        raise TamperedBundleError(f"{bundle.path / rel}: parameters for {gauss.means.shape[0]} classes of "
                                  f"{gauss.means.shape[1]}-d features, but the bundle has {n_classes} classes"
                                  + (f" of {dim}-d features" if isinstance(dim, int) else ""),
                                  hint="re-export the bundle")
    return UnknownDetector(name, float(thr), gauss)


def _outputs(runner, paths, size, *, batch: int, workers: int, bar, recipe=None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(features, probs, unreadable count)`` of ``runner`` over image files."""
    from ..data.stream import decode_batches

    fs, ps, bad = [], [], 0
    for pb in decode_batches(paths, size, batch=batch, workers=workers, recipe=recipe):
        bad += len(pb.items) - len(pb.ok_index)
        if len(pb.x):
            f, p = runner.run(pb.x)
            fs.append(f)
            ps.append(p)
        bar.update(len(pb.items))
    if not fs:
        return np.zeros((0, 0)), np.zeros((0, 0)), bad
    return np.concatenate(fs), np.concatenate(ps), bad


def evaluate_unknown(bundle: Bundle, known, unknown, *, backend: str | None = None, providers="cpu",
                     batch: int = 64, workers: int = 2, progress=None) -> dict:
    """How well each unknown-input score of ``bundle`` tells known images from unknown ones.

    Args:
        known: image files of the bundle's classes (e.g. the run's test split).
        unknown: image files of none of its classes (left-out classes, noise, other datasets).

    Returns:
        ``{"known": n, "unknown": n, "unreadable": n, "scores": {name: {"auroc",
        "threshold", "known_accept_rate", "false_accept_rate"}}, "best": name}`` -- AUROC
        over all thresholds; the rates at the bundle's own threshold of that score.

    Raises:
        ConfigError: the bundle has no unknown-input score, or no readable image on a side.
    """
    from ..progress import as_progress
    from .runners import make_runner

    rec = unknown_record(bundle)
    if rec is None:
        make_detector(bundle)  # raises the clear error
    p = as_progress(progress)
    runner = make_runner(bundle, backend, providers)
    detectors = {name: make_detector(bundle, name) for name in SCORES if name in rec["scores"]}
    with p.bar(len(known) + len(unknown), "unknown-input evaluation") as bar:
        kw = dict(batch=batch, workers=workers, bar=bar, recipe=bundle.recipe)
        fk, pk, bad_k = _outputs(runner, known, bundle.input_size, **kw)
        fu, pu, bad_u = _outputs(runner, unknown, bundle.input_size, **kw)
    if not len(pk) or not len(pu):
        raise ConfigError(f"no readable {'known' if not len(pk) else 'unknown'} image to evaluate with",
                          option="unknown")
    out = {"known": int(len(pk)), "unknown": int(len(pu)), "unreadable": int(bad_k + bad_u), "scores": {}}
    for name, det in detectors.items():
        sk, su = det.scores(fk, pk), det.scores(fu, pu)
        out["scores"][name] = {"auroc": cal.auroc(sk, su), "threshold": det.threshold,
                               "known_accept_rate": float(np.mean(sk >= det.threshold)),
                               "false_accept_rate": float(np.mean(su >= det.threshold))}
    out["best"] = max(out["scores"], key=lambda k: out["scores"][k]["auroc"])
    out["default"] = rec.get("default")
    return out
