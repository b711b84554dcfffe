"""Pooled features of a trained model, streamed to disk and cached per trial.

:func:`extract_features` runs the trial's ``model.keras`` over the images of the
train / val / test splits, batch by batch, and writes the output of the layer named
``features`` (and the model's own ``probs``) straight into preallocated ``.npy`` files
(``numpy.lib.format.open_memmap``). Only the few batches decoded ahead are ever in memory, so peak
memory does not grow with the number of images (a notebook that collects every batch's
features in a list runs out of RAM on a few thousand images).

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

Pixels come from :func:`transfer.data.stream.decode_batches` (decoding threads over
:func:`transfer.data.image.load_image`, the one pixel path). A file that cannot be decoded
is recorded in ``meta.json`` (``bad_files``) and skipped.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import itertools
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..data.stream import decode_batches
from ..errors import ConfigError, DataError, RunFolderError
from ..fsutil import atomic_path, read_json, sha256_file, write_json_atomic
from ..models.build import feature_model
from ..models.split import inference_function
from ..options import check_choices, check_int
from ..plots import figure, pyplot, save_figure
from ..progress import ProgressLike, as_progress
from ..runfolder import RunFolder, TrialInfo

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1
PLOT_METHODS = ("pca", "tsne")


# --------------------------------------------------------------------------- helpers


def open_run(run: "RunFolder | str | os.PathLike") -> RunFolder:
    """``run`` as a :class:`RunFolder` (opening a path checks that it is a run folder)."""
    return run if isinstance(run, RunFolder) else RunFolder(run)


def resolve_trials(run: RunFolder, trial: str) -> list[TrialInfo]:
    """``best`` | ``all`` | a name | comma-separated names -> finished trials (clear errors)."""
    if not isinstance(trial, str) or not trial.strip():
        raise ConfigError(f"the trial must be 'best', 'all' or a trial name (got {trial!r})", option="trial")
    return run.select(trial.strip())


def resolve_trial(run: RunFolder, trial: str) -> TrialInfo:
    """One finished trial (``best`` or a name); ``all`` is refused here."""
    if trial == "all" or (isinstance(trial, str) and "," in trial):
        raise ConfigError(f"one trial is needed here, got {trial!r}", hint="pass 'best' or one trial name",
                          option="trial")
    return resolve_trials(run, trial)[0]


def check_splits(splits: Iterable[str] | str, *, option: str = "splits") -> tuple[str, ...]:
    """Split names (``train``, ``val``, ``test``), order kept, duplicates dropped."""
    return tuple(check_choices(splits, SPLITS, "split", option=option))


def check_plot_methods(methods: Iterable[str] | str) -> list[str]:
    """Feature-plot methods (``pca``, ``tsne``)."""
    return check_choices(methods, PLOT_METHODS, "method", option="methods")


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


# --------------------------------------------------------------------------- extraction


@dataclass
class _Shapes:
    """What one row of the cache holds."""

    image_size: tuple[int, int]
    feature_dim: int
    num_classes: int


@dataclass
class _SplitResult:
    rows: int = 0
    bad_files: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _SplitArrays:
    """The four preallocated temp ``.npy`` files of one split, filled row block by row block."""

    def __init__(self, stack: contextlib.ExitStack, folder: Path, files: dict[str, Path], n: int, shapes: _Shapes):
        from numpy.lib.format import open_memmap

        self.files = files
        self.tmps = {k: stack.enter_context(_temp_npy(folder, p.name)) for k, p in files.items()}
        spec = {"features": (np.float32, (n, shapes.feature_dim)), "probs": (np.float32, (n, shapes.num_classes)),
                "labels": (np.int64, (n,)), "index": (np.int64, (n,))}
        self.arrays = {k: open_memmap(self.tmps[k], mode="w+", dtype=dt, shape=shape) for k, (dt, shape) in spec.items()}
        self.written = 0

    def add(self, **blocks: np.ndarray) -> None:
        m = len(blocks["labels"])
        for k, block in blocks.items():
            arr = self.arrays[k]
            arr[self.written:self.written + m] = np.asarray(block, dtype=arr.dtype).reshape((m,) + arr.shape[1:])
        self.written += m

    def publish(self) -> None:
        """Flush, close and rename the first ``written`` rows to the final names."""
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        for key, final in self.files.items():
            _publish(self.tmps[key], final, self.written)


class _TimedForward:
    """The feature model on a batch: ``(features, probs)``; the first call (graph tracing) is not timed.

    The model is traced once for any batch size (``models.split.inference_function``): the
    last batch of a split, or one that lost unreadable files, would otherwise trace it again.
    """

    def __init__(self, fm):
        self.fm = inference_function(fm)
        self.seconds = 0.0
        self._warm = False

    def __call__(self, x: np.ndarray):
        if not self._warm:
            self.fm(x)
            self._warm = True
        t0 = time.perf_counter()
        out = [np.asarray(a) for a in self.fm(x)]
        self.seconds += time.perf_counter() - t0
        return out


def _clear_stale(folder: Path, files: dict[str, Path]) -> None:
    """Leftovers of a killed extraction (one extraction per trial at a time)."""
    for final in files.values():
        for stale in folder.glob(f".{final.name}.*.tmp.npy"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _write_empty(files: dict[str, Path], shapes: _Shapes) -> None:
    """An empty split (e.g. no test images): empty arrays, nothing to stream."""
    empty = {"features": np.zeros((0, shapes.feature_dim), np.float32),
             "probs": np.zeros((0, shapes.num_classes), np.float32),
             "labels": np.zeros((0,), np.int64), "index": np.zeros((0,), np.int64)}
    for key, final in files.items():
        with atomic_path(final, suffix=".npy") as tmp:
            np.save(tmp, empty[key])


def _labelled_batches(csv_path: Path, root: Path, n: int, size: tuple[int, int], *, batch: int, workers: int,
                      recipe: dict | None):
    """``(PixelBatch, [(row, relative path, label)])`` for the first ``n`` rows of a split CSV,
    decoded with the run's pixel ``recipe``.

    The CSV is read lazily twice (paths for the decoding threads, labels here): not even the
    list of paths is held in memory.
    """
    paths = (root / rel for rel, _ in itertools.islice(_iter_split(csv_path), n))
    rows = enumerate(itertools.islice(_iter_split(csv_path), n))
    for pb in decode_batches(paths, size, batch=batch, workers=workers, recipe=recipe):
        yield pb, [(i, rel, lab) for i, (rel, lab) in itertools.islice(rows, len(pb.items))]


def _stream_split(forward: _TimedForward, arrays: _SplitArrays, batches, result: _SplitResult, bar) -> int:
    """Decoded batches -> features / probs rows; bad files recorded. Returns the CSV rows seen."""
    seen = 0
    for k, (pb, rows) in enumerate(batches, start=1):
        seen += len(rows)
        for item, (_, rel, _lab) in zip(pb.items, rows):
            if item.error is not None:
                result.bad_files.append({"path": rel, "reason": item.error})
        if pb.ok_index:
            f, p = forward(pb.x)
            ok = [rows[i] for i in pb.ok_index]
            arrays.add(features=f, probs=p, labels=np.array([lab for _, _, lab in ok], np.int64),
                       index=np.array([i for i, _, _ in ok], np.int64))
            del f, p
        if k % 50 == 0:
            gc.collect()  # cyclic garbage of the decoders / eager calls: keep the peak flat
        if result.bad_files:
            bar.set(f"{len(result.bad_files)} unreadable")
        bar.update(len(rows))
    return seen


def _extract_split(fm, run: RunFolder, split: str, folder: Path, shapes: _Shapes, *, batch_size: int, workers: int,
                   progress: ProgressLike, fold: int | None = None) -> _SplitResult:
    """Stream one split through the feature model into preallocated temp files; publish them."""
    p = as_progress(progress)
    csv_path = run.split_csv(split, fold=fold)  # a k-fold trial: its own fold's
    n = sum(1 for _ in _iter_split(csv_path))
    files = split_files(folder, split)
    _clear_stale(folder, files)
    if n == 0:
        _write_empty(files, shapes)
        return _SplitResult()
    result = _SplitResult()
    forward = _TimedForward(fm)
    with contextlib.ExitStack() as stack:
        arrays = _SplitArrays(stack, folder, files, n, shapes)
        batches = _labelled_batches(csv_path, run.data_root, n, shapes.image_size, batch=batch_size, workers=workers,
                                    recipe=run.recipe)
        with p.bar(n, f"features {split}", unit="images") as bar:
            seen = _stream_split(forward, arrays, batches, result, bar)
        if arrays.written == 0:
            first = result.bad_files[0] if result.bad_files else {"path": "?", "reason": "?"}
            raise DataError(
                f"none of the {n} images of the {split} split under {run.data_root} can be decoded "
                f"(first: {first['path']}: {first['reason']})",
                hint=f"the data folder recorded in {run.dataset_json} (root) must still hold the images",
            )
        if seen != n:
            raise RunFolderError(f"{csv_path} changed while features were extracted ({seen} rows, expected {n})",
                                 hint="run the command again")
        arrays.publish()
        result.rows, result.seconds = arrays.written, forward.seconds
    return result


def _new_meta(t: TrialInfo, shapes: _Shapes, model_sha: str, old: dict | None) -> dict:
    """``meta.json`` of the cache, keeping the entries of splits that are not re-extracted."""
    base = old or {}
    return {
        "version": CACHE_VERSION,
        "trial": t.name,
        "feature_dim": shapes.feature_dim,
        "num_classes": shapes.num_classes,
        "image_size": list(shapes.image_size),
        "model_sha256": model_sha,
        "layer": "features",
        "counts": dict(base.get("counts", {})),
        "bad_files": dict(base.get("bad_files", {})),
        "splits": dict(base.get("splits", {})),
        "created": _now(),
    }


def _record_split(meta: dict, split: str, res: _SplitResult, split_sha: str) -> None:
    meta["counts"][split] = res.rows
    meta["bad_files"][split] = res.bad_files
    meta["splits"][split] = {
        "split_sha256": split_sha,
        "rows": res.rows,
        "forward_seconds": res.seconds,
        "ms_per_image": 1000.0 * res.seconds / res.rows if res.rows else None,
        "created": _now(),
    }


def _drop_invalid(folder: Path, meta: dict, done: Sequence[str], model_sha: str) -> None:
    """Drop entries of splits whose files are not valid for this model any more."""
    for s in list(meta["splits"]):
        if s not in done and not _cache_ok(folder, meta, s, model_sha, meta["splits"][s].get("split_sha256")):
            for d in ("counts", "bad_files", "splits"):
                meta[d].pop(s, None)


def _load_feature_model(t: TrialInfo):
    """``(feature model, shapes)`` of a trial's model (imports TensorFlow)."""
    model = t.load_model()
    shapes = _Shapes(t.image_size, int(model.get_layer("features").output.shape[-1]), int(model.output.shape[-1]))
    return feature_model(model), shapes


def extract_features(
    run,
    trial: str = "best",
    splits: Sequence[str] = SPLITS,
    *,
    batch_size: int = 64,
    workers: int = 2,
    force: bool = False,
    progress: ProgressLike = None,
) -> dict[str, tuple[Path, Path]]:
    """Extract (or reuse) the pooled features of one trial for the given splits.

    Args:
        run: a run folder path or :class:`~transfer.runfolder.RunFolder`.
        trial: ``"best"`` or a finished trial's name.
        splits: any of ``train``, ``val``, ``test``.
        batch_size: images per forward pass.
        workers: image-decoding threads.
        force: recompute even when the cache matches.
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``; a bar
            per split while images are streamed.

    Returns:
        ``{split: (features .npy path, labels .npy path)}``.

    Raises:
        RunFolderError: missing / incomplete run, unknown or unfinished trial, missing split file.
        ConfigError: unknown split, bad batch size or workers.
        ModelError: the model cannot be loaded.

    Example::

        paths = extract_features("runs/digits", "best", ("train", "test"))
        X = np.load(paths["test"][0])        # (179, 1280)
    """
    p = as_progress(progress)
    run = open_run(run)
    splits = check_splits(splits)
    batch_size = check_int(batch_size, "batch size", option="batch_size")
    workers = check_int(workers, "workers", option="workers")
    t = resolve_trial(run, trial)
    folder = run.features_dir(t.name)
    model_sha = sha256_file(t.model_path)
    split_sha = {s: sha256_file(run.split_csv(s, fold=t.fold)) for s in splits}
    meta = _read_meta(folder)
    todo = [s for s in splits if force or not _cache_ok(folder, meta, s, model_sha, split_sha[s])]
    for s in splits:
        if s not in todo:
            p.say(f"features {t.name}/{s}: cached ({meta['counts'][s]} rows, model unchanged)")
    if todo:
        if not run.data_root.is_dir():
            raise RunFolderError(
                f"the data folder of this run is missing: {run.data_root} (root in {run.dataset_json})",
                hint="put the images back there, or edit 'root' in dataset.json to where they are now",
            )
        folder.mkdir(parents=True, exist_ok=True)
        if not meta or meta.get("model_sha256") != model_sha:
            meta = None  # a different model: nothing of the old cache is valid
        # no meta.json while files are being replaced: an interrupted run looks unfinished
        with contextlib.suppress(FileNotFoundError):
            (folder / "meta.json").unlink()
        fm, shapes = _load_feature_model(t)
        new = _new_meta(t, shapes, model_sha, meta)
        for s in todo:
            p.say(f"features {t.name}/{s}: extracting")
            res = _extract_split(fm, run, s, folder, shapes, batch_size=batch_size, workers=workers, progress=p,
                                 fold=t.fold)
            _record_split(new, s, res, split_sha[s])
            if res.bad_files:
                p.say(f"features {t.name}/{s}: {len(res.bad_files)} unreadable file(s) skipped (listed in meta.json)")
        _drop_invalid(folder, new, todo, model_sha)
        write_json_atomic(folder / "meta.json", new)
    return {s: (split_files(folder, s)["features"], split_files(folder, s)["labels"]) for s in splits}


def features_meta(run, trial: str) -> dict:
    """The ``meta.json`` of a trial's feature cache (extracting nothing).

    Raises:
        RunFolderError: no cache yet.
    """
    run = open_run(run)
    t = resolve_trial(run, trial)
    meta = _read_meta(run.features_dir(t.name))
    if meta is None:
        raise RunFolderError(f"no feature cache for trial {t.name!r} in {run.path}",
                             hint=f"run `transfer features {run.path} --trial {t.name}`")
    return meta


def load_split(run, trial: str, split: str, *, progress: ProgressLike = None) -> dict:
    """All cached arrays of one split (extracting them first if needed), memory-mapped.

    Returns:
        ``{"X", "y", "probs", "index", "paths", "meta", "trial"}``; ``paths`` are absolute
        image paths of the rows (bad files skipped).
    """
    run = open_run(run)
    t = resolve_trial(run, trial)
    extract_features(run, t.name, (split,), progress=progress)
    folder = run.features_dir(t.name)
    files = split_files(folder, split)
    arr = {k: np.load(p, mmap_mode="r") for k, p in files.items()}
    rows = run.split(split, fold=t.fold)
    root = run.data_root
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

    Example::

        X, y = load_features("runs/digits", "best", "train")
    """
    split = check_splits((split,), option="split")[0]
    d = load_split(run, trial, split)
    return d["X"], d["y"]


# --------------------------------------------------------------------------- plots


def _subsample(y: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def _project(X: np.ndarray, method: str) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``X`` and the name of the projection."""
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, X.shape[1], X.shape[0])
        Z = PCA(n_components=k, random_state=0).fit_transform(X)
        if Z.shape[1] < 2:
            Z = np.column_stack([Z, np.zeros(len(Z))])
        return Z, "PCA"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (len(X) - 1) / 3.0)))
    Z = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(X)
    return Z, f"t-SNE (perplexity {perplexity:.3g})"


def _scatter(Z: np.ndarray, y: np.ndarray, names: list[str], title: str, out: Path) -> None:
    cmap = pyplot("feature plots").get_cmap("tab10" if len(names) <= 10 else "tab20")
    with figure(figsize=(7, 6), purpose="feature plots") as (fig, ax):
        for c, name in enumerate(names):
            m = y == c
            if m.any():
                ax.scatter(Z[m, 0], Z[m, 1], s=12, alpha=0.8, color=cmap(c % cmap.N), label=f"{name} ({int(m.sum())})")
        ax.set_title(title)
        ax.set_xlabel("component 1")
        ax.set_ylabel("component 2")
        ax.legend(title="class", fontsize=8, loc="best", markerscale=1.5)
        fig.tight_layout()
        save_figure(fig, out)


def plot_features(run, trial: str = "best", method: str = "pca", split: str = "test", max_points: int = 2000,
                  *, progress: ProgressLike = None) -> Path:
    """2-D scatter of a split's features coloured by class (do the classes separate?).

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

    Example::

        plot_features("runs/digits", "best", "tsne")   # runs/digits/plots/<trial>/features_tsne.png
    """
    method = check_plot_methods([method])[0]
    max_points = check_int(max_points, "max_points", minimum=3, option="max_points")
    split = check_splits((split,), option="split")[0]
    run = open_run(run)
    d = load_split(run, trial, split, progress=progress)
    y_all = d["y"]
    if len(y_all) < 3:
        raise ConfigError(f"the {split} split of trial {d['trial']} has {len(y_all)} image(s); a plot needs at least 3",
                          hint="plot another split", option="split")
    idx = _subsample(y_all, max_points)
    y = y_all[idx]
    Z, projection = _project(np.asarray(d["X"][idx], dtype=np.float64), method)
    out = run.plots_dir(d["trial"]) / f"features_{method}.png"
    _scatter(Z, y, run.class_names, f"{d['trial']}: {split} features, {projection}, {len(y)} images", out)
    return out


__all__ = ["extract_features", "load_features", "load_split", "features_meta", "plot_features",
           "open_run", "resolve_trial", "resolve_trials", "check_splits", "check_plot_methods", "SPLITS"]
