"""Robustness to input resolution (report E's study): TOTV and TVTV.

* **TOTV** (train once, test at every size): the trained model of a trial is tested on
  the test images reduced to ``k x k`` pixels and brought back to the model's input
  size (both steps with Pillow bilinear, as :func:`transfer.data.image.resize_image`).
* **TVTV** (train and test at every size): a model is trained at ``k x k`` with the
  run's own configuration (same backbone, trainable fraction, epochs, seed and the
  *same split files*) into ``RUN/resolution/tvtv/size<k>/`` by
  :func:`transfer.trainer.sweep.run_sweep` -- resumable: re-running skips finished
  sizes -- and tested at ``k x k``.

Output in ``RUN/resolution/``: ``<mode>.csv`` (per size: accuracy, macro precision /
recall / F1), ``<mode>_per_class.csv`` (per size and class: precision, recall = the
class's accuracy, F1, support), ``<mode>.md`` (both tables), ``<mode>.png`` (chart) and
``<mode>.json``; once both modes ran, ``compare.{csv,md,png}`` (TOTV vs TVTV per size).

Example:
    >>> res = resolution_study("runs/fashion", sizes=(32, 16, 8), mode="totv")  # doctest: +SKIP
    >>> print(res.table_md)                                                    # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError, RunFolderError
from ..fsutil import atomic_path, write_json_atomic, write_text_atomic

MODES = ("totv", "tvtv")


@dataclass
class ResolutionResult:
    """Rows of the study and the files written."""

    mode: str
    trial: str
    sizes: list[int]
    summary: list[dict] = field(default_factory=list)
    per_class: list[dict] = field(default_factory=list)
    table_md: str = ""
    files: list[Path] = field(default_factory=list)


def parse_sizes(value: str | Sequence[int]) -> list[int]:
    """``"32,16,8"`` or a list -> positive ints, order kept, duplicates dropped.

    Example:
        >>> parse_sizes("32, 16,8")
        [32, 16, 8]
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[int] = []
    for it in items:
        s = str(it).strip()
        if not s:
            continue
        try:
            k = int(s)
        except ValueError:
            raise ConfigError(f"--sizes: cannot read {s!r} as a size in pixels",
                              hint="for example --sizes 32,16,8") from None
        if k < 1:
            raise ConfigError(f"--sizes: {k} is not a positive size", hint="for example --sizes 32,16,8")
        if k not in out:
            out.append(k)
    if not out:
        raise ConfigError("--sizes is empty", hint="for example --sizes 32,16,8")
    return out


def degrade(img: np.ndarray, size: int, target: tuple[int, int]) -> np.ndarray:
    """Reduce an RGB uint8 image to ``size x size`` and bring it back to ``target`` (H, W).

    Example:
        >>> degrade(np.zeros((32, 32, 3), np.uint8), 8, (32, 32)).shape
        (32, 32, 3)
    """
    from ..data.image import resize_image

    return resize_image(resize_image(img, (size, size)), target)


def class_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> tuple[dict, list[dict]]:
    """Accuracy and macro precision / recall / F1, and per-class rows (scikit-learn, zero_division=0).

    Example:
        >>> s, rows = class_metrics([0, 1, 1], [0, 1, 0], ["a", "b"])
        >>> round(s["accuracy"], 3), rows[1]["recall"]
        (0.667, 0.5)
    """
    from sklearn.metrics import precision_recall_fscore_support

    yt, yp = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    present = s > 0
    summary = {
        "accuracy": float((yt == yp).mean()) if len(yt) else 0.0,
        "macro_precision": float(p[present].mean()) if present.any() else 0.0,
        "macro_recall": float(r[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f[present].mean()) if present.any() else 0.0,
        "images": int(len(yt)),
    }
    rows = [{"class": class_names[i], "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "support": int(s[i])} for i in labels]
    return summary, rows


def _predict(model, paths: Sequence[Path], make_pixels: Callable[[Path], np.ndarray], batch: int = 64,
             progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[int]]:
    """Predicted classes; indices of files that could not be decoded are returned (skipped)."""
    from ..errors import ImageDecodeError

    preds: list[int] = []
    bad: list[int] = []
    buf: list[np.ndarray] = []

    def flush():
        if buf:
            out = np.asarray(model(np.stack(buf).astype(np.float32), training=False))
            preds.extend(int(v) for v in out.argmax(axis=1))
            buf.clear()

    for i, p in enumerate(paths):
        try:
            buf.append(make_pixels(p))
        except ImageDecodeError:
            bad.append(i)
            continue
        if len(buf) >= batch:
            flush()
    flush()
    return np.asarray(preds, dtype=int), bad


def _totv(run, t, sizes, progress):
    from ..data.image import load_image

    model = t.load_model()
    h, w = t.image_size
    paths, labels = run.split_paths("test")
    if not paths:
        raise RunFolderError(f"{run.path} has an empty test split; the resolution study needs test images",
                             hint="train with --test 0.1 (or more)")
    out = []
    for k in sizes:
        progress(f"totv: testing {t.name} ({h}x{w}) on {len(paths)} test images {'reduced' if k < min(h, w) else 'resized'} to {k}x{k}")
        pred, bad = _predict(model, paths, lambda p, k=k: degrade(load_image(p), k, (h, w)))
        skip = set(bad)
        y = [lab for i, lab in enumerate(labels) if i not in skip]
        out.append((k, y, pred))
    return out


def _tvtv(run, t, sizes, progress):
    from ..data.image import load_image
    from ..models.registry import get_backbone
    from ..trainer.config import make_config
    from ..trainer.sweep import run_sweep

    meta = t.meta
    spec = get_backbone(meta["backbone"])
    small = [k for k in sizes if k < spec.min_size]
    if small:
        raise ConfigError(
            f"tvtv trains {meta['backbone']} at each size, but {', '.join(map(str, small))} px is below its "
            f"minimum input size ({spec.min_size})",
            hint=f"use sizes >= {spec.min_size}, use --mode totv, or study a run of a small CNN (arc2, arc3)",
        )
    cfg = dict(run.config())
    cfg.pop("out", None)
    cfg.update({
        "data": str(run.data_root), "backbones": [meta["backbone"]], "kfold": None,
        "trainable": [] if meta.get("init") == "random" else [float(meta.get("trainable", 0.0))],
        "random_init": meta.get("init") == "random",
    })
    if meta.get("init") not in ("random",) and meta.get("weights"):
        cfg["weights"] = meta["weights"]
    paths, labels = run.split_paths("test")
    out = []
    for k in sizes:
        sub = run.path / "resolution" / "tvtv" / f"size{k}"
        sdir = sub / "splits"
        if not all((sdir / f"{s}.csv").is_file() for s in ("train", "val", "test")):
            for s in ("train", "val", "test"):  # the very same split as the run
                with atomic_path(sdir / f"{s}.csv", suffix=".csv") as tmp:
                    shutil.copyfile(run.path / "splits" / f"{s}.csv", tmp)
        c = make_config({**cfg, "image_size": k, "out": str(sub)})
        progress(f"tvtv: training {meta['backbone']} at {k}x{k} into {sub}")
        res = run_sweep(c, progress=lambda s, k=k: progress(f"  [{k}px] {s}"))
        if not res.trials or res.trials[0].get("state") != "done":
            err = next(iter(res.failed.values()), "unknown error")
            raise RunFolderError(f"tvtv training at {k}x{k} failed: {err}",
                                 hint=f"see {sub}; re-run the same command to resume")
        from ..runfolder import RunFolder

        sub_trial = RunFolder(sub).trial(res.trials[0]["name"])
        model = sub_trial.load_model()
        progress(f"tvtv: testing the {k}x{k} model on {len(paths)} test images")
        pred, bad = _predict(model, paths, lambda p, k=k: load_image(p, (k, k)))
        skip = set(bad)
        y = [lab for i, lab in enumerate(labels) if i not in skip]
        out.append((k, y, pred))
    return out


def _csv(rows: list[dict], cols: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: (f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]) for c in cols})
    return buf.getvalue()


def _md(mode, trial, summary, per_class, sizes, names) -> str:
    lines = [f"# Resolution study ({mode.upper()}), trial {trial}", ""]
    what = ("trained model tested on test images reduced to k x k and resized back to its input"
            if mode == "totv" else "a model trained and tested at k x k for each size")
    lines += [what, "", "| size | images | accuracy | macro precision | macro recall | macro F1 |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['size']} | {r['images']} | {r['accuracy']:.3f} | {r['macro_precision']:.3f} | "
                     f"{r['macro_recall']:.3f} | {r['macro_f1']:.3f} |")
    lines += ["", "Per class (precision / recall = class accuracy / F1):", "",
              "| class | " + " | ".join(f"{k}px P / R / F1" for k in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    by = {(r["size"], r["class"]): r for r in per_class}
    for n in names:
        cells = []
        for k in sizes:
            r = by.get((k, n))
            cells.append("-" if r is None else f"{r['precision']:.2f} / {r['recall']:.2f} / {r['f1']:.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chart(mode, trial, summary, per_class, names, path: Path) -> None:
    from .._lazy import require

    matplotlib = require("matplotlib", purpose="resolution charts")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in summary]
    xs = np.arange(len(sizes))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    try:
        ax = axes[0]
        for key, label in (("accuracy", "accuracy"), ("macro_precision", "macro precision"), ("macro_f1", "macro F1")):
            ax.plot(xs, [r[key] for r in summary], marker="o", label=label)
        ax.set_xticks(xs, [f"{k}px" for k in sizes])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("score")
        ax.set_title(f"{mode.upper()} - {trial}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1]
        shown = names[:12]
        for n in shown:
            ax.plot(xs, [next((r["recall"] for r in per_class if r["size"] == k and r["class"] == n), np.nan)
                         for k in sizes], marker=".", label=n)
        ax.set_xticks(xs, [f"{k}px" for k in sizes])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("per-class accuracy (recall)")
        ax.set_title("per class" + (f" (first {len(shown)} of {len(names)})" if len(names) > len(shown) else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)


def resolution_study(
    run_dir: str | os.PathLike,
    *,
    sizes: Sequence[int] | str = (32, 16, 8),
    mode: str = "totv",
    trial: str = "best",
    progress: Callable[[str], None] = print,
) -> ResolutionResult:
    """Run the TOTV or TVTV study of a run's trial and write its tables and chart.

    Args:
        run_dir: the run folder.
        sizes: side lengths in pixels (``"32,16,8"`` or a list).
        mode: ``"totv"`` or ``"tvtv"`` (see the module docstring).
        trial: ``best`` or a trial name (TVTV copies its backbone, trainable fraction and init).
        progress: receives progress lines.

    Returns:
        A :class:`ResolutionResult` (rows and written files).

    Raises:
        RunFolderError: missing / incomplete run or trial, empty test split, failed training.
        ConfigError: bad mode or sizes; TVTV sizes below the backbone's minimum.

    Example:
        >>> resolution_study("runs/fashion", sizes="32,16,8", mode="tvtv")  # doctest: +SKIP
    """
    from ..runfolder import RunFolder

    mode = str(mode).lower()
    if mode not in MODES:
        raise ConfigError(f"unknown resolution mode {mode!r}; accepted: totv (train once, test at each size), "
                          f"tvtv (train and test at each size)")
    ks = parse_sizes(sizes)
    run = RunFolder(run_dir)
    t = run.trial(trial)
    names = run.class_names
    raw = _totv(run, t, ks, progress) if mode == "totv" else _tvtv(run, t, ks, progress)
    res = ResolutionResult(mode=mode, trial=t.name, sizes=ks)
    for k, y, pred in raw:
        s, rows = class_metrics(y, pred, names)
        res.summary.append({"size": k, **s})
        res.per_class.extend({"size": k, **r} for r in rows)
    odir = run.path / "resolution"
    res.table_md = _md(mode, t.name, res.summary, res.per_class, ks, names)
    files = {
        f"{mode}.csv": _csv(res.summary, ("size", "images", "accuracy", "macro_precision", "macro_recall", "macro_f1")),
        f"{mode}_per_class.csv": _csv(res.per_class, ("size", "class", "precision", "recall", "f1", "support")),
        f"{mode}.md": res.table_md,
    }
    for name, text in files.items():
        write_text_atomic(odir / name, text)
        res.files.append(odir / name)
    write_json_atomic(odir / f"{mode}.json", {"mode": mode, "trial": t.name, "input_size": list(t.image_size),
                                              "sizes": ks, "summary": res.summary, "per_class": res.per_class})
    res.files.append(odir / f"{mode}.json")
    _chart(mode, t.name, res.summary, res.per_class, names, odir / f"{mode}.png")
    res.files.append(odir / f"{mode}.png")
    res.files.extend(write_comparison(odir))
    return res


def write_comparison(odir: str | os.PathLike) -> list[Path]:
    """When both ``totv.json`` and ``tvtv.json`` exist: ``compare.{csv,md,png}`` side by side per size.

    Returns:
        The files written (empty when one mode is missing).

    Example:
        >>> write_comparison("runs/fashion/resolution")   # doctest: +SKIP
        [PosixPath('runs/fashion/resolution/compare.csv'), ...]
    """
    from ..fsutil import read_json

    odir = Path(odir)
    if not all((odir / f"{m}.json").is_file() for m in MODES):
        return []
    data = {m: read_json(odir / f"{m}.json") for m in MODES}
    by = {m: {int(r["size"]): r for r in data[m]["summary"]} for m in MODES}
    sizes = sorted(set(by["totv"]) | set(by["tvtv"]), reverse=True)
    rows = []
    for k in sizes:
        row: dict = {"size": k}
        for m in MODES:
            r = by[m].get(k)
            row[f"{m}_accuracy"] = r["accuracy"] if r else ""
            row[f"{m}_macro_f1"] = r["macro_f1"] if r else ""
        rows.append(row)
    cols = ("size", "totv_accuracy", "tvtv_accuracy", "totv_macro_f1", "tvtv_macro_f1")
    write_text_atomic(odir / "compare.csv", _csv(rows, cols))

    def f(v):
        return "-" if v == "" else f"{v:.3f}"

    md = [f"# TOTV vs TVTV (TOTV trial {data['totv']['trial']}, TVTV trial {data['tvtv']['trial']})", "",
          "| size | TOTV accuracy | TVTV accuracy | TOTV macro F1 | TVTV macro F1 |", "|---:|---:|---:|---:|---:|"]
    md += [f"| {r['size']} | {f(r['totv_accuracy'])} | {f(r['tvtv_accuracy'])} | {f(r['totv_macro_f1'])} | "
           f"{f(r['tvtv_macro_f1'])} |" for r in rows]
    write_text_atomic(odir / "compare.md", "\n".join(md) + "\n")

    from .._lazy import require

    matplotlib = require("matplotlib", purpose="resolution charts")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    xs = np.arange(len(sizes))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    try:
        for m, style in (("totv", "o-"), ("tvtv", "s--")):
            ys = [by[m][k]["accuracy"] if k in by[m] else np.nan for k in sizes]
            ax.plot(xs, ys, style, label=f"{m.upper()} accuracy")
        ax.set_xticks(xs, [f"{k}px" for k in sizes])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("test accuracy")
        ax.set_title("train once (TOTV) vs train at each size (TVTV)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(odir / "compare.png", suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)
    return [odir / "compare.csv", odir / "compare.md", odir / "compare.png"]
