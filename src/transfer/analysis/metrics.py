"""Classification metrics, one function each, shared by evaluation, the resolution study and heads.

The rule for averages, everywhere in the package: **macro** = the unweighted mean over *all*
classes of the run (``labels = 0..C-1``), a class absent from the split counting 0
(scikit-learn's ``precision_recall_fscore_support(..., labels=range(C), average="macro",
zero_division=0)``); **weighted** = the mean weighted by each class's number of images. So a
"macro F1" in ``evaluate``, ``resolution`` and the report is the same number for the same
predictions, and a class the split lacks pulls the macro average down instead of vanishing
from it.

The per-class *accuracy* of an evaluation is the share of that class's images predicted
correctly (the confusion matrix's diagonal over its row), i.e. the class's recall.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float | None:
    """Share of equal entries; ``None`` when there is nothing to score."""
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(yt == yp)) if len(yt) else None


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict:
    """Accuracy, per-class and averaged precision / recall / F1 (scikit-learn) and the confusion matrix.

    Args:
        y_true: int labels (n,).
        y_pred: int predictions (n,).
        class_names: names of classes 0..C-1 (classes absent from the split get support 0 and
            count 0 in the macro averages).

    Returns:
        ``{"accuracy", "images", "class_names", "per_class": [{class, accuracy, precision,
        recall, f1, support}], "macro": {...}, "weighted": {...}, "confusion": [[...]]}``
        (``accuracy`` is ``None`` for an empty split).

    Example::

        classification_metrics([0, 1], [0, 0], ["a", "b"])["accuracy"]   # 0.5
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    rows = []
    for c, name in enumerate(class_names):
        n = int(cm[c].sum())
        rows.append({"class": name, "accuracy": float(cm[c, c] / n) if n else 0.0, "precision": float(p[c]),
                     "recall": float(r[c]), "f1": float(f[c]), "support": int(s[c])})
    sup = np.array([row["support"] for row in rows], dtype=np.float64)
    accs = np.array([row["accuracy"] for row in rows])
    avgs = {}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        if avg == "macro":
            acc_avg = float(accs.mean()) if len(accs) else 0.0
        else:
            acc_avg = float((accs * sup).sum() / sup.sum()) if sup.sum() else 0.0
        avgs[avg] = {"accuracy": acc_avg, "precision": float(pa), "recall": float(ra), "f1": float(fa),
                     "support": int(sup.sum())}
    return {
        "accuracy": accuracy(y_true, y_pred),
        "images": int(len(y_true)),
        "class_names": list(class_names),
        "per_class": rows,
        "macro": avgs["macro"],
        "weighted": avgs["weighted"],
        "confusion": cm.astype(int).tolist(),
    }


__all__ = ["accuracy", "classification_metrics"]
