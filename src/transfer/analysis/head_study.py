"""Classical scikit-learn heads on the cached pooled features of a trial (does a RandomForest,
an SVM or a logistic regression on the learned features match the network's own softmax?).

:func:`fit_heads` fits RandomForest / SVM / logistic regression (and k-NN) on the
train features of :func:`transfer.analysis.features.extract_features` and compares them
with the network's own softmax head on the same images, in one table
(``RUN/heads/<trial>/heads.csv`` and ``heads.md``: accuracy per split, fit seconds,
predict milliseconds per image).

The heads' kinds, parameters and saved files (a ``.pkl`` with a ``.json`` record holding its
SHA-256) are :mod:`transfer.classical_heads`; :func:`ensure_head` returns a verified head
of a trial or fits just that one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..classical_heads import (DEFAULT_HEADS, HEAD_DESCRIPTIONS, HEAD_KINDS, check_kinds, head_params,
                               make_estimator, save_head, sklearn_version, verify_head)
from ..errors import ConfigError, DataError
from ..fsutil import read_json, sha256_file, write_text_atomic
from ..progress import ProgressLike, as_progress
from ..tables import cell, markdown, write_csv
from .features import SPLITS, extract_features, load_split, open_run, resolve_trial, resolve_trials
from .metrics import accuracy


def _timed_accuracy(est, X, y) -> tuple[float | None, float | None]:
    """(accuracy, seconds of predict) on (X, y); None for an empty split."""
    if len(y) == 0:
        return None, None
    t0 = time.perf_counter()
    pred = est.predict(X)
    sec = time.perf_counter() - t0
    return accuracy(y, pred), sec


def _check_every_class(y: np.ndarray, class_names: list[str], trial: str) -> None:
    present = set(np.unique(y).tolist())
    missing = [class_names[c] for c in range(len(class_names)) if c not in present]
    if missing:
        raise DataError(
            f"the train split of trial {trial} has no image of class(es) {', '.join(missing)}; "
            "a head fitted on it could not predict them",
            hint="re-split the data so every class has training images",
        )


def _score(est, data: dict) -> tuple[dict[str, float | None], float | None]:
    """Accuracy per split and predict milliseconds per image (on test, else the first non-empty split)."""
    acc: dict[str, float | None] = {}
    timing: tuple[float, int] | None = None
    for s in SPLITS:
        X = np.asarray(data[s]["X"], dtype=np.float32)
        a, sec = _timed_accuracy(est, X, data[s]["y"])
        acc[s] = a
        if sec is not None and (s == "test" or timing is None):
            timing = (sec, len(X))
    return acc, (1000.0 * timing[0] / timing[1] if timing else None)


def _fit_one(kind: str, params: dict, data: dict, *, trial: str, class_names: list[str], model_sha: str,
             folder: Path, progress: ProgressLike) -> dict:
    p = as_progress(progress)
    hp = head_params(kind, params)
    est = make_estimator(kind, **hp)
    Xtr = np.asarray(data["train"]["X"], dtype=np.float32)
    ytr = data["train"]["y"]
    _check_every_class(ytr, class_names, trial)
    p.say(f"heads {trial}: fitting {kind} on {len(ytr)} x {Xtr.shape[1]} features")
    t0 = time.perf_counter()
    try:
        est.fit(Xtr, ytr)
    except ValueError as exc:
        raise ConfigError(f"{kind} head cannot be fitted with {hp}: {exc}", option="params") from exc
    fit_seconds = time.perf_counter() - t0
    acc, ms = _score(est, data)
    record = save_head(est, folder, {
        "kind": kind, "estimator": type(est).__name__, "description": HEAD_DESCRIPTIONS[kind],
        "sklearn": sklearn_version(), "feature_dim": int(Xtr.shape[1]),
        "classes": [int(c) for c in est.classes_], "class_names": list(class_names), "trial": trial,
        "params": hp, "model_sha256": model_sha, "accuracy": acc, "fit_seconds": fit_seconds,
        "predict_ms_per_image": ms, "train_images": int(len(ytr)),
    })
    p.say(f"heads {trial}: {kind} test accuracy {cell(acc['test'])} (fit {fit_seconds:.2f} s)")
    return record


def _load_data(run, trial: str, progress: ProgressLike) -> dict:
    extract_features(run, trial, SPLITS, progress=progress)
    return {s: load_split(run, trial, s) for s in SPLITS}


def _network_row(run, t, data: dict) -> dict:
    acc = {s: accuracy(data[s]["y"], np.argmax(np.asarray(data[s]["probs"]), axis=1)) for s in SPLITS}
    meta = data["test"]["meta"] or {}
    ms = None
    for s in ("test", "val", "train"):
        ms = ((meta.get("splits") or {}).get(s) or {}).get("ms_per_image")
        if ms is not None:
            break
    try:
        m = t.metrics
        fit_s = float(m["seconds_per_epoch"]) * int(m["epochs_run"]) if m.get("seconds_per_epoch") else None
    except (KeyError, TypeError, ValueError):
        fit_s = None
    return {"trial": t.name, "head": "network", "estimator": "softmax (Keras, trained end to end)",
            "train_accuracy": acc["train"], "val_accuracy": acc["val"], "test_accuracy": acc["test"],
            "fit_seconds": fit_s, "predict_ms_per_image": ms, "path": str(t.model_path)}


def _row(record: dict, path: Path) -> dict:
    acc = record.get("accuracy") or {}
    return {"trial": record["trial"], "head": record["kind"], "estimator": record.get("description", record["estimator"]),
            "train_accuracy": acc.get("train"), "val_accuracy": acc.get("val"), "test_accuracy": acc.get("test"),
            "fit_seconds": record.get("fit_seconds"), "predict_ms_per_image": record.get("predict_ms_per_image"),
            "path": str(path)}


TABLE_COLUMNS = ("head", "estimator", "train_accuracy", "val_accuracy", "test_accuracy", "fit_seconds",
                 "predict_ms_per_image")
_TABLE_HEADER = ("head", "estimator", "train acc", "val acc", "test acc", "fit s", "predict ms/img")


def render_table(rows: Sequence[dict]) -> str:
    """Markdown table of head rows: accuracy per split, fit seconds and predict milliseconds per image."""
    return markdown(_TABLE_HEADER, [
        [r["head"], r["estimator"], cell(r["train_accuracy"]), cell(r["val_accuracy"]), cell(r["test_accuracy"]),
         cell(r["fit_seconds"], 2), cell(r["predict_ms_per_image"], 3)] for r in rows], align="llrrrrr")


def _write_table(run, t, data: dict, folder: Path, model_sha: str) -> list[dict]:
    """Rebuild heads.csv / heads.md from the network row and every valid head record of the trial."""
    rows = [_network_row(run, t, data)]
    for kind in HEAD_KINDS:
        js = folder / f"{kind}.json"
        if not js.is_file() or not (folder / f"{kind}.pkl").is_file():
            continue
        try:
            rec = read_json(js)
        except (OSError, ValueError):
            continue
        if rec.get("model_sha256") != model_sha or "accuracy" not in rec:
            continue  # fitted on features of an older model
        rows.append(_row(rec, folder / f"{kind}.pkl"))
    write_csv(folder / "heads.csv", TABLE_COLUMNS,
              [[round(r[c], 6) if isinstance(r[c], float) else r[c] for c in TABLE_COLUMNS] for r in rows])
    md = (f"# Heads on the features of {t.name}\n\n" + render_table(rows) +
          "\nAccuracy on the run's train / val / test splits. `network` is the model's own softmax; "
          "its fit time is the training time and its predict time is the whole model's forward pass. "
          "The classical heads' predict time is on the cached features (add the network's forward pass "
          "for images).\n")
    write_text_atomic(folder / "heads.md", md)
    return rows


def fit_heads(
    run,
    trial: str = "best",
    heads: Sequence[str] | str = DEFAULT_HEADS,
    params: dict[str, dict] | None = None,
    progress: ProgressLike = None,
) -> list[dict]:
    """Fit classical heads on a trial's features and compare them with the network's head.

    Args:
        run: run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"``, ``"all"`` or trial name(s).
        heads: kinds from :data:`HEAD_KINDS` (a list, or one comma-separated string).
        params: per-kind overrides, e.g. ``{"rf": {"n_estimators": 500}, "svm": {"C": 10}}``.
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``.

    Returns:
        Table rows (dicts with ``trial``, ``head``, ``estimator``, ``train_accuracy``,
        ``val_accuracy``, ``test_accuracy``, ``fit_seconds``, ``predict_ms_per_image``,
        ``path``), the ``network`` row first for every trial.

    Raises:
        RunFolderError: missing / incomplete run, unknown or unfinished trial.
        ConfigError: unknown head or parameter.
        DataError: a class has no training image.

    Example::

        rows = fit_heads("runs/digits", "best", ["rf", "logreg"], {"rf": {"n_estimators": 100}})
        [r["head"] for r in rows]     # ['network', 'rf', 'logreg']
    """
    kinds = check_kinds(heads)
    params = dict(params or {})
    for k in params:
        if k not in HEAD_KINDS:
            raise ConfigError(f"parameters given for unknown head {k!r}; accepted: {', '.join(HEAD_KINDS)}",
                              option="params")
    for k in kinds:  # validate every option before any work
        head_params(k, params.get(k))
    run = open_run(run)
    out: list[dict] = []
    for t in resolve_trials(run, trial):
        data = _load_data(run, t.name, progress)
        model_sha = data["test"]["meta"]["model_sha256"]
        folder = run.heads_dir(t.name)
        folder.mkdir(parents=True, exist_ok=True)
        for k in kinds:
            _fit_one(k, params.get(k) or {}, data, trial=t.name, class_names=run.class_names, model_sha=model_sha,
                     folder=folder, progress=progress)
        rows = _write_table(run, t, data, folder, model_sha)
        # the table holds every valid head of the trial; return the network + the heads asked for
        out.extend(r for r in rows if r["head"] == "network" or r["head"] in kinds)
    return out


def ensure_head(run, trial: str, head: str, *, progress: ProgressLike = None) -> tuple[Path, dict]:
    """A verified saved head of a trial, fitting it (with default parameters) when absent or stale.

    An existing head is checked against its record (SHA-256) and refused when it was
    modified; it is re-fitted when it was fitted on the features of an older model or
    with another scikit-learn version.

    Args:
        run: run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"`` or a trial name.
        head: one kind of :data:`HEAD_KINDS`.

    Returns:
        ``(path of the .pkl, its JSON record)``.

    Raises:
        HeadIntegrityError: the saved head does not match its recorded SHA-256.
        RunFolderError / ConfigError / DataError: as :func:`fit_heads`.

    Example::

        pkl, meta = ensure_head("runs/digits", "best", "rf")
        meta["feature_dim"], meta["classes"]     # (1280, [0, 1, ..., 9])
    """
    kinds = check_kinds([head])
    if isinstance(head, str) and "," in head:
        raise ConfigError(f"one head is needed here, got {head!r}", option="head")
    kind = kinds[0]
    run = open_run(run)
    t = resolve_trial(run, trial)
    folder = run.heads_dir(t.name)
    pkl, js = folder / f"{kind}.pkl", folder / f"{kind}.json"
    model_sha = sha256_file(t.model_path)
    if pkl.is_file() and js.is_file():
        meta = verify_head(pkl)  # raises on tampering
        if meta.get("model_sha256") == model_sha and meta.get("sklearn") == sklearn_version():
            return pkl, meta
        as_progress(progress).say(f"heads {t.name}: saved {kind} head is stale (model or scikit-learn changed); "
                                  "re-fitting")
    data = _load_data(run, t.name, progress)
    folder.mkdir(parents=True, exist_ok=True)
    meta = _fit_one(kind, {}, data, trial=t.name, class_names=run.class_names,
                    model_sha=data["test"]["meta"]["model_sha256"], folder=folder, progress=progress)
    _write_table(run, t, data, folder, meta["model_sha256"])
    return pkl, meta


__all__ = ["fit_heads", "ensure_head", "render_table"]
