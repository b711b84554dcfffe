"""Per-class evaluation of a trial on one split: accuracy, precision, recall and F1 per class,
the confusion matrix, and grids of random and of the most confidently wrong images.

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

The numbers come from :func:`transfer.analysis.metrics.classification_metrics` (its module
says how macro and weighted averages treat a class the split lacks). The per-class
*accuracy* is the share of that class's images predicted correctly (the diagonal of the
confusion matrix over its row), i.e. the class's recall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.stream import decode_batches
from ..errors import ConfigError
from ..fsutil import write_json_atomic, write_text_atomic
from ..options import check_int
from ..plots import figure, save_figure
from ..progress import ProgressLike, as_progress
from ..tables import markdown, write_csv
from .features import check_splits, load_split, open_run, resolve_trials
from .metrics import classification_metrics

#: the files an evaluation writes into ``RUN/evaluate/<trial>/``
OUTPUTS = ("metrics.json", "per_class.csv", "per_class.md", "confusion.csv", "confusion.png", "samples.png",
           "wrong.png")
_COLUMNS = ("accuracy", "precision", "recall", "f1")


def _per_class_rows(m: dict) -> list[dict]:
    return list(m["per_class"]) + [{"class": "macro avg", **m["macro"]}, {"class": "weighted avg", **m["weighted"]}]


def per_class_markdown(m: dict) -> str:
    """The per-class table of :func:`classification_metrics` (with the macro and weighted rows) in Markdown."""
    return markdown(["class", "accuracy", "precision", "recall", "F1", "support"],
                    [[r["class"]] + [r[c] for c in _COLUMNS] + [r["support"]] for r in _per_class_rows(m)],
                    align="lrrrrr")


def _write_tables(m: dict, out_dir: Path, title: str) -> str:
    """per_class.csv / .md and confusion.csv; returns the per-class Markdown table."""
    write_csv(out_dir / "per_class.csv", ("class",) + _COLUMNS + ("support",),
              [[r["class"]] + [f"{r[c]:.6f}" for c in _COLUMNS] + [r["support"]] for r in _per_class_rows(m)])
    md = per_class_markdown(m)
    write_text_atomic(out_dir / "per_class.md", f"# {title}\n\n" + md)
    write_csv(out_dir / "confusion.csv", ["true \\ predicted"] + m["class_names"],
              [[name] + row for name, row in zip(m["class_names"], m["confusion"])])
    return md


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path, *, title: str = "") -> Path:
    """Write a confusion-matrix PNG with the count in every cell."""
    cm = np.asarray(cm)
    C = len(class_names)
    size = max(4.0, 0.6 * C + 2.5)
    with figure(figsize=(size, size), purpose="evaluation plots") as (fig, ax):
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
        save_figure(fig, path)
    return path


def grid_pixels(paths: list[Path], image_size, *, recipe: dict | None) -> list[np.ndarray]:
    """Pixels of ``paths`` at ``image_size`` (the run's pixel ``recipe``: what the model saw) for a
    picture grid; an unreadable file is a black cell."""
    blank = np.zeros(tuple(image_size) + (3,), np.uint8)
    out = [blank] * len(paths)
    start = 0
    for pb in decode_batches(paths, tuple(image_size), batch=64, recipe=recipe):
        for row, i in enumerate(pb.ok_index):
            out[start + i] = pb.x[row].astype(np.uint8)
        start += len(pb.items)
    return out


def plot_image_grid(paths: list[Path], captions: list[str], ok: list[bool], path: Path, *, image_size,
                    recipe: dict | None, title: str = "", empty_text: str = "no images") -> Path:
    """Write a grid of images (decoded at ``image_size`` with the pixel ``recipe``) with green
    (right) or red (wrong) captions."""
    n = len(paths)
    cols = min(8, max(1, int(np.ceil(np.sqrt(n))))) if n else 1
    rows = max(1, int(np.ceil(n / cols))) if n else 1
    with figure(rows, cols, figsize=(1.9 * cols, 2.1 * rows + 0.4), squeeze=False,
                purpose="evaluation plots") as (fig, axes):
        for ax in axes.ravel():
            ax.axis("off")
        if not n:
            axes[0, 0].text(0.5, 0.5, empty_text, ha="center", va="center", fontsize=11)
        for k, (img, cap, good) in enumerate(zip(grid_pixels(paths, image_size, recipe=recipe), captions, ok)):
            ax = axes[k // cols, k % cols]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(cap, fontsize=8, color="green" if good else "red")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        save_figure(fig, path)
    return path


def _predictions(d: dict, split: str, trial: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predicted classes, confidence of the prediction) from the cached softmax."""
    y = np.asarray(d["y"])
    probs = np.asarray(d["probs"], dtype=np.float32)
    if len(y) == 0:
        raise ConfigError(f"the {split} split of trial {trial} has no image to evaluate",
                          hint="evaluate another split (train, val or test)", option="split")
    pred = probs.argmax(axis=1)
    return y, pred, probs[np.arange(len(y)), pred]


def _picture_rows(d: dict, idx, y, pred, conf) -> list[dict]:
    return [{"path": str(d["paths"][i]), "true": int(y[i]), "pred": int(pred[i]), "prob": float(conf[i])} for i in idx]


def _grids(d: dict, t, split: str, out_dir: Path, names: list[str], y, pred, conf, samples: int, seed: int,
           recipe: dict | None):
    """samples.png (random images) and wrong.png (most confidently wrong); returns both index lists."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(y), size=min(samples, len(y)), replace=False)) if samples else np.array([], int)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:max(samples, 0)]

    def caption(i):
        return f"pred {names[pred[i]]} ({conf[i]:.2f})\ntrue {names[y[i]]}"

    plot_image_grid([d["paths"][i] for i in pick], [caption(i) for i in pick], [bool(pred[i] == y[i]) for i in pick],
                    out_dir / "samples.png", image_size=t.image_size, recipe=recipe,
                    title=f"{t.name}: {len(pick)} random {split} images (green = right, red = wrong)")
    plot_image_grid([d["paths"][i] for i in wrong], [caption(i) for i in wrong], [False] * len(wrong),
                    out_dir / "wrong.png", image_size=t.image_size, recipe=recipe,
                    title=f"{t.name}: most confidently wrong {split} images",
                    empty_text=f"no wrong predictions on the {split} split")
    return pick, wrong


def _evaluate_trial(run, t, split: str, samples: int, seed: int, progress: ProgressLike) -> dict:
    d = load_split(run, t.name, split, progress=progress)
    names = run.class_names
    y, pred, conf = _predictions(d, split, t.name)
    m = classification_metrics(y, pred, names)
    out_dir = run.evaluate_dir(t.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    pc_md = _write_tables(m, out_dir, f"{t.name}: per-class metrics on the {split} split ({m['images']} images, "
                                      f"accuracy {m['accuracy']:.4f})")
    plot_confusion(np.array(m["confusion"]), names, out_dir / "confusion.png",
                   title=f"{t.name} - {split} (accuracy {m['accuracy']:.3f})")
    pick, wrong = _grids(d, t, split, out_dir, names, y, pred, conf, samples, seed, run.recipe)
    result = {
        "trial": t.name, "split": split, **m,
        "samples": _picture_rows(d, pick, y, pred, conf),
        "wrong": _picture_rows(d, wrong, y, pred, conf),
        "bad_files": (d["meta"].get("bad_files") or {}).get(split, []),
        "outputs": {k: str(out_dir / k) for k in OUTPUTS},
        "per_class_md": pc_md,
    }
    write_json_atomic(out_dir / "metrics.json", {k: v for k, v in result.items() if k != "per_class_md"})
    as_progress(progress).say(f"evaluate {t.name}/{split}: accuracy {m['accuracy']:.4f}, "
                              f"macro F1 {m['macro']['f1']:.4f} -> {out_dir}")
    return result


def evaluate(run, trial: str = "best", split: str = "test", *, samples: int = 16, seed: int = 0,
             progress: ProgressLike = None) -> dict:
    """Per-class metrics, confusion matrix and image grids of trial(s) on one split.

    Args:
        run: run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"``, ``"all"`` or trial name(s).
        split: ``train`` | ``val`` | ``test``.
        samples: images in the random grid (and at most this many in the wrong grid).
        seed: seed of the random pick.
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``; a bar
            over the trials (and the feature extraction's bars when features are missing).

    Returns:
        ``{trial name: result}``; each result holds ``accuracy``, ``per_class``, ``macro``,
        ``weighted``, ``confusion``, ``samples``, ``wrong`` and ``outputs`` (file paths),
        as written to ``RUN/evaluate/<trial>/metrics.json``.

    Raises:
        RunFolderError: missing / incomplete run, unknown or unfinished trial.
        ConfigError: unknown split, bad ``samples``, empty split.

    Example::

        res = evaluate("runs/digits", "best", "test")
        res["mobilenet_v2-t100"]["macro"]["f1"]      # 0.97
    """
    split = check_splits((split,), option="split")[0]
    samples = check_int(samples, "samples", minimum=0, option="samples")
    p = as_progress(progress)
    run = open_run(run)
    trials = resolve_trials(run, trial)
    out = {}
    with p.bar(len(trials), f"evaluate {split}", unit="trials") as bar:
        for t in trials:
            out[t.name] = _evaluate_trial(run, t, split, samples, int(seed), p)
            bar.update(1)
    return out


__all__ = ["evaluate", "classification_metrics", "per_class_markdown", "plot_confusion", "plot_image_grid",
           "grid_pixels", "OUTPUTS"]
