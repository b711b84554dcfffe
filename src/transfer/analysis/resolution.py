"""Robustness to input resolution: train once and test at smaller sizes (TOTV), or train and
test at each size (TVTV).

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
Macro averages follow :mod:`transfer.analysis.metrics` (every class of the run counts).

Example::

    res = resolution_study("runs/fashion", sizes=[32, 16, 8], mode="totv")
    print(res.table_md)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.image import resize_image
from ..data.stream import decode_batches
from ..errors import ConfigError, DataError, RunFolderError
from ..fsutil import atomic_path, read_json, write_json_atomic, write_text_atomic
from ..models.registry import get_backbone
from ..options import check_choices, check_list, positive_int
from ..plots import figure, save_figure
from ..progress import ProgressLike, as_progress
from ..runfolder import SPLITS, RunFolder, RunLayout
from ..tables import markdown, write_csv
from ..trainer.config import make_config
from ..trainer.sweep import run_sweep
from .metrics import classification_metrics

MODES = ("totv", "tvtv")
_SUMMARY_COLUMNS = ("size", "images", "accuracy", "macro_precision", "macro_recall", "macro_f1")
_PER_CLASS_COLUMNS = ("size", "class", "precision", "recall", "f1", "support")
_COMPARE_COLUMNS = ("size", "totv_accuracy", "tvtv_accuracy", "totv_macro_f1", "tvtv_macro_f1")


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
    """Image sides in pixels (a list, or one comma-separated string): positive ints, order kept,
    duplicates dropped.

    Example::

        parse_sizes([32, 16, 8])      # [32, 16, 8]
    """
    return check_list(value, "size in pixels", convert=positive_int, option="sizes", hint="for example 32,16,8")


def degrade(img: np.ndarray, size: int, target: tuple[int, int], *, recipe: dict | None) -> np.ndarray:
    """Reduce an RGB uint8 image to ``size x size`` and bring it back to ``target`` (H, W), both
    with the pixel ``recipe`` of the run.

    Example::

        degrade(np.zeros((32, 32, 3), np.uint8), 8, (32, 32), recipe=None).shape     # (32, 32, 3)
    """
    return resize_image(resize_image(img, (size, size), recipe=recipe), target, recipe=recipe)


def class_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> tuple[dict, list[dict]]:
    """Accuracy and macro precision / recall / F1 over every class, and per-class rows.

    The numbers are :func:`transfer.analysis.metrics.classification_metrics`'s, flattened
    into the columns of the study's tables.

    Example::

        s, rows = class_metrics([0, 1, 1], [0, 1, 0], ["a", "b"])
        round(s["accuracy"], 3), rows[1]["recall"]      # (0.667, 0.5)
    """
    m = classification_metrics(y_true, y_pred, class_names)
    summary = {"accuracy": m["accuracy"] if m["accuracy"] is not None else 0.0,
               "macro_precision": m["macro"]["precision"], "macro_recall": m["macro"]["recall"],
               "macro_f1": m["macro"]["f1"], "images": m["images"]}
    rows = [{k: r[k] for k in ("class", "precision", "recall", "f1", "support")} for r in m["per_class"]]
    return summary, rows


def _predict(model, paths: Sequence[Path], size: tuple[int, int], bar, *, recipe: dict | None,
             target: tuple[int, int] | None = None, batch: int = 64) -> tuple[np.ndarray, list[int]]:
    """Predicted classes of the images decoded at ``size`` (then resized to ``target``) with the
    run's pixel ``recipe``; the indices of files that could not be decoded are returned (skipped)."""

    preds: list[int] = []
    bad: list[int] = []
    start = 0
    for pb in decode_batches(paths, size, batch=batch, recipe=recipe):
        bad.extend(start + i for i, it in enumerate(pb.items) if it.error is not None)
        if pb.ok_index:
            x = pb.x
            if target is not None and tuple(target) != tuple(size):
                x = np.stack([resize_image(r.astype(np.uint8), target, recipe=recipe) for r in x]).astype(np.float32)
            preds.extend(int(v) for v in np.asarray(model(x, training=False)).argmax(axis=1))
        start += len(pb.items)
        bar.update(len(pb.items))
        if bad:
            bar.set(f"{len(bad)} unreadable")
    return np.asarray(preds, dtype=int), bad


def _test_at(model, paths, labels, size, p, desc: str, *, recipe: dict | None, target=None) -> tuple[list[int], np.ndarray]:
    """(labels of the readable test images, predictions) with a progress bar."""
    with p.bar(len(paths), desc, unit="images") as bar:
        pred, bad = _predict(model, paths, size, bar, recipe=recipe, target=target)
    skip = set(bad)
    y = [lab for i, lab in enumerate(labels) if i not in skip]
    if not y:
        raise DataError(f"none of the {len(paths)} test images can be decoded", hint="check the run's data folder")
    return y, pred


def _test_split(run: RunFolder) -> tuple[list[Path], list[int]]:
    paths, labels = run.split_paths("test")
    if not paths:
        raise RunFolderError(f"{run.path} has an empty test split; the resolution study needs test images",
                             hint="train again with a test fraction of 0.1 or more")
    return paths, labels


def _totv(run: RunFolder, t, sizes, p):
    model = t.load_model()
    h, w = t.image_size
    paths, labels = _test_split(run)
    out = []
    for k in sizes:
        p.say(f"totv: testing {t.name} ({h}x{w}) on {len(paths)} test images "
              f"{'reduced' if k < min(h, w) else 'resized'} to {k}x{k}")
        y, pred = _test_at(model, paths, labels, (k, k), p, f"totv {k}px", recipe=run.recipe, target=(h, w))
        out.append((k, y, pred))
    return out


def _tvtv_config(run: RunFolder, t, sizes) -> dict:
    """The run's configuration for one trial's backbone, trainable fraction and init (sizes checked)."""
    meta = t.meta
    spec = get_backbone(meta["backbone"])
    small = [k for k in sizes if k < spec.min_size]
    if small:
        raise ConfigError(
            f"tvtv trains {meta['backbone']} at each size, but {', '.join(map(str, small))} px is below its "
            f"minimum input size ({spec.min_size})",
            hint=f"use sizes >= {spec.min_size}, the totv mode, or study a run of a small CNN (arc2, arc3)",
            option="sizes",
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
    return cfg


def _copy_splits(run: RunFolder, sub: Path) -> None:
    """The very same split as the run (a sub-run that has them keeps its own copies)."""
    dst = RunLayout(sub)
    if all(dst.split_csv_path(s).is_file() for s in SPLITS):
        return
    for s in SPLITS:
        with atomic_path(dst.split_csv_path(s), suffix=".csv") as tmp:
            shutil.copyfile(run.split_csv(s), tmp)


def _train_at(cfg: dict, k: int, sub: Path, p):
    """Train (or resume) the run's configuration at ``k x k`` into ``sub``; the trained trial."""

    p.say(f"tvtv: training {cfg['backbones'][0]} at {k}x{k} into {sub}")
    res = run_sweep(make_config({**cfg, "image_size": k, "out": str(sub)}), progress=lambda s: p.say(f"  [{k}px] {s}"))
    if not res.trials or res.trials[0].get("state") != "done":
        err = next(iter(res.failed.values()), "unknown error")
        raise RunFolderError(f"tvtv training at {k}x{k} failed: {err}",
                             hint=f"see {sub}; re-run the same command to resume")
    return RunFolder(sub).trial(res.trials[0]["name"])


def tvtv_dir(run: RunLayout, size: int) -> Path:
    """The run folder of the model trained at ``size x size``."""
    return run.resolution_dir / "tvtv" / f"size{size}"


def _tvtv(run: RunFolder, t, sizes, p):
    cfg = _tvtv_config(run, t, sizes)
    paths, labels = run.split_paths("test")
    out = []
    for k in sizes:
        sub = tvtv_dir(run, k)
        _copy_splits(run, sub)
        model = _train_at(cfg, k, sub, p).load_model()
        p.say(f"tvtv: testing the {k}x{k} model on {len(paths)} test images")
        y, pred = _test_at(model, paths, labels, (k, k), p, f"tvtv {k}px", recipe=run.recipe)
        out.append((k, y, pred))
    return out


def _fixed(rows: list[dict], cols: Sequence[str]) -> list[list]:
    """Rows of ``cols`` with floats written with 4 decimals (the CSV files)."""
    return [[f"{r[c]:.4f}" if isinstance(r[c], float) else r[c] for c in cols] for r in rows]


def _md(mode, trial, summary, per_class, sizes, names) -> str:
    what = ("trained model tested on test images reduced to k x k and resized back to its input"
            if mode == "totv" else "a model trained and tested at k x k for each size")
    by = {(r["size"], r["class"]): r for r in per_class}

    def prf(r):
        return "-" if r is None else f"{r['precision']:.2f} / {r['recall']:.2f} / {r['f1']:.2f}"

    return "\n".join([
        f"# Resolution study ({mode.upper()}), trial {trial}", "", what, "",
        markdown(["size", "images", "accuracy", "macro precision", "macro recall", "macro F1"],
                 [[r[c] for c in _SUMMARY_COLUMNS] for r in summary], digits=3),
        "Per class (precision / recall = class accuracy / F1):", "",
        markdown(["class"] + [f"{k}px P / R / F1" for k in sizes], [[n] + [prf(by.get((k, n))) for k in sizes]
                                                                    for n in names], align="l" + "r" * len(sizes)),
    ])


def _chart(mode, trial, summary, per_class, names, path: Path) -> None:
    sizes = [r["size"] for r in summary]
    xs = np.arange(len(sizes))
    with figure(1, 2, figsize=(10, 3.8), purpose="resolution charts") as (fig, axes):
        ax = axes[0]
        for key, label in (("accuracy", "accuracy"), ("macro_precision", "macro precision"), ("macro_f1", "macro F1")):
            ax.plot(xs, [r[key] for r in summary], marker="o", label=label)
        _size_axis(ax, xs, sizes, "score", f"{mode.upper()} - {trial}")
        ax.legend(fontsize=8)
        ax = axes[1]
        shown = names[:12]
        for n in shown:
            ax.plot(xs, [next((r["recall"] for r in per_class if r["size"] == k and r["class"] == n), np.nan)
                         for k in sizes], marker=".", label=n)
        _size_axis(ax, xs, sizes, "per-class accuracy (recall)",
                   "per class" + (f" (first {len(shown)} of {len(names)})" if len(names) > len(shown) else ""))
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        save_figure(fig, path)


def _size_axis(ax, xs, sizes, ylabel: str, title: str) -> None:
    ax.set_xticks(xs, [f"{k}px" for k in sizes])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _write_mode(run: RunFolder, t, res: ResolutionResult, names: list[str]) -> None:
    """``<mode>.{csv,md,json,png}`` and ``<mode>_per_class.csv`` in ``RUN/resolution/``."""
    odir, mode = run.resolution_dir, res.mode
    write_csv(odir / f"{mode}.csv", _SUMMARY_COLUMNS, _fixed(res.summary, _SUMMARY_COLUMNS))
    write_csv(odir / f"{mode}_per_class.csv", _PER_CLASS_COLUMNS, _fixed(res.per_class, _PER_CLASS_COLUMNS))
    write_text_atomic(odir / f"{mode}.md", res.table_md)
    write_json_atomic(odir / f"{mode}.json", {"mode": mode, "trial": t.name, "input_size": list(t.image_size),
                                              "sizes": res.sizes, "summary": res.summary, "per_class": res.per_class})
    _chart(mode, t.name, res.summary, res.per_class, names, odir / f"{mode}.png")
    res.files += [odir / f"{mode}{ext}" for ext in (".csv", "_per_class.csv", ".md", ".json", ".png")]


def resolution_study(
    run_dir: str | os.PathLike,
    *,
    sizes: Sequence[int] | str = (32, 16, 8),
    mode: str = "totv",
    trial: str = "best",
    progress: ProgressLike = None,
) -> ResolutionResult:
    """Run the TOTV or TVTV study of a run's trial and write its tables and chart.

    Args:
        run_dir: the run folder.
        sizes: side lengths in pixels (a list, or one comma-separated string).
        mode: ``"totv"`` or ``"tvtv"`` (see the module docstring).
        trial: ``best`` or a trial name (TVTV copies its backbone, trainable fraction and init).
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``; a bar per
            size while the test images are predicted.

    Returns:
        A :class:`ResolutionResult` (rows and written files).

    Raises:
        RunFolderError: missing / incomplete run or trial, empty test split, failed training.
        ConfigError: bad mode or sizes; TVTV sizes below the backbone's minimum.

    Example::

        resolution_study("runs/fashion", sizes=[32, 16, 8], mode="tvtv")
    """
    p = as_progress(progress)
    try:
        mode = check_choices([mode], MODES, "resolution mode", option="mode")[0]
    except ConfigError as exc:
        raise ConfigError(exc.message + " (totv: train once, test at each size; tvtv: train and test at each size)",
                          option="mode") from None
    ks = parse_sizes(sizes)
    run = RunFolder(run_dir)
    t = run.trial(trial)
    names = run.class_names
    raw = _totv(run, t, ks, p) if mode == "totv" else _tvtv(run, t, ks, p)
    res = ResolutionResult(mode=mode, trial=t.name, sizes=ks)
    for k, y, pred in raw:
        s, rows = class_metrics(y, pred, names)
        res.summary.append({"size": k, **s})
        res.per_class.extend({"size": k, **r} for r in rows)
    res.table_md = _md(mode, t.name, res.summary, res.per_class, ks, names)
    _write_mode(run, t, res, names)
    res.files.extend(write_comparison(run.resolution_dir))
    return res


def _compare_chart(by: dict, sizes: list[int], path: Path) -> None:
    xs = np.arange(len(sizes))
    with figure(figsize=(6, 3.8), purpose="resolution charts") as (fig, ax):
        for m, style in (("totv", "o-"), ("tvtv", "s--")):
            ax.plot(xs, [by[m][k]["accuracy"] if k in by[m] else np.nan for k in sizes], style,
                    label=f"{m.upper()} accuracy")
        _size_axis(ax, xs, sizes, "test accuracy", "train once (TOTV) vs train at each size (TVTV)")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, path)


def write_comparison(odir: str | os.PathLike) -> list[Path]:
    """When both ``totv.json`` and ``tvtv.json`` exist: ``compare.{csv,md,png}`` side by side per size.

    Returns:
        The files written (empty when one mode is missing).

    Example::

        write_comparison("runs/fashion/resolution")   # [.../compare.csv, .../compare.md, .../compare.png]
    """
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
            row[f"{m}_accuracy"] = r["accuracy"] if r else None
            row[f"{m}_macro_f1"] = r["macro_f1"] if r else None
        rows.append(row)
    write_csv(odir / "compare.csv", _COMPARE_COLUMNS, _fixed(rows, _COMPARE_COLUMNS))
    title = f"# TOTV vs TVTV (TOTV trial {data['totv']['trial']}, TVTV trial {data['tvtv']['trial']})\n\n"
    write_text_atomic(odir / "compare.md", title + markdown(
        ["size", "TOTV accuracy", "TVTV accuracy", "TOTV macro F1", "TVTV macro F1"],
        [[r[c] for c in _COMPARE_COLUMNS] for r in rows], digits=3, align="rrrrr"))
    _compare_chart(by, sizes, odir / "compare.png")
    return [odir / "compare.csv", odir / "compare.md", odir / "compare.png"]


__all__ = ["resolution_study", "write_comparison", "parse_sizes", "degrade", "class_metrics", "tvtv_dir",
           "ResolutionResult", "MODES"]
