"""The audited folder's images and what the audit finds in them, as rows of ``audit.csv``.

:func:`audit_data` indexes the folder (without decoding: the pass decodes every file) and ties
each image to the split it belongs to (a run's splits, or the folder's own
``train/val/test``), as :class:`AuditData`. The findings on it:

* **duplicates** (:func:`find_duplicates`) -- exact (same decoded pixels) and near
  (:func:`transfer.data.near_search.near_pairs_arrays`), grouped into chains
  (:func:`transfer.data.dedupe.components`); a group is *within a class*, *across classes*
  (conflicting labels) and, when the images belong to splits, *across splits* (leakage). Each
  group also carries the cosine of its features.
* **label issues** and **outliers** (:func:`labels_and_outliers`) -- confident learning on
  out-of-sample probabilities (:mod:`transfer.analysis.audit_labels`); the mean cosine distance
  to the nearest neighbours in feature space (:func:`transfer.data.nearest.nearest`), flagged
  far above the folder's own spread (:data:`Z_FLAG`).
* **quality** (:func:`quality_findings`) -- near-constant (blank), very dark or bright, noise,
  blurry, tiny or extreme aspect ratio, grayscale in a colour set.

Example::

    d = audit_data("data/fashion", None, as_progress(None))
    groups, rows, search = find_duplicates(d, got, ok, features, 0.96, p)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.dedupe import components
from ..data.fingerprint import Fingerprints
from ..data.folder import FileCheck, index_folder
from ..data.near_search import NearStats, near_pairs_arrays
from ..data.nearest import nearest
from ..errors import DataError
from .audit_engine import FeatureSource
from .audit_labels import Group, find_label_issues, pixel_features
from .audit_pass import QUALITY, PassResult
from .features import open_run

#: robust z-score (median / MAD) beyond which a quality number or an outlier score is flagged
Z_FLAG = 6.0


@dataclass
class AuditData:
    root: Path
    class_names: list[str]
    rel: list[str]
    labels: np.ndarray
    split: list[str | None]
    unreadable: list[tuple[str, str]]


def audit_data(data, run, p) -> AuditData:
    p.say(f"audit: indexing {data}")
    # the pass decodes every file and lists the bad ones
    idx = index_folder(data, strict=False, check=FileCheck(decode=False))
    if not idx.samples:
        raise DataError(f"{data} holds no readable image to audit")
    where: dict[str, str] = {}
    if idx.given_splits is not None:
        where = {s.path: name for name, part in idx.given_splits.items() for s in part}
    if run is not None:
        run = open_run(run)
        for name in ("train", "val", "test"):
            where.update({rel: name for rel, _ in run.split(name)})
    rel = [s.path for s in idx.samples]
    return AuditData(Path(idx.root), list(idx.class_names), rel, np.array([s.label for s in idx.samples], np.int64),
                 [where.get(r) for r in rel], [(b.path, b.reason) for b in idx.bad])


def finding_row(d: AuditData, i: int, kind: str, score, *, group=None, suggested=None, detail: str = "") -> dict:
    return {"path": d.rel[i], "kind": kind, "score": None if score is None else round(float(score), 6),
            "group": group, "label": d.class_names[d.labels[i]], "suggested_label": suggested, "split": d.split[i],
            "detail": detail}


def find_duplicates(d: AuditData, got: PassResult, ok: list[int], feats: np.ndarray, threshold: float, p):
    """Groups of exact / near duplicates, their rows (one per member, per kind that applies) and
    what the near-duplicate search did."""
    p.say(f"audit: duplicates (exact pixels; near: verification score >= {threshold:g})")
    digests = [got.digests[i] for i in ok]
    first: dict[str, int] = {}
    exact = []
    for k, dg in enumerate(digests):
        j = first.setdefault(dg, k)
        if j != k:
            exact.append((j, k))
    st = NearStats()
    sides = np.minimum(got.quality[ok, QUALITY.index("height")], got.quality[ok, QUALITY.index("width")])
    fps = Fingerprints(got.thumbs[ok], got.greys[ok], got.hashes[ok], digests, sides)
    near = near_pairs_arrays(fps, threshold=threshold, stats=st)
    groups = components(len(ok), list(exact) + near)  # chains: a crop of a copy joins its original
    best: dict[int, float] = {}
    for i, j, s in near:
        best[i] = max(best.get(i, 0.0), s)
        best[j] = max(best.get(j, 0.0), s)
    rows, out_groups = [], []
    for gid, g in enumerate(groups, start=1):
        members = [ok[k] for k in g]
        labels = {int(d.labels[i]) for i in members}
        splits = {d.split[i] for i in members if d.split[i]}
        fcos = _group_cosine(feats, g)
        out_groups.append({"group": gid, "paths": [d.rel[i] for i in members], "splits": sorted(splits),
                           "labels": sorted(d.class_names[c] for c in labels), "feature_cosine": fcos})
        all_exact = all(digests[k] == digests[g[0]] for k in g[1:])
        kind = "exact_duplicate" if all_exact else "near_duplicate"
        for k, i in zip(g, members):
            detail = f"{len(g)} images; feature cosine {fcos:.3f}"
            rows.append(finding_row(d, i, kind, 1.0 if all_exact else best.get(k, 1.0), group=gid, detail=detail))
            if len(labels) > 1:
                rows.append(finding_row(d, i, "conflicting_labels", float(len(labels)), group=gid,
                                        detail="labels " + ", ".join(sorted(d.class_names[c] for c in labels))))
            if len(splits) > 1:
                rows.append(finding_row(d, i, "leakage", float(len(splits)), group=gid,
                                        detail="splits " + ", ".join(sorted(splits))))
    search = {"candidate_pairs": st.candidates, "verified_pairs": st.verified, "refined_pairs": st.refined,
              "near_pairs": len(near), "seconds": {k: round(v, 2) for k, v in st.seconds.items()}}
    return out_groups, rows, search


def _group_cosine(feats: np.ndarray, g: Sequence[int]) -> float:
    """Smallest cosine between the features of a group's first member and the others."""
    f = feats[list(g)].astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return float((f[1:] @ f[0]).min()) if len(g) > 1 else 1.0


def labels_and_outliers(d: AuditData, src: FeatureSource, feats: dict[str, np.ndarray], greys: np.ndarray,
                        ok: list[int], settings: dict, p):
    """Label issues (:func:`transfer.analysis.audit_labels.find_label_issues`, on views out of
    sample for the rows they judge) and outlier scores (mean cosine distance to the nearest
    neighbours in the source's features, robust z), with the seconds of each."""
    t = time.perf_counter()
    views = {"pixels": pixel_features(greys)}
    probabilities: dict[str, np.ndarray] = {}
    if src.fit is None:  # a chosen backbone never saw these labels
        views["backbone"] = feats["source"]
        groups = [Group("all", np.arange(len(ok)), ("backbone", "pixels"), "every image (the backbone never saw "
                        "their labels)")]
    else:
        views["trained"] = feats["source"]
        if "initial" in feats:
            views["initial"] = feats["initial"]
        fit = np.array([d.rel[i] in src.fit for i in ok], dtype=bool)
        trial = src.describe["trial"]
        groups = [Group("fit", np.flatnonzero(fit), ("folds", "initial", "pixels"),
                        f"the images trial {trial} trained on"),
                  Group("held_out", np.flatnonzero(~fit), ("folds", "trained", "initial", "pixels"),
                        f"the images trial {trial} did not train on")]
        if src.folds is not None:
            probabilities["folds"] = _held_out_softmax(d, src.folds, feats, ok)
    p.say(f"audit: label issues ({settings['folds']}-fold cross-fitted heads on "
          + ", ".join(sorted(views)) + (", with the k-fold models' softmax" if probabilities else "") + "; cleanlab)")
    found = find_label_issues(views, d.labels[ok], groups, folds=settings["folds"], class_names=d.class_names,
                              probabilities=probabilities)
    for g in found.record.get("groups", []):
        if g.get("searched"):
            p.say(f"audit: label issues: {g['issues']} among {g['what']} ({g['images']} images; judged by "
                  f"{g['source']}, out-of-fold log loss {g['log_loss'][g['source']]:.3f})")
    for note in found.notes:
        p.say(f"note: {note}")
    t1 = time.perf_counter()
    dist, _ = _knn(feats["source"], settings["neighbours"])
    score = dist.mean(axis=1)
    return found, (score, robust_z(score)), {"label_issues": t1 - t, "outliers": time.perf_counter() - t1}


def _held_out_softmax(d: AuditData, folds: dict, feats: dict[str, np.ndarray], ok: list[int]) -> np.ndarray:
    """Per image the softmax of the k-fold model that did not train on it (the mean of all for an
    image in no fold's val split: test, or outside the run), over the audit's classes (matched by
    name with the run's)."""
    names = list(folds["trials"])
    mean = np.mean([feats[n] for n in names], axis=0)
    out = np.zeros((len(ok), len(d.class_names)), np.float64)
    cols = [d.class_names.index(c) if c in d.class_names else -1 for c in folds["classes"]]
    keep = [j for j, c in enumerate(cols) if c >= 0]
    for k, i in enumerate(ok):
        name = folds["held_out"].get(d.rel[i])
        row = feats[name][k] if name is not None else mean[k]
        out[k, [cols[j] for j in keep]] = row[keep]
    return out


def robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    mad = np.median(np.abs(v - med)) * 1.4826
    return (v - med) / max(mad, 1e-6 * max(1.0, abs(med)))


def _knn(features: np.ndarray, k: int):
    """(cosine distances, indices) of each row's ``k`` nearest other rows
    (:func:`transfer.data.nearest.nearest`: exact for small sets, an inverted-file search beyond)."""
    from threadpoolctl import threadpool_limits

    f = np.asarray(features, dtype=np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    with threadpool_limits(1):  # small products: BLAS's threads only fight (see near_search.near_pairs_arrays)
        idx, sim = nearest(f, f, min(k, len(f) - 1), same=True)
    sim = np.where(np.isfinite(sim), sim, -1.0)
    return 1.0 - sim, idx


def quality_findings(quality: np.ndarray, ok: list[int]) -> list[tuple[int, str, float, str]]:
    """(image, kind, score, detail) of the quality checks; thresholds relative to the folder where it has a spread.

    ``quality``: rows of :data:`QUALITY` numbers of the images ``ok``."""
    arr = {k: quality[:, c].astype(np.float64) for c, k in enumerate(QUALITY)}
    out = []
    blank = arr["std"] < 2.0
    z_noise = robust_z(arr["noise"])
    z_sharp = robust_z(np.log(arr["sharpness"] + 1e-6))
    side = np.minimum(arr["height"], arr["width"])
    aspect = np.maximum(arr["height"], arr["width"]) / np.maximum(side, 1)
    colour_set = np.mean(arr["colour"] > 2.0) >= 0.9
    med_side = np.median(side)
    for k, i in enumerate(ok):
        if blank[k]:
            out.append((i, "blank", float(arr["std"][k]), "near-constant image (grey-level std below 2)"))
            continue
        if z_noise[k] > Z_FLAG and arr["noise"][k] > 0.5:
            out.append((i, "noise", float(arr["noise"][k]), "mostly pixel-level noise"))
        if arr["mean"][k] < 15:
            out.append((i, "dark", float(arr["mean"][k]), "mean grey level below 15"))
        if arr["mean"][k] > 240:
            out.append((i, "bright", float(arr["mean"][k]), "mean grey level above 240"))
        if z_sharp[k] < -Z_FLAG:
            out.append((i, "blurry", float(arr["sharpness"][k]), "far less detail than the folder's images"))
        if side[k] < 0.5 * med_side or side[k] < 8:
            out.append((i, "tiny", float(side[k]), f"{int(arr['width'][k])}x{int(arr['height'][k])} px"))
        if aspect[k] > 3.0:
            out.append((i, "aspect_ratio", float(aspect[k]), f"{int(arr['width'][k])}x{int(arr['height'][k])} px"))
        if colour_set and arr["colour"][k] <= 2.0:
            out.append((i, "grayscale", float(arr["colour"][k]), "grayscale in a colour set"))
    return out


__all__ = [
    "Z_FLAG",
    "AuditData",
    "audit_data",
    "find_duplicates",
    "finding_row",
    "labels_and_outliers",
    "quality_findings",
    "robust_z",
]
