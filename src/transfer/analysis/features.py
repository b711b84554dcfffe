"""Pooled features of a trained model, streamed to disk and cached per trial.

:func:`extract_features` runs the trial's ``model.keras`` over the images of the
train / val / test splits, batch by batch, and writes the output of the layer named
``features`` (and the model's own ``probs``) straight into preallocated ``.npy`` files
(``numpy.lib.format.open_memmap``). Only one or two batches are ever in memory, so peak
memory does not grow with the number of images (report A's notebook ran out of RAM
collecting them in a list).

Layout (``RUN/features/<trial>/``)::

    <split>.npy            float32 (n, D)   pooled features
    <split>_labels.npy     int64 (n,)       class index
    <split>_probs.npy      float32 (n, C)   the network's softmax on the same images
    <split>_index.npy      int64 (n,)       row of splits/<split>.csv each row comes from
    meta.json              {trial, feature_dim, model_sha256, counts, bad_files, created, ...}

Every file is written under a temporary name and renamed when complete; ``meta.json``
is removed before a re-extraction and written last, so a killed extraction never
leaves a cache that looks finished. The cache of a split is reused while ``meta.json``
records the SHA-256 of the current ``model.keras`` and of the split's CSV.

Pixels come from :func:`transfer.data.image.load_image` (the one pixel path). A file
that cannot be decoded is recorded in ``meta.json`` (``bad_files``) and skipped.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import itertools
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError, ImageDecodeError, RunFolderError
from ..fsutil import atomic_path, read_json, sha256_file, write_json_atomic
from ..runfolder import RunFolder, TrialInfo

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1
PLOT_METHODS = ("pca", "tsne")

Progress = Callable[[str], None] | None


# --------------------------------------------------------------------------- helpers


def open_run(run: "RunFolder | str | os.PathLike") -> RunFolder:
    """``run`` as a :class:`RunFolder` (opening a path checks that it is a run folder)."""
    return run if isinstance(run, RunFolder) else RunFolder(run)


def resolve_trials(run: RunFolder, trial: str) -> list[TrialInfo]:
    """``best`` | ``all`` | a name | comma-separated names -> finished trials (clear errors)."""
    if not isinstance(trial, str) or not trial.strip():
        raise ConfigError(f"--trial must be 'best', 'all' or a trial name (got {trial!r})")
    return run.select(trial.strip())


def resolve_trial(run: RunFolder, trial: str) -> TrialInfo:
    """One finished trial (``best`` or a name); ``all`` is refused here."""
    if trial == "all" or (isinstance(trial, str) and "," in trial):
        raise ConfigError(f"one trial is needed here, got {trial!r}", hint="pass 'best' or one trial name")
    return resolve_trials(run, trial)[0]


def _check_splits(splits: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s.strip()]
    out = []
    for s in splits:
        s = str(s).strip()
        if s not in SPLITS:
            raise ConfigError(f"unknown split {s!r}; accepted: {', '.join(SPLITS)}")
        if s not in out:
            out.append(s)
    if not out:
        raise ConfigError(f"no split given; accepted: {', '.join(SPLITS)}")
    return tuple(out)


def features_dir(run: RunFolder, trial_name: str) -> Path:
    return run.path / "features" / trial_name


def split_files(folder: Path, split: str) -> dict[str, Path]:
    """The four array files of ``split`` in a trial's features folder."""
    return {
        "features": folder / f"{split}.npy",
        "labels": folder / f"{split}_labels.npy",
        "probs": folder / f"{split}_probs.npy",
        "index": folder / f"{split}_index.npy",
    }


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _read_meta(folder: Path) -> dict | None:
    p = folder / "meta.json"
    if not p.is_file():
        return None
    try:
        meta = read_json(p)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == CACHE_VERSION else None


def _cache_ok(folder: Path, meta: dict | None, split: str, model_sha: str, split_sha: str) -> bool:
    if not meta or meta.get("model_sha256") != model_sha:
        return False
    info = (meta.get("splits") or {}).get(split)
    if not info or info.get("split_sha256") != split_sha:
        return False
    files = split_files(folder, split)
    if not all(p.is_file() for p in files.values()):
        return False
    try:
        x = np.load(files["features"], mmap_mode="r")
        y = np.load(files["labels"], mmap_mode="r")
    except (OSError, ValueError):
        return False
    n = meta.get("counts", {}).get(split)
    return x.shape == (n, meta.get("feature_dim")) and y.shape == (n,)


@contextlib.contextmanager
def _temp_npy(folder: Path, name: str):
    """A private temp path (dot-prefixed, ``.tmp.npy``) removed on exit whatever happens."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp.npy", dir=folder)
    os.close(fd)
    p = Path(tmp)
    try:
        yield p
    finally:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _publish(tmp: Path, final: Path, rows: int, chunk: int = 4096) -> None:
    """Move the first ``rows`` rows of the .npy ``tmp`` to ``final`` atomically, in chunks."""
    src = np.load(tmp, mmap_mode="r")
    if src.shape[0] == rows:
        del src
        os.replace(tmp, final)
        return
    from numpy.lib.format import open_memmap

    with atomic_path(final, suffix=".npy") as out:
        dst = open_memmap(out, mode="w+", dtype=src.dtype, shape=(rows,) + src.shape[1:])
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            dst[i:j] = src[i:j]
        dst.flush()
        del dst
    del src


def _iter_split(csv_path: Path) -> Iterator[tuple[str, int]]:
    """Rows (path relative to the data root, label) of a split CSV, read lazily."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                yield row["path"], int(row["label"])
            except (KeyError, TypeError, ValueError) as exc:
                raise RunFolderError(f"{csv_path}, line {line}: not a 'path,label' row ({exc})",
                                     hint="the run folder is damaged; re-run `transfer train` into a new folder") from exc


def _decode(path: Path, size: tuple[int, int]):
    from ..data.image import load_image

    try:
        return load_image(path, size), None
    except ImageDecodeError as exc:
        return None, exc.reason


# --------------------------------------------------------------------------- extraction


def _extract_split(fm, run: RunFolder, split: str, folder: Path, *, image_size, feature_dim: int,
                   num_classes: int, batch_size: int, pool: ThreadPoolExecutor, progress: Progress,
                   fold: int | None = None) -> dict:
    """Stream one split through the feature model into preallocated temp files; publish them."""
    from numpy.lib.format import open_memmap

    csv_path = run.split_csv(split, fold=fold)  # a k-fold trial: its own fold's
    root = run.data_root
    n = sum(1 for _ in _iter_split(csv_path))
    files = split_files(folder, split)
    for final in files.values():  # leftovers of a killed extraction (one extraction per trial at a time)
        for stale in folder.glob(f".{final.name}.*.tmp.npy"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    bad: list[dict] = []
    seconds = 0.0
    written = 0
    if n == 0:  # an empty split (e.g. --test 0): empty arrays, nothing to stream
        empty = {"features": np.zeros((0, feature_dim), np.float32), "probs": np.zeros((0, num_classes), np.float32),
                 "labels": np.zeros((0,), np.int64), "index": np.zeros((0,), np.int64)}
        for key, final in files.items():
            with atomic_path(final, suffix=".npy") as tmp:
                np.save(tmp, empty[key])
        return {"rows": 0, "bad_files": [], "seconds": 0.0}
    with contextlib.ExitStack() as stack:
        tmps = {k: stack.enter_context(_temp_npy(folder, p.name)) for k, p in files.items()}
        feats = open_memmap(tmps["features"], mode="w+", dtype=np.float32, shape=(n, feature_dim))
        probs = open_memmap(tmps["probs"], mode="w+", dtype=np.float32, shape=(n, num_classes))
        labels = open_memmap(tmps["labels"], mode="w+", dtype=np.int64, shape=(n,))
        index = open_memmap(tmps["index"], mode="w+", dtype=np.int64, shape=(n,))
        rows = _iter_split(csv_path)  # streamed: not even the list of paths is held in memory
        pos = 0

        def submit():
            nonlocal pos
            chunk = list(itertools.islice(rows, min(batch_size, n - pos)))
            futs = [(pos + k, rel, lab, pool.submit(_decode, root / rel, image_size))
                    for k, (rel, lab) in enumerate(chunk)]
            pos += len(chunk)
            return futs

        pending = submit()
        bi = 0
        warmed = False
        while pending:
            futures = pending
            pending = submit()  # decode the next batch while the model runs on this one
            imgs, keep, labs = [], [], []
            for i, rel, lab, fut in futures:
                img, reason = fut.result()
                if img is None:
                    bad.append({"path": rel, "reason": reason})
                    continue
                imgs.append(img)
                keep.append(i)
                labs.append(lab)
            if imgs:
                x = np.stack(imgs).astype(np.float32)
                if not warmed:
                    fm.predict_on_batch(x)  # warm-up (graph tracing) outside the timing
                    warmed = True
                t0 = time.perf_counter()
                f, p = fm.predict_on_batch(x)
                seconds += time.perf_counter() - t0
                m = len(keep)
                feats[written:written + m] = np.asarray(f, dtype=np.float32).reshape(m, feature_dim)
                probs[written:written + m] = np.asarray(p, dtype=np.float32)
                labels[written:written + m] = labs
                index[written:written + m] = keep
                written += m
                del x, f, p, imgs
            bi += 1
            if bi % 50 == 0:
                gc.collect()  # cyclic garbage of the decoders / eager calls: keep the peak flat
            _say(progress, f"  features {split}: {futures[-1][0] + 1}/{n} images")
        if written == 0:
            first = bad[0] if bad else {"path": "?", "reason": "?"}
            raise DataError(
                f"none of the {n} images of the {split} split under {root} can be decoded "
                f"(first: {first['path']}: {first['reason']})",
                hint=f"the data folder recorded in {run.path / 'dataset.json'} (root) must still hold the images",
            )
        if pos != n:
            raise RunFolderError(f"{csv_path} changed while features were extracted ({pos} rows, expected {n})",
                                 hint="run the command again")
        for arr in (feats, probs, labels, index):
            arr.flush()
        del feats, probs, labels, index
        for key, final in files.items():
            _publish(tmps[key], final, written)
    return {"rows": written, "bad_files": bad, "seconds": seconds}


def extract_features(
    run,
    trial: str = "best",
    splits: Sequence[str] = SPLITS,
    *,
    batch_size: int = 64,
    workers: int = 2,
    force: bool = False,
    progress: Progress = None,
) -> dict[str, tuple[Path, Path]]:
    """Extract (or reuse) the pooled features of one trial for the given splits.

    Args:
        run: a run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"`` or a finished trial's name.
        splits: any of ``train``, ``val``, ``test``.
        batch_size: images per forward pass.
        workers: image-decoding threads.
        force: recompute even when the cache matches.
        progress: called with one line of text per batch / per split.

    Returns:
        ``{split: (features .npy path, labels .npy path)}``.

    Raises:
        RunFolderError: missing / incomplete run, unknown or unfinished trial, missing split file.
        ConfigError: unknown split, bad batch size or workers.
        ModelError: the model cannot be loaded.

    Example:
        >>> paths = extract_features("runs/digits", "best", ("train", "test"))  # doctest: +SKIP
        >>> X = np.load(paths["test"][0]); X.shape
        (179, 1280)
    """
    rf = open_run(run)
    splits = _check_splits(splits)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1 (got {batch_size!r})")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1 (got {workers!r})")
    t = resolve_trial(rf, trial)
    folder = features_dir(rf, t.name)
    model_sha = sha256_file(t.model_path)
    split_sha = {s: sha256_file(rf.split_csv(s, fold=t.fold)) for s in splits}
    meta = _read_meta(folder)
    todo = [s for s in splits if force or not _cache_ok(folder, meta, s, model_sha, split_sha[s])]
    for s in splits:
        if s not in todo:
            _say(progress, f"features {t.name}/{s}: cached ({meta['counts'][s]} rows, model unchanged)")
    if todo:
        if not rf.data_root.is_dir():
            raise RunFolderError(
                f"the data folder of this run is missing: {rf.data_root} (root in {rf.path / 'dataset.json'})",
                hint="put the images back there, or edit 'root' in dataset.json to where they are now",
            )
        folder.mkdir(parents=True, exist_ok=True)
        if not meta or meta.get("model_sha256") != model_sha:
            meta = None  # a different model: nothing of the old cache is valid
        # no meta.json while files are being replaced: an interrupted run looks unfinished
        with contextlib.suppress(FileNotFoundError):
            (folder / "meta.json").unlink()
        model = t.load_model()
        from ..models.build import feature_model

        fm = feature_model(model)
        feature_dim = int(model.get_layer("features").output.shape[-1])
        num_classes = int(model.output.shape[-1])
        image_size = t.image_size
        base = meta or {}
        new = {
            "version": CACHE_VERSION,
            "trial": t.name,
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "image_size": list(image_size),
            "model_sha256": model_sha,
            "layer": "features",
            "counts": dict(base.get("counts", {})),
            "bad_files": dict(base.get("bad_files", {})),
            "splits": dict(base.get("splits", {})),
            "created": _now(),
        }
        with ThreadPoolExecutor(max_workers=int(workers)) as pool:
            for s in todo:
                _say(progress, f"features {t.name}/{s}: extracting")
                res = _extract_split(fm, rf, s, folder, image_size=image_size, feature_dim=feature_dim,
                                     num_classes=num_classes, batch_size=int(batch_size), pool=pool,
                                     progress=progress, fold=t.fold)
                new["counts"][s] = res["rows"]
                new["bad_files"][s] = res["bad_files"]
                new["splits"][s] = {
                    "split_sha256": split_sha[s],
                    "rows": res["rows"],
                    "forward_seconds": res["seconds"],
                    "ms_per_image": 1000.0 * res["seconds"] / res["rows"] if res["rows"] else None,
                    "created": _now(),
                }
                if res["bad_files"]:
                    _say(progress, f"features {t.name}/{s}: {len(res['bad_files'])} unreadable file(s) skipped "
                                   f"(listed in meta.json)")
        # drop entries of splits whose files are not valid for this model any more
        for s in list(new["splits"]):
            if s not in todo and not _cache_ok(folder, {**new, "splits": new["splits"]}, s, model_sha,
                                               new["splits"][s].get("split_sha256")):
                for d in ("counts", "bad_files", "splits"):
                    new[d].pop(s, None)
        write_json_atomic(folder / "meta.json", new)
    return {s: (split_files(folder, s)["features"], split_files(folder, s)["labels"]) for s in splits}


def features_meta(run, trial: str) -> dict:
    """The ``meta.json`` of a trial's feature cache (extracting nothing).

    Raises:
        RunFolderError: no cache yet.
    """
    rf = open_run(run)
    t = resolve_trial(rf, trial)
    meta = _read_meta(features_dir(rf, t.name))
    if meta is None:
        raise RunFolderError(f"no feature cache for trial {t.name!r} in {rf.path}",
                             hint=f"run `transfer features {rf.path} --trial {t.name}`")
    return meta


def load_split(run, trial: str, split: str, *, progress: Progress = None) -> dict:
    """All cached arrays of one split (extracting them first if needed), memory-mapped.

    Returns:
        ``{"X", "y", "probs", "index", "paths", "meta", "trial"}``; ``paths`` are absolute
        image paths of the rows (bad files skipped).
    """
    rf = open_run(run)
    t = resolve_trial(rf, trial)
    extract_features(rf, t.name, (split,), progress=progress)
    folder = features_dir(rf, t.name)
    files = split_files(folder, split)
    arr = {k: np.load(p, mmap_mode="r") for k, p in files.items()}
    rows = rf.split(split, fold=t.fold)
    root = rf.data_root
    paths = [root / rows[int(i)][0] for i in arr["index"]]
    return {"X": arr["features"], "y": np.asarray(arr["labels"]), "probs": arr["probs"],
            "index": np.asarray(arr["index"]), "paths": paths, "meta": _read_meta(folder), "trial": t.name}


def load_features(run, trial: str = "best", split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one split (from the cache; extracted first when missing).

    Args:
        run: run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"`` or a trial name.
        split: ``train`` | ``val`` | ``test``.

    Returns:
        ``(X, y)``: ``X`` float32 (n, D) memory-mapped read-only, ``y`` int64 (n,).

    Raises:
        RunFolderError / ConfigError: as :func:`extract_features`.

    Example:
        >>> X, y = load_features("runs/digits", "best", "train")  # doctest: +SKIP
    """
    split = _check_splits((split,))[0]
    d = load_split(run, trial, split)
    return d["X"], d["y"]


# --------------------------------------------------------------------------- plots


def _subsample(y: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def plot_features(run, trial: str = "best", method: str = "pca", split: str = "test", max_points: int = 2000,
                  *, progress: Progress = None) -> Path:
    """2-D scatter of a split's features coloured by class (report A, figure 4).

    Args:
        run: run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"`` or a trial name.
        method: ``"pca"`` or ``"tsne"``.
        split: which split's features.
        max_points: at most this many points (a seeded random subset).

    Returns:
        The PNG path ``RUN/plots/<trial>/features_<method>.png``.

    Raises:
        ConfigError: unknown method, bad max_points, or fewer than 3 images in the split.

    Example:
        >>> plot_features("runs/digits", "best", "tsne")  # doctest: +SKIP
        PosixPath('runs/digits/plots/mobilenet_v2-t100/features_tsne.png')
    """
    method = str(method).strip().lower()
    if method not in PLOT_METHODS:
        raise ConfigError(f"unknown plot method {method!r}; accepted: {', '.join(PLOT_METHODS)}")
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 3:
        raise ConfigError(f"max_points must be an integer >= 3 (got {max_points!r})")
    split = _check_splits((split,))[0]
    rf = open_run(run)
    d = load_split(rf, trial, split, progress=progress)
    y_all = d["y"]
    if len(y_all) < 3:
        raise ConfigError(f"the {split} split of trial {d['trial']} has {len(y_all)} image(s); a plot needs at least 3",
                          hint="pick another --split")
    idx = _subsample(y_all, int(max_points))
    X = np.asarray(d["X"][idx], dtype=np.float64)
    y = y_all[idx]
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, X.shape[1], X.shape[0])
        Z = PCA(n_components=k, random_state=0).fit_transform(X)
        if Z.shape[1] < 2:
            Z = np.column_stack([Z, np.zeros(len(Z))])
        title_extra = "PCA"
    else:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (len(X) - 1) / 3.0)))
        Z = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(X)
        title_extra = f"t-SNE (perplexity {perplexity:.3g})"

    from .._lazy import require

    matplotlib = require("matplotlib", purpose="feature plots")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = rf.class_names
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    try:
        for c, name in enumerate(names):
            m = y == c
            if m.any():
                ax.scatter(Z[m, 0], Z[m, 1], s=12, alpha=0.8, color=cmap(c % cmap.N), label=f"{name} ({int(m.sum())})")
        ax.set_title(f"{d['trial']}: {split} features, {title_extra}, {len(y)} images")
        ax.set_xlabel("component 1")
        ax.set_ylabel("component 2")
        ax.legend(title="class", fontsize=8, loc="best", markerscale=1.5)
        fig.tight_layout()
        out = rf.path / "plots" / d["trial"] / f"features_{method}.png"
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)
    return out


__all__ = ["extract_features", "load_features", "load_split", "features_meta", "plot_features",
           "open_run", "resolve_trial", "resolve_trials", "SPLITS"]
