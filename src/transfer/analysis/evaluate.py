"""Per-class evaluation of a trial on one split (report E: table 9, figure 14).

Predictions are the network's softmax on the split's images, taken from the feature
cache (:func:`transfer.analysis.features.extract_features` stores them next to the
features), so evaluating costs no extra forward pass once features exist.

Outputs (``RUN/evaluate/<trial>/``, each written atomically)::

    metrics.json     accuracy, per-class accuracy / precision / recall / F1 / support,
                     macro and weighted averages, confusion matrix, class names
    per_class.csv    class,accuracy,precision,recall,f1,support (+ macro avg, weighted avg rows)
    per_class.md     the same as a Markdown table
    confusion.csv    rows = true class, columns = predicted class
    confusion.png    the confusion matrix with counts
    samples.png      N random images of the split, captioned predicted / true
    wrong.png        the most confidently wrong images (predicted, probability, true)

The per-class *accuracy* of report E is the share of that class's images predicted
correctly (the diagonal of the confusion matrix over its row), i.e. the class's recall.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..fsutil import atomic_path, write_json_atomic, write_text_atomic
from .features import _check_splits, load_split, open_run, resolve_trials

Progress = Callable[[str], None] | None


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, per-class and averaged precision / recall / F1 (scikit-learn) and the confusion matrix.

    Args:
        y_true: int labels (n,).
        y_pred: int predictions (n,).
        class_names: names of classes 0..C-1 (classes absent from the split get support 0).

    Returns:
        ``{"accuracy", "per_class": [{class, accuracy, precision, recall, f1, support}],
        "macro": {...}, "weighted": {...}, "confusion": [[...]], "class_names", "images"}``.

    Example:
        >>> classification_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b"])["accuracy"]
        0.5
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

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
    avgs = {}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        sup = np.array([row["support"] for row in rows], dtype=np.float64)
        accs = np.array([row["accuracy"] for row in rows])
        if avg == "macro":
            acc_avg = float(accs.mean()) if len(accs) else 0.0
        else:
            acc_avg = float((accs * sup).sum() / sup.sum()) if sup.sum() else 0.0
        avgs[avg] = {"accuracy": acc_avg, "precision": float(pa), "recall": float(ra), "f1": float(fa),
                     "support": int(sup.sum())}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else None,
        "images": int(len(y_true)),
        "class_names": list(class_names),
        "per_class": rows,
        "macro": avgs["macro"],
        "weighted": avgs["weighted"],
        "confusion": cm.astype(int).tolist(),
    }


def _per_class_tables(m: dict) -> tuple[str, str]:
    cols = ("accuracy", "precision", "recall", "f1")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("class",) + cols + ("support",))
    lines = ["| class | accuracy | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|---:|"]
    rows = list(m["per_class"]) + [{"class": "macro avg", **m["macro"]}, {"class": "weighted avg", **m["weighted"]}]
    for r in rows:
        w.writerow([r["class"]] + [f"{r[c]:.6f}" for c in cols] + [r["support"]])
        lines.append(f"| {r['class']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + f" | {r['support']} |")
    return buf.getvalue(), "\n".join(lines) + "\n"


def _confusion_csv(m: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true \\ predicted"] + m["class_names"])
    for name, row in zip(m["class_names"], m["confusion"]):
        w.writerow([name] + row)
    return buf.getvalue()


def _plt():
    from .._lazy import require

    matplotlib = require("matplotlib", purpose="evaluation plots")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path, *, title: str = "") -> Path:
    """Write a confusion-matrix PNG with the count in every cell."""
    plt = _plt()
    cm = np.asarray(cm)
    C = len(class_names)
    size = max(4.0, 0.6 * C + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(C), labels=class_names, rotation=45 if C > 6 else 0, ha="right" if C > 6 else "center")
        ax.set_yticks(range(C), labels=class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        hi = cm.max() if cm.size else 0
        for i in range(C):
            for j in range(C):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if hi and cm[i, j] > hi / 2 else "black")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_image_grid(paths: list[Path], captions: list[str], ok: list[bool], path: Path, *, image_size,
                    title: str = "", empty_text: str = "no images") -> Path:
    """Write a grid of images (pixels from load_image at ``image_size``) with coloured captions."""
    from ..data.image import load_image
    from ..errors import ImageDecodeError

    plt = _plt()
    n = len(paths)
    cols = min(8, max(1, int(np.ceil(np.sqrt(n))))) if n else 1
    rows = max(1, int(np.ceil(n / cols))) if n else 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows + 0.4), squeeze=False)
    try:
        for ax in axes.ravel():
            ax.axis("off")
        if not n:
            axes[0, 0].text(0.5, 0.5, empty_text, ha="center", va="center", fontsize=11)
        for k, (p, cap, good) in enumerate(zip(paths, captions, ok)):
            ax = axes[k // cols, k % cols]
            try:
                img = load_image(p, image_size)
            except ImageDecodeError:
                img = np.zeros(tuple(image_size) + (3,), np.uint8)
            ax.imshow(img, interpolation="nearest")
            ax.set_title(cap, fontsize=8, color="green" if good else "red")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def _evaluate_trial(rf, t, split: str, samples: int, seed: int, progress: Progress) -> dict:
    d = load_split(rf, t.name, split, progress=progress)
    names = rf.class_names
    y = np.asarray(d["y"])
    probs = np.asarray(d["probs"], dtype=np.float32)
    if len(y) == 0:
        raise ConfigError(f"the {split} split of trial {t.name} has no image to evaluate",
                          hint="pick another --split (train, val or test)")
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(len(y)), pred]
    m = classification_metrics(y, pred, names)
    out_dir = rf.path / "evaluate" / t.name
    out_dir.mkdir(parents=True, exist_ok=True)
    pc_csv, pc_md = _per_class_tables(m)
    write_text_atomic(out_dir / "per_class.csv", pc_csv)
    write_text_atomic(out_dir / "per_class.md",
                      f"# {t.name}: per-class metrics on the {split} split ({m['images']} images, "
                      f"accuracy {m['accuracy']:.4f})\n\n" + pc_md)
    write_text_atomic(out_dir / "confusion.csv", _confusion_csv(m))
    plot_confusion(np.array(m["confusion"]), names, out_dir / "confusion.png",
                   title=f"{t.name} - {split} (accuracy {m['accuracy']:.3f})")
    size = t.image_size
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(y), size=min(samples, len(y)), replace=False)) if samples else np.array([], int)
    plot_image_grid([d["paths"][i] for i in pick],
                    [f"pred {names[pred[i]]} ({conf[i]:.2f})\ntrue {names[y[i]]}" for i in pick],
                    [bool(pred[i] == y[i]) for i in pick], out_dir / "samples.png", image_size=size,
                    title=f"{t.name}: {len(pick)} random {split} images (green = right, red = wrong)")
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:max(samples, 0)]
    plot_image_grid([d["paths"][i] for i in wrong],
                    [f"pred {names[pred[i]]} ({conf[i]:.2f})\ntrue {names[y[i]]}" for i in wrong],
                    [False] * len(wrong), out_dir / "wrong.png", image_size=size,
                    title=f"{t.name}: most confidently wrong {split} images",
                    empty_text=f"no wrong predictions on the {split} split")
    result = {
        "trial": t.name, "split": split, **m,
        "samples": [{"path": str(d["paths"][i]), "true": int(y[i]), "pred": int(pred[i]), "prob": float(conf[i])}
                    for i in pick],
        "wrong": [{"path": str(d["paths"][i]), "true": int(y[i]), "pred": int(pred[i]), "prob": float(conf[i])}
                  for i in wrong],
        "bad_files": (d["meta"].get("bad_files") or {}).get(split, []),
        "outputs": {k: str(out_dir / k) for k in ("metrics.json", "per_class.csv", "per_class.md", "confusion.csv",
                                                  "confusion.png", "samples.png", "wrong.png")},
        "per_class_md": pc_md,
    }
    write_json_atomic(out_dir / "metrics.json", {k: v for k, v in result.items() if k != "per_class_md"})
    _say(progress, f"evaluate {t.name}/{split}: accuracy {m['accuracy']:.4f}, macro F1 {m['macro']['f1']:.4f} "
                   f"-> {out_dir}")
    return result


def evaluate(run, trial: str = "best", split: str = "test", *, samples: int = 16, seed: int = 0,
             progress: Progress = None) -> dict:
    """Per-class metrics, confusion matrix and image grids of trial(s) on one split.

    Args:
        run: run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"``, ``"all"`` or trial name(s).
        split: ``train`` | ``val`` | ``test``.
        samples: images in the random grid (and at most this many in the wrong grid).
        seed: seed of the random pick.
        progress: called with progress lines.

    Returns:
        ``{trial name: result}``; each result holds ``accuracy``, ``per_class``, ``macro``,
        ``weighted``, ``confusion``, ``samples``, ``wrong`` and ``outputs`` (file paths),
        as written to ``RUN/evaluate/<trial>/metrics.json``.

    Raises:
        RunFolderError: missing / incomplete run, unknown or unfinished trial.
        ConfigError: unknown split, bad ``samples``, empty split.

    Example:
        >>> res = evaluate("runs/digits", "best", "test")  # doctest: +SKIP
        >>> res["mobilenet_v2-t100"]["macro"]["f1"]        # doctest: +SKIP
        0.97
    """
    split = _check_splits((split,))[0]
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
        raise ConfigError(f"samples must be an integer >= 0 (got {samples!r})")
    rf = open_run(run)
    return {t.name: _evaluate_trial(rf, t, split, int(samples), int(seed), progress) for t in resolve_trials(rf, trial)}


__all__ = ["evaluate", "classification_metrics", "plot_confusion", "plot_image_grid"]
