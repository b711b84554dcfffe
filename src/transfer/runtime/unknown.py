"""Answering "unknown": a bundle's unknown-input scores and thresholds, applied at serving time.

A bundle exported with calibration carries an ``unknown`` record in its manifest: every
score of :data:`transfer.unknown_scores.SCORES` it offers (maximum softmax probability, energy,
Mahalanobis, kNN on normalized features, ViM), each with a threshold chosen on validation
images for a target share of known images, the default score and the rule that chose it;
the parameters of the feature-space scores (class means and whitening map, the network
head, the kNN bank, ViM's residual basis) are the arrays of ``unknown.npz`` (no pickle;
hashed like every file, checked by :mod:`transfer.bundle`). ``transfer infer --reject`` and
``transfer serve --reject`` mark an image ``unknown`` when its score is below the threshold.
Scores are computed in numpy from the model's ``features`` / ``probs`` outputs, so every
backend gets the same rule.

Example::

    det = make_detector(bundle)            # the bundle's default score
    scores, known = det(features, probs)   # known[i] False -> report "unknown"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import unknown_scores as unk
from ..bundle import Bundle
from ..data.stream import decode_batches
from ..errors import ConfigError, TamperedBundleError
from ..progress import as_progress
from .predict_config import InferConfig, ModelOptions, check_value
from .runners import make_runner

SCORES = unk.SCORES


@dataclass(frozen=True)
class UnknownDetector:
    """``(scores, known) = detector(features, probs)``; ``known = score >= threshold``."""

    score: str
    threshold: float
    scorer: unk.UnknownScorer

    def scores(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return self.scorer(features, probs)

    def __call__(self, features: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores(features, probs)
        return s, s >= self.threshold

    def describe(self) -> dict:
        """What every output row records about the decision rule."""
        return {"score": self.score, "threshold": self.threshold}


def unknown_record(bundle: Bundle) -> dict | None:
    """The manifest's ``unknown`` record, or None for a bundle exported without scores."""
    rec = bundle.manifest.get("unknown")
    return rec if isinstance(rec, dict) and rec.get("scores") else None


def _no_scores(bundle: Bundle) -> ConfigError:
    rec = bundle.manifest.get("unknown")
    why = rec.get("reason") if isinstance(rec, dict) else None
    return ConfigError(f"bundle {bundle.path} has no unknown-input score to reject images with"
                       + (f": {why}" if why else ""),
                       hint="re-export it with this transfer (calibration and unknown scores are on by default; "
                            "they need a val split of at least 100 readable images), or run without rejecting",
                       option="reject")


def make_detector(bundle: Bundle, score: str | None = None) -> UnknownDetector:
    """The detector of ``score`` (default: the bundle's own default score).

    Raises:
        ConfigError: the bundle has no unknown-input score (the reason it was exported
            without, when it says), or not the one asked for.
        TamperedBundleError: the score's parameters are missing or inconsistent.
    """
    rec = unknown_record(bundle)
    if rec is None:
        raise _no_scores(bundle)
    name = check_value(ModelOptions, "unknown_score", score or rec.get("default") or "msp")
    entry = rec["scores"].get(name)
    if not isinstance(entry, dict):
        raise ConfigError(f"bundle {bundle.path} has no {name!r} score (it has: {', '.join(rec['scores'])})",
                          option="unknown_score")
    thr = entry.get("threshold")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not np.isfinite(thr):
        raise TamperedBundleError(f"{bundle.path}: the {name} threshold is not a number ({thr!r})",
                                  hint="re-export the bundle")
    n_classes, dim = len(bundle.class_names), bundle.feature_dim
    arrays: dict = {}
    rel = entry.get("file")
    if unk.SCORE_ARRAYS[name]:
        if not isinstance(rel, str):
            raise TamperedBundleError(f"{bundle.path}: the {name} score names no parameter file",
                                      hint="re-export the bundle")
        path = bundle.paths[rel] if rel in bundle.paths else bundle.file(rel)  # file(): the error naming it
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in unk.SCORE_ARRAYS[name] if k in z.files}
        except (OSError, ValueError) as exc:
            raise TamperedBundleError(f"{bundle.path / rel}: cannot read the {name} parameters: {exc}",
                                      hint="re-export the bundle") from None
    try:
        scorer = unk.UnknownScorer.from_arrays(name, arrays, entry, feature_dim=bundle.feature_dim,
                                               num_classes=n_classes)
    except ValueError as exc:
        where = bundle.path / rel if isinstance(rel, str) else bundle.path
        raise TamperedBundleError(f"{where}: {exc} (the bundle has {n_classes} classes of {dim}-d features)",
                                  hint="re-export the bundle") from None
    return UnknownDetector(name, float(thr), scorer)


def _outputs(runner, paths, size, *, batch: int, workers: int, bar, recipe=None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(features, probs, unreadable count)`` of ``runner`` over image files."""

    fs, ps, bad = [], [], 0
    for pb in decode_batches(paths, size, batch=batch, workers=workers, recipe=recipe):
        bad += len(pb.items) - len(pb.ok_index)
        if len(pb.x):
            out = runner.infer(pb.x)
            fs.append(out.features)
            ps.append(out.probs)
        bar.update(len(pb.items))
    if not fs:
        return np.zeros((0, 0)), np.zeros((0, 0)), bad
    return np.concatenate(fs), np.concatenate(ps), bad


def _rates(sk: np.ndarray, su: np.ndarray, threshold: float, tpr: float) -> dict:
    return {"auroc": unk.auroc(sk, su), "fpr_at_tpr": unk.fpr_at_tpr(sk, su, tpr), "threshold": threshold,
            "known_accept_rate": float(np.mean(sk >= threshold)), "false_accept_rate": float(np.mean(su >= threshold))}


#: how evaluate_unknown runs the images: 64 per model call, 2 decode threads, ONNX Runtime fp32 on the CPU
EVALUATE = InferConfig(batch=64, workers=2, model=ModelOptions(providers="cpu"))


def evaluate_unknown(bundle: Bundle, known, unknown, config: InferConfig = EVALUATE, *, groups=None, tpr: float = 0.95,
                     progress=None) -> dict:
    """How well each unknown-input score of ``bundle`` tells known images from unknown ones.

    Args:
        known: image files of the bundle's classes (e.g. the run's test split).
        unknown: image files of none of its classes (left-out classes, noise, other datasets).
        config: ``batch``, ``workers`` (decode threads) and the model options (backend,
            providers, threads) the images are run with.
        groups: a name per unknown file (e.g. the folder it came from): the rates are also
            reported per group (``by_group``).
        tpr: the share of known images the FPR column keeps (0.95: "FPR at 95 % TPR").

    Returns:
        ``{"known": n, "unknown": n, "unreadable": n, "default": name, "scores": {name:
        {"auroc", "fpr_at_tpr", "threshold", "known_accept_rate", "false_accept_rate"}},
        "highest_auroc": name}`` -- AUROC over all thresholds, the FPR at the threshold that
        keeps ``tpr`` of these known images, and the rates at the bundle's own threshold (what
        ``--reject`` does). ``highest_auroc`` only reports: a score chosen by it would be
        chosen on these images.

    Raises:
        ConfigError: the bundle has no unknown-input score, or no readable image on a side.
    """
    rec = unknown_record(bundle)
    if rec is None:
        raise _no_scores(bundle)
    p = as_progress(progress)
    m = config.model
    detectors = {name: make_detector(bundle, name) for name in SCORES if name in rec["scores"]}
    with make_runner(bundle, m.backend, m.providers, m.threads) as runner, \
            p.bar(len(known) + len(unknown), "unknown-input evaluation") as bar:
        kw = dict(batch=config.batch, workers=config.workers, bar=bar, recipe=bundle.recipe)
        fk, pk, bad_k = _outputs(runner, known, bundle.input_size, **kw)
        gu = [] if groups is None else list(groups)
        if groups is not None and len(gu) != len(unknown):
            raise ValueError(f"{len(gu)} group names for {len(unknown)} unknown files")
        fu, pu, bad_u, ok_u = [], [], 0, []
        for g in dict.fromkeys(gu) if groups is not None else [None]:
            files = [u for u, n in zip(unknown, gu) if n == g] if g is not None else list(unknown)
            f, pr, bad = _outputs(runner, files, bundle.input_size, **kw)
            bad_u += bad
            if len(pr):
                fu.append(f)
                pu.append(pr)
                ok_u += [g] * len(pr)
    if not len(pk) or not pu:
        raise ConfigError(f"no readable {'known' if not len(pk) else 'unknown'} image to evaluate with",
                          option="unknown")
    fu, pu, ok_u = np.concatenate(fu), np.concatenate(pu), np.asarray(ok_u, dtype=object)
    out = {"known": int(len(pk)), "unknown": int(len(pu)), "unreadable": int(bad_k + bad_u), "tpr": float(tpr),
           "default": rec.get("default"), "scores": {}}
    if groups is not None:
        out["by_group"] = {g: {"images": int(np.sum(ok_u == g)), "scores": {}} for g in dict.fromkeys(ok_u.tolist())}
    for name, det in detectors.items():
        sk, su = det.scores(fk, pk), det.scores(fu, pu)
        out["scores"][name] = _rates(sk, su, det.threshold, tpr)
        for g, entry in out.get("by_group", {}).items():
            entry["scores"][name] = _rates(sk, su[ok_u == g], det.threshold, tpr)
    out["highest_auroc"] = max(out["scores"], key=lambda k: out["scores"][k]["auroc"])
    return out
