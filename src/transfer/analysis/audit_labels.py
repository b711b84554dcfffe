"""Label issues of the audit, from probabilities no model fit the judged label to.

Confident learning (cleanlab) ranks an image as a likely label error when a model's probability
of its given label is low. That holds only if the model never fit that label: a network trained
on a wrong label has already moved the image to the wrong class, and every head on its features
agrees with the label (measured on scikit-learn digits, 5 % of the training images moved to a
wrong class, arc2 trained on them to 0.998 training accuracy: cross-validated heads on the
trained network's features found 2 % of the flips in the training split; see docs/audit.md).

So the probabilities come from *views* of the images that are out of sample for the rows they
judge, each projected on its :data:`VIEW_DIMS` principal axes (fit on every image, no label)
and through K heads cross-fitted on K-1 folds (:func:`cross_fit`):

* ``initial`` -- features of the run's trial at its initial weights (the pretrained or random
  weights every trial of that backbone started from: they never saw a label);
* ``backbone`` -- features of a chosen backbone, in an audit without a run;
* ``pixels`` -- the images' own 32x32 grey thumbnails (from the duplicate search);
* ``trained`` -- features of the trained trial: out of sample only for images the trial did not
  train on (its val / test split, or images outside its split);
* ``folds`` -- with a k-fold run (``transfer train --kfold K``), the softmax of the fine-tuned
  fold model that did not train on the image (the mean of all K for test images): K fine-tuned
  networks cross-fitted by the trainer itself, given as probabilities (no head is fit on them).

Images are judged in :class:`Group` s: the trial's training images (by ``initial`` and
``pixels``), the others (all views). In each group the probabilities are those of the view, or
of the mean of the views, with the smallest out-of-fold log loss on the group's given labels
(each view's head regularization chosen the same way) -- a choice made on the labels alone,
never on which labels are wrong. Then cleanlab: images ranked by self-confidence, and as many
flagged as cleanlab's calibrated count of off-diagonal entries of the confident joint
(``count.num_label_issues(..., "off_diagonal_calibrated")``, the cut-off cleanlab documents for
a ranking).

Classes with fewer images than ``folds`` cannot be cross-fitted: their images are not judged and
no image is suggested to be of them; the other classes are searched, and a note says so.

Example::

    res = find_label_issues({"initial": f0, "pixels": px, "trained": f1}, labels,
                            [Group("fit", fit_rows, ("initial", "pixels"), "training images"),
                             Group("held_out", other_rows, ("trained", "initial", "pixels"), "val/test")],
                            folds=5, class_names=names)
    res.issues[:3]      # [(row, 1 - self-confidence, suggested class, "fit"), ...]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .._lazy import require

#: inverse regularization strengths of the cross-fitted logistic regressions; each view keeps
#: the one with the smallest out-of-fold log loss on the judged group's labels
C_GRID = (0.01, 0.1, 1.0)
#: lbfgs steps of each logistic regression (standardized features, one BLAS thread)
LR_STEPS = 100
#: above this many rows, each view's C is chosen on a stratified sample of this many and only the
#: chosen ones are cross-fitted on every row (60,400 Fashion-MNIST images: 45 fits -> 15-20)
SELECT_ROWS = 10_000
#: dimensions a view keeps (its principal axes, fit on every image: no label involved): the
#: heads' cost grows with them (MobileNetV2's 1,280-d features, 3,000 images: 178 s for the
#: search at full width)
VIEW_DIMS = 64
#: what each view is, for notes and ``audit.json``
VIEW_TEXT = {
    "initial": "features of the trial's network at its initial weights",
    "backbone": "features of the backbone",
    "pixels": "the images' 32x32 grey pixels",
    "trained": "features of the trained trial",
    "folds": "softmax of the k-fold model that did not train on the image",
}


@dataclass(frozen=True)
class Group:
    """Rows judged together, by the views that are out of sample for them."""

    name: str
    rows: np.ndarray
    views: tuple[str, ...]
    what: str


@dataclass
class LabelIssues:
    """``issues``: (row, 1 - self-confidence, suggested class, group name), most likely first; ``record``:
    what was searched, with which probabilities (``audit.json``: ``label_issues``); ``notes``:
    sentences for the user."""

    issues: list = field(default_factory=list)
    record: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def principal(features: np.ndarray, dims: int = VIEW_DIMS, seed: int = 0) -> np.ndarray:
    """``features`` ``(n, d)`` as float32 ``(n, <= dims)``: their principal components (unchanged
    when ``d <= dims``)."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, np.float32).reshape(len(features), -1)
    k = int(min(dims, x.shape[0]))
    if x.shape[1] <= dims or k < 1:
        return x
    return PCA(k, svd_solver="randomized", random_state=seed).fit_transform(x).astype(np.float32)


def pixel_features(greys: np.ndarray, dims: int = VIEW_DIMS, seed: int = 0) -> np.ndarray:
    """The grey thumbnails ``(n, S, S)`` as ``(n, <= dims)`` float32: their principal components."""
    return principal(np.asarray(greys, np.float32).reshape(len(greys), -1), dims, seed)


def cross_fit(features: np.ndarray, labels: np.ndarray, folds: int, *, seed: int = 0,
              grid: Sequence[float] = C_GRID) -> dict[float, np.ndarray]:
    """Out-of-fold class probabilities ``{C: (n, classes)}`` of standardized logistic regressions:
    each row's from the head fit on the other ``folds - 1`` stratified folds (every class needs
    ``folds`` rows; ``labels`` are 0..classes-1, all present)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, np.float32)
    classes = int(labels.max()) + 1
    out = {c: np.zeros((len(x), classes), np.float64) for c in grid}
    # one BLAS thread: measured 10x faster than two on this small problem on a busy 2-core machine
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
            scaler = StandardScaler().fit(x[train])
            xt, xh = scaler.transform(x[train]), scaler.transform(x[held])
            # along the path of C, each fit from the last one's weights (measured 1.7x faster
            # for the three at 48,000 x 64)
            lr = LogisticRegression(max_iter=LR_STEPS, warm_start=True)
            for c in sorted(grid):
                lr.set_params(C=c).fit(xt, labels[train])
                out[c][np.ix_(held, lr.classes_)] = lr.predict_proba(xh)
    return out


def _rows_of(group: Group, at: np.ndarray) -> np.ndarray:
    """``group``'s rows among the searched ones (``at``: row -> index among them, -1 if not searched)."""
    mine = at[np.asarray(group.rows, np.int64)]
    return mine[mine >= 0]


def _grid(x: np.ndarray, y: np.ndarray, folds: int, groups: list[np.ndarray], seed: int) -> tuple:
    """The C values worth cross-fitting on every row: all of :data:`C_GRID` for up to
    :data:`SELECT_ROWS` rows, else those a stratified sample of that many chooses for some group."""
    if len(y) <= SELECT_ROWS:
        return C_GRID
    rng = np.random.default_rng(seed)
    share = SELECT_ROWS / len(y)
    sample = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(y == c), min(int((y == c).sum()), max(2 * folds, round(share * (y == c).sum()))),
                   replace=False) for c in np.unique(y)]))
    probs = cross_fit(x[sample], y[sample], folds, seed=seed)
    chosen = set()
    for mine in groups:
        pick = np.flatnonzero(np.isin(sample, mine))
        if len(pick):
            chosen.add(min(C_GRID, key=lambda c: _log_loss(probs[c][pick], y[sample][pick])))
    return tuple(sorted(chosen)) or C_GRID


def _log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-6, 1.0)
    return float(-np.log(p).mean())


def _choose(group: Group, fitted: dict[str, dict[float, np.ndarray]], y: np.ndarray):
    """The probabilities of ``group``'s rows: per view the C with the smallest log loss, then the
    view or the mean of the views with the smallest log loss. Returns (probs, source, losses)."""
    rows = group.rows
    best: dict[str, tuple[float, float, np.ndarray]] = {}
    for v in group.views:
        if v not in fitted:
            continue
        scored = [(_log_loss(p[rows], y[rows]), c, p[rows]) for c, p in fitted[v].items()]
        best[v] = min(scored, key=lambda t: t[0])
    candidates = {v: (loss, p) for v, (loss, _, p) in best.items()}
    if len(best) > 1:
        mean = np.mean([p for _, _, p in best.values()], axis=0)
        candidates["mean of " + ", ".join(best)] = (_log_loss(mean, y[rows]), mean)
    source = min(candidates, key=lambda k: candidates[k][0])
    losses = {k: round(v[0], 4) for k, v in candidates.items()}
    return candidates[source][1], source, losses, {v: c for v, (_, c, _) in best.items()}


def find_label_issues(views: dict[str, np.ndarray], labels: np.ndarray, groups: Sequence[Group], *, folds: int,
                      class_names: Sequence[str], probabilities: dict[str, np.ndarray] | None = None,
                      seed: int = 0) -> LabelIssues:
    """Label issues of ``labels`` (class indices into ``class_names``), judged group by group.

    Args:
        views: name -> features ``(n, d)`` (see the module docstring for the names).
        probabilities: name -> class probabilities ``(n, len(class_names))`` already out of sample
            for every row (``folds``), used as they are.
        labels: given class of each row.
        groups: the rows judged together and the views allowed for them (out of sample there).
        folds: K of the cross-fitting; classes with fewer rows are not searched (a note).
        class_names: names of the classes (for notes).

    Returns:
        :class:`LabelIssues`.
    """
    require("cleanlab", purpose="label issues (confident learning)")
    from cleanlab.count import num_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, np.int64)
    res = LabelIssues(record={"folds": int(folds), "groups": []})
    counts = np.bincount(labels, minlength=len(class_names))
    small = [c for c in range(len(class_names)) if 0 < counts[c] < folds]
    searched = [c for c in range(len(class_names)) if counts[c] >= folds]
    empty = [c for c in range(len(class_names)) if counts[c] == 0]
    if empty:
        res.notes.append("label issues: no readable image of class(es) "
                         + ", ".join(repr(class_names[c]) for c in empty) + "; no image is suggested to be of them")
    if small:
        res.notes.append(
            f"label issues: class(es) with fewer readable images than the {folds} folds of the cross-fitting: "
            + ", ".join(f"{class_names[c]!r} ({counts[c]})" for c in small)
            + " -- their images are not judged and no image is suggested to be of them; "
            + (f"the other {len(searched)} classes are searched" if len(searched) >= 2 else "nothing else is left"))
    res.record.update({"searched_classes": [class_names[c] for c in searched],
                       "not_searched_classes": [class_names[c] for c in small + empty]})
    if len(searched) < 2:
        res.notes.append("label issues: not searched (it needs two classes with at least "
                         f"{folds} readable images each)")
        res.record["searched"] = False
        return res
    res.record["searched"] = True
    keep = np.isin(labels, searched)
    rows = np.flatnonzero(keep)
    remap = np.full(len(class_names), -1, np.int64)
    remap[searched] = np.arange(len(searched))
    y = remap[labels[rows]]
    at = np.full(len(labels), -1, np.int64)
    at[rows] = np.arange(len(rows))
    needed = {v for g in groups for v in g.views if v in views}
    mine_of = {g.name: _rows_of(g, at) for g in groups}
    fitted = {}
    for v in sorted(needed):
        x = principal(views[v][rows], seed=seed)
        fitted[v] = cross_fit(x, y, folds, seed=seed, grid=_grid(x, y, folds, [mine_of[g.name] for g in groups
                                                                                if v in g.views], seed))
    for v, pr in (probabilities or {}).items():  # over the searched classes, each row summing to 1
        pr = np.asarray(pr, np.float64)[np.ix_(rows, searched)]
        fitted[v] = {None: pr / np.maximum(pr.sum(axis=1, keepdims=True), 1e-12)}
    for g in groups:
        mine = mine_of[g.name]
        rec = {"group": g.name, "what": g.what, "images": int(len(mine))}
        res.record["groups"].append(rec)
        present = np.unique(y[mine]) if len(mine) else np.zeros(0, np.int64)
        if len(present) < 2:
            rec["searched"] = False
            if len(mine):
                res.notes.append(f"label issues: {g.what} hold one searched class only; not judged")
            continue
        probs, source, losses, chosen_c = _choose(Group(g.name, mine, g.views, g.what), fitted, y)
        gy = y[mine]
        # the calibrated count is cleanlab's documented cut-off for a ranking; a class absent from
        # the group gets an unreachable threshold (no image is counted as of it)
        n_issues = int(num_label_issues(gy, probs, estimation_method="off_diagonal_calibrated"))
        quality = get_label_quality_scores(gy, probs, method="self_confidence")
        order = np.argsort(quality, kind="stable")[:n_issues]
        for k in order:
            res.issues.append((int(rows[mine[k]]), float(1.0 - quality[k]), int(searched[int(probs[k].argmax())]),
                               g.name))
        rec.update({"searched": True, "source": source, "views": {v: VIEW_TEXT.get(v, v) for v in g.views
                                                                   if v in fitted},
                    "log_loss": losses, "C": chosen_c, "issues": n_issues})
    res.issues.sort(key=lambda t: -t[1])
    return res


__all__ = ["Group", "LabelIssues", "find_label_issues", "cross_fit", "pixel_features", "principal"]
