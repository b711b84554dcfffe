"""The frozen-prefix cache: what the frozen part of a backbone outputs, computed once per image.

A trial that freezes the first layers of a backbone feeds every image through them in
every epoch, and they never change. The cache stores their output (the frontier of the
:class:`~transfer.models.split.Cut`) once per image list, and the trial trains only the
rest on it. Caches live under ``RUN/cache/<backbone>-<init>/<split>-<cut>-<key>/``:

* ``x0.npy``, ``x1.npy`` ...  one array per frontier tensor, ``(N, ...)``, ``.npy``
  format; training images in float16, validation / test images and pooled features in
  float32 (so per-epoch validation numbers are exactly the saved model's);
* ``labels.npy``  the label of each row;
* ``meta.json``   written last, inside a staging folder that is renamed into place: a
  folder without it, or a staging folder, is never read.

The folder name ends with a key: the SHA-256 of the format version, the backbone, its
initial weights (hashed from the arrays), the image size, the cut, the image list
(paths and labels), the augmented view and the dtype. Rows are read by file offset
(``os.pread``): the pages stay in the operating system's file cache, so the trainer's
own memory does not grow with the number of images. Any process may read a cache;
building one takes a lock on its backbone's folder, so concurrent trials (Ray workers)
wait for one another instead of building twice.

A trial whose whole backbone trains has no frozen part; without augmentation its images
are still decoded only once: the cache of :func:`~transfer.models.split.pixel_cut` holds
the decoded pixels (uint8, exactly what decoding gives), read the same way.

Deeper cuts are computed from a shallower one: one pass over the images computes every
cut of a sweep in order (each from the one before), and a cut added later starts from the
deepest cache it can. Before a cache is read its ``meta.json``, key, file sizes and a few
rows (recomputed from the images through the live prefix) are checked: a truncated,
half-written or other-weights cache is rebuilt with a note, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.batches import BatchSource, Sampling, read_ahead
from ..data.image import recipe_version
from ..errors import TransferError
from ..fsutil import file_stamp, json_sha256, write_json_atomic
from ..models.split import Cut, bridge_model, inference_function, prefix_model

CACHE_FORMAT = 1
#: bytes a cache build leaves free on its disk (environment ``TRANSFER_CACHE_MIN_FREE`` overrides)
MIN_FREE_BYTES = 256 * 2**20
#: relative tolerance of the spot check (float16 storage and a chain of cuts round a little)
SPOT_TOLERANCE = 0.02


class CacheSpaceError(TransferError):
    """Not enough disk space for the frozen-prefix cache."""


@dataclass(frozen=True)
class CacheRequest:
    """One cache: the frontier of ``cut`` over one image list, in one view.

    ``view`` is None for the images as they are, ``k`` for the k-th augmented view
    (the augmentation of epoch ``k``).
    """

    split: str
    samples: tuple
    cut: object  # transfer.models.split.Cut
    view: int | None
    dtype: str

    @property
    def row_floats(self) -> int:
        return self.cut.floats_per_image

    @property
    def nbytes(self) -> int:
        return len(self.samples) * self.row_floats * np.dtype(self.dtype).itemsize


@dataclass
class CacheContext:
    """What every cache of one backbone + initial weights shares (one trial's view of them)."""

    root: Path  # RUN/cache/<backbone>-<init>
    data_root: Path
    backbone: str
    init: str
    image_size: tuple[int, int]
    weights_sha256: str
    batch_size: int
    seed: int
    augment: tuple[str, ...]
    workers: int = 2
    say: Callable[[str], None] = print
    built_seconds: dict = field(default_factory=dict)
    recipe: dict | None = None  # the run's pixel recipe (None: the current one)

    def key(self, req: CacheRequest) -> str:
        ident = {
            "format": CACHE_FORMAT, "backbone": self.backbone, "init": self.init, "weights": self.weights_sha256,
            "image_size": list(self.image_size), "frontier": list(req.cut.frontier),
            "shapes": [list(s) for s in req.cut.shapes], "dtype": req.dtype, "view": req.view,
            "augment": list(self.augment) if req.view is not None else [],
            "seed": self.seed if req.view is not None else None,
            "samples": samples_sha256(req.samples),
            "recipe": recipe_version(self.recipe),
        }
        return json_sha256(ident)

    def folder(self, req: CacheRequest) -> Path:
        view = "" if req.view is None else f"-v{req.view}"
        return self.root / f"{req.split}{view}-{req.cut.label}-{self.key(req)[:16]}"


def samples_sha256(samples: Sequence) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.path}\t{int(s.label)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def weights_sha256(model) -> str:
    """SHA-256 over every weight array of ``model`` (names, shapes and bytes)."""
    h = hashlib.sha256()
    for layer in model.layers:
        for i, w in enumerate(layer.get_weights()):
            a = np.ascontiguousarray(w)
            h.update(f"{layer.name}/{i}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


# -- reading ------------------------------------------------------------------------------

class FeatureCache:
    """A complete, checked cache: rows of the frontier arrays by index."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.rows = int(meta["rows"])
        self.dtype = np.dtype(meta["dtype"])
        self.shapes = [tuple(s) for s in meta["shapes"]]
        self.labels = np.load(folder / "labels.npy")
        self._files = [folder / f"x{i}.npy" for i in range(len(self.shapes))]
        self._offsets = [int(o) for o in meta["data_offsets"]]

    @property
    def nbytes(self) -> int:
        return sum(self.rows * int(np.prod(s)) * self.dtype.itemsize for s in self.shapes)

    def read(self, rows: np.ndarray, dtype=np.float32) -> list[np.ndarray]:
        """The frontier arrays of ``rows`` (in that order), as ``dtype``."""
        rows = np.asarray(rows, dtype=np.int64)
        out = []
        for path, offset, shape in zip(self._files, self._offsets, self.shapes):
            row_bytes = int(np.prod(shape)) * self.dtype.itemsize
            buf = np.empty((len(rows), row_bytes), dtype=np.uint8)
            fd = os.open(path, os.O_RDONLY)
            try:
                order = np.argsort(rows, kind="stable")
                start = 0
                while start < len(order):  # coalesce runs of consecutive rows into one read
                    end = start + 1
                    while end < len(order) and rows[order[end]] == rows[order[end - 1]] + 1:
                        end += 1
                    first, n = int(rows[order[start]]), end - start
                    data = os.pread(fd, n * row_bytes, offset + first * row_bytes)
                    if len(data) != n * row_bytes:
                        raise CacheCorruptError(f"{path} is shorter than its meta.json says")
                    buf[order[start:end]] = np.frombuffer(data, dtype=np.uint8).reshape(n, row_bytes)
                    start = end
            finally:
                os.close(fd)
            out.append(buf.view(self.dtype).reshape((len(rows),) + tuple(shape)).astype(dtype, copy=False))
        return out


class CacheCorruptError(TransferError):
    """A cache file does not hold what its meta.json says (it is rebuilt)."""


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _check_files(folder: Path, meta: dict) -> str | None:
    """Why the files of a cache do not match its meta.json (None: they do)."""
    dtype = np.dtype(meta["dtype"])
    for i, shape in enumerate(meta["shapes"]):
        p = folder / f"x{i}.npy"
        want = int(meta["data_offsets"][i]) + int(meta["rows"]) * int(np.prod(shape)) * dtype.itemsize
        if not p.is_file():
            return f"{p.name} is missing"
        if p.stat().st_size != want:
            return f"{p.name} has {p.stat().st_size} bytes, not {want} (truncated or overwritten)"
    lab = folder / "labels.npy"
    try:
        labels = np.load(lab)
    except (OSError, ValueError) as exc:
        return f"labels.npy cannot be read ({exc})"
    if labels.shape != (int(meta["rows"]),):
        return "labels.npy does not have one label per row"
    return None


# -- building -------------------------------------------------------------------------------

class _Writer:
    """Appends rows to the ``.npy`` files of one cache in its staging folder."""

    def __init__(self, folder: Path, req: CacheRequest):
        self.folder, self.req = folder, req
        folder.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(req.dtype)
        n = len(req.samples)
        self.files, self.offsets = [], []
        for i, shape in enumerate(req.cut.shapes):
            f = open(folder / f"x{i}.npy", "wb")
            header = _npy_header(self.dtype, (n,) + tuple(shape))
            f.write(header)
            self.files.append(f)
            self.offsets.append(len(header))
        self.labels: list[np.ndarray] = []
        self.rows = 0

    def write(self, arrays: Sequence[np.ndarray], labels: np.ndarray) -> None:
        for f, a in zip(self.files, arrays):
            f.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.labels.append(np.asarray(labels, dtype=np.int64))
        self.rows += len(labels)

    def close(self) -> None:
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.save(self.folder / "labels.npy", np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64))


def _min_free() -> int:
    try:
        return int(os.environ.get("TRANSFER_CACHE_MIN_FREE", MIN_FREE_BYTES))
    except ValueError:
        return MIN_FREE_BYTES


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def check_disk_space(folder: Path, need: int) -> None:
    """Raise :class:`CacheSpaceError` when ``need`` bytes would leave less than the reserve free."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    reserve = _min_free()
    if need + reserve > free:
        raise CacheSpaceError(
            f"not enough disk space for the frozen-prefix cache in {folder}: it needs {_size(need)} "
            f"and {_size(free)} is free (keeping {_size(reserve)} in reserve)",
            hint="free space on that disk, or train without the cache (slower: every epoch runs the "
                 "frozen layers again)",
            option="cache",
        )


#: caches this process built or checked: folder -> (key, meta.json mtime); not re-checked while unchanged
_CHECKED: dict[str, tuple[str, int]] = {}


def _stamp(folder: Path):
    return file_stamp(folder / "meta.json")


class CacheBuilder:
    """Opens or builds the caches of one backbone + initial weights for one trial.

    Args:
        ctx: what the caches share.
        model: the contract model at its initial weights in the frozen part (the trial's
            model: only its prefix layers are run).
    """

    def __init__(self, ctx: CacheContext, model):
        self.ctx, self.model = ctx, model
        self._prefixes: dict = {}

    def _prefix(self, cut):
        """The model from the images to ``cut``'s frontier (None: the frontier is the image)."""
        if not cut.prefix:
            return None
        key = (cut.prefix, cut.frontier)
        if key not in self._prefixes:
            self._prefixes[key] = inference_function(prefix_model(self.model, cut))
        return self._prefixes[key]

    # -- checks ------------------------------------------------------------------
    def open(self, req: CacheRequest, *, note: bool = True) -> FeatureCache | None:
        """The cache of ``req`` when it exists and passes every check (None: build it).

        A broken one is never read; ``note`` says why (it is replaced when rebuilt).
        """
        folder = self.ctx.folder(req)
        meta_path = folder / "meta.json"
        if not folder.exists():
            return None
        why = None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta, why = None, "it has no complete meta.json (a build was cut short)"
        if meta is not None:
            why = self._meta_problem(req, meta) or _check_files(folder, meta)
        if why is None:
            cache = FeatureCache(folder, meta)
            key = self.ctx.key(req)
            if _CHECKED.get(str(folder)) != (key, _stamp(folder)):
                why = self._spot_check(req, cache)
            if why is None:
                _CHECKED[str(folder)] = (key, _stamp(folder))
                return cache
        if note:
            self.ctx.say(f"note: the frozen-prefix cache {folder.name} is not usable ({why}); it is rebuilt")
        return None

    def _meta_problem(self, req: CacheRequest, meta: dict) -> str | None:
        if meta.get("format") != CACHE_FORMAT:
            return f"format {meta.get('format')!r}, not {CACHE_FORMAT}"
        if meta.get("weights_sha256") != self.ctx.weights_sha256:
            return "it was made from other initial weights"
        if meta.get("key") != self.ctx.key(req):
            return "its key does not match this backbone, cut and image list"
        if int(meta.get("rows", -1)) != len(req.samples):
            return f"it has {meta.get('rows')} rows for {len(req.samples)} images"
        return None

    def _spot_check(self, req: CacheRequest, cache: FeatureCache) -> str | None:
        """Recompute the first and last rows from the images through the live prefix."""
        if not req.samples:
            return None
        src = self._source(req)
        batches = sorted({0, len(src) - 1})
        prefix = self._prefix(req.cut)
        for b in batches:
            batch = src.get(b)
            fresh = [batch.x] if prefix is None else _as_list(prefix(batch.x))
            rows = np.arange(b * src.batch_size, b * src.batch_size + len(batch.y))
            stored = cache.read(rows)
            if not np.array_equal(cache.labels[rows], batch.y):
                return "its labels are not those of the images"
            for a, f in zip(stored, fresh):
                if prefix is None and not np.array_equal(a, f):  # decoded pixels are stored exactly
                    return "its pixels are not those the images decode to"
                scale = float(np.max(np.abs(f))) or 1.0
                diff = float(np.max(np.abs(a - f)))
                if not np.isfinite(diff) or diff > SPOT_TOLERANCE * scale + 1e-3:
                    return f"its values differ from this model's frozen layers by {diff:.3g} (scale {scale:.3g})"
        return None

    def _source(self, req: CacheRequest):
        sampling = Sampling(shuffle=False, seed=self.ctx.seed,
                            augment=self.ctx.augment if req.view is not None else ())
        src = BatchSource(self.ctx.data_root, list(req.samples), self.ctx.batch_size, self.ctx.image_size,
                          sampling=sampling, recipe=self.ctx.recipe)
        if req.view is not None:
            src.set_epoch(req.view)
        return src

    # -- building ------------------------------------------------------------------
    def ensure(self, requests: Sequence[CacheRequest]) -> dict[CacheRequest, FeatureCache]:
        """Open every requested cache, building the missing ones (under the backbone's lock).

        Requests over the same image list and view are built in one pass over the images:
        the shallowest cut first, each deeper one from the one before it.
        """
        from filelock import FileLock

        self.ctx.root.mkdir(parents=True, exist_ok=True)
        out = {r: c for r in requests if (c := self.open(r, note=False)) is not None}
        missing = [r for r in requests if r not in out]
        if not missing:
            return out
        with FileLock(str(self.ctx.root / ".lock")):
            for stale in self.ctx.root.glob("*.partial-*"):  # a build that was cut short
                shutil.rmtree(stale, ignore_errors=True)
            out.update({r: c for r in missing if (c := self.open(r)) is not None})
            missing = [r for r in missing if r not in out]
            if missing:
                check_disk_space(self.ctx.root, sum(r.nbytes for r in missing))
            groups: dict[tuple, list[CacheRequest]] = {}
            for r in missing:
                groups.setdefault((r.split, r.samples, r.view), []).append(r)
            for reqs in groups.values():
                out.update(self._build_chain(sorted(reqs, key=lambda r: r.cut.depth)))
        return out

    def _start(self, first: CacheRequest):
        """(source cache, its cut) to start a chain from: the deepest usable shallower cache, or None (images)."""
        best = None
        for folder in self.ctx.root.glob(f"{first.split}{'' if first.view is None else f'-v{first.view}'}-*"):
            try:
                meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            depth = int(meta.get("depth", 0))
            if depth >= first.cut.depth or not set(meta.get("prefix", [])) <= set(first.cut.prefix):
                continue
            if best is not None and depth <= best[0]:
                continue
            cut = Cut(tuple(meta["prefix"]), tuple(meta["frontier"]), tuple(tuple(s) for s in meta["shapes"]),
                      meta["cut"], int(meta.get("backbone_depth", 0)))
            req = CacheRequest(first.split, first.samples, cut, first.view, meta["dtype"])
            if self.ctx.folder(req) == folder and (cache := self.open(req, note=False)) is not None:
                best = (depth, cache, cut)
        return (best[1], best[2]) if best else (None, None)

    def _build_chain(self, reqs: list[CacheRequest]) -> dict[CacheRequest, FeatureCache]:
        """Build caches of one image list, shallow to deep, in one pass over the images (or a cache)."""
        source, source_cut = self._start(reqs[0])
        steps = self._plan_chain(reqs, source_cut)
        staging = {r: self.ctx.folder(r).with_name(f"{self.ctx.folder(r).name}.partial-{os.getpid()}") for r in reqs}
        writers = {r: _Writer(staging[r], r) for r in reqs}
        n, t0 = len(reqs[0].samples), time.perf_counter()
        self.ctx.say(f"  caching the frozen part ({', '.join(r.cut.label for r in reqs)}) of {n} {reqs[0].split} "
                     f"image(s) from {source.folder.name if source is not None else 'the images'}")
        seconds, failed = self._run_chain(steps, self._batches(reqs[0], source), writers)
        result = {}
        for i, r in enumerate(reqs):
            built_from = (source.folder.name if source is not None else "images") if i == 0 else \
                self.ctx.folder(reqs[i - 1]).name
            result[r] = self._commit(r, writers[r], staging[r], built_from=built_from, seconds=seconds[i],
                                     failed=failed if i == 0 else [])
        self.ctx.say(f"  cached {n} {reqs[0].split} image(s) in {time.perf_counter() - t0:.1f}s "
                     f"({', '.join(f'{r.cut.label}: {_size(result[r].nbytes)}' for r in reqs)})")
        return result

    def _plan_chain(self, reqs: list[CacheRequest], source_cut) -> list[_Step]:
        """One step per request: the model from the previous frontier (or the images) to its own."""
        steps, prev = [], source_cut
        for r in reqs:
            if prev is None:
                steps.append(_Step(r, self._prefix(r.cut), ("image",), tuple(r.cut.frontier)))
            else:
                model, names = bridge_model(self.model, prev, r.cut)
                steps.append(_Step(r, None if model is None else inference_function(model), tuple(prev.frontier),
                                   tuple(names)))
            prev = r.cut
        return steps

    @staticmethod
    def _run_chain(steps: list[_Step], batches, writers: dict) -> tuple[list[float], list]:
        """Feed every batch through the steps, writing each request's frontier; (seconds per step, failed files)."""
        seconds, failed = [0.0] * len(steps), []
        for named, labels, decode_s, more_failed in batches:
            failed += more_failed
            seconds[0] += decode_s
            for i, step in enumerate(steps):
                t = time.perf_counter()
                if step.model is not None:
                    named.update(zip(step.computes, _as_list(step.model(*[named[k] for k in step.inputs]))))
                writers[step.req].write([named[k] for k in step.req.cut.frontier], labels)
                seconds[i] += time.perf_counter() - t
        return seconds, failed

    def _commit(self, r: CacheRequest, writer: _Writer, staging: Path, *, built_from: str, seconds: float,
                failed: list) -> FeatureCache:
        """meta.json last, then the staging folder is renamed into place."""
        writer.close()
        meta = {"format": CACHE_FORMAT, "key": self.ctx.key(r), "backbone": self.ctx.backbone,
                "init": self.ctx.init, "weights_sha256": self.ctx.weights_sha256, "split": r.split,
                "view": r.view, "cut": r.cut.label, "depth": r.cut.depth, "backbone_depth": r.cut.backbone_depth,
                "prefix": list(r.cut.prefix), "frontier": list(r.cut.frontier),
                "shapes": [list(s) for s in r.cut.shapes], "dtype": r.dtype, "rows": writer.rows,
                "data_offsets": writer.offsets, "image_size": list(self.ctx.image_size), "built_from": built_from,
                "seconds": round(seconds, 3), "bad_files": [[f.path, f.reason] for f in failed]}
        write_json_atomic(staging / "meta.json", meta)
        final = self.ctx.folder(r)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _CHECKED[str(final)] = (meta["key"], _stamp(final))
        return FeatureCache(final, meta)

    def _batches(self, first: CacheRequest, source: FeatureCache | None):
        """({frontier name: array}, labels, decode seconds, failed files) of consecutive rows, from a
        cache or from the images (decoded ahead by the decode threads)."""
        if source is not None:
            bs = self.ctx.batch_size
            for start in range(0, source.rows, bs):
                rows = np.arange(start, min(source.rows, start + bs))
                yield dict(zip(source.meta["frontier"], source.read(rows))), source.labels[rows], 0.0, []
            return
        src = self._source(first)
        ahead = max(1, int(self.ctx.workers))
        batches = read_ahead(src.get, len(src), workers=ahead, ahead=ahead + 1)
        for _ in range(len(src)):
            t = time.perf_counter()
            b = next(batches)  # the seconds waited for it are the decoding the model did not hide
            yield {"image": b.x}, b.y, time.perf_counter() - t, list(b.failed)


@dataclass(frozen=True)
class _Step:
    req: CacheRequest
    model: object  # the traced step (models.split.inference_function) or None (the frontier is already known)
    inputs: tuple[str, ...]
    computes: tuple[str, ...]


def _as_list(x) -> list[np.ndarray]:
    return [np.asarray(a) for a in x] if isinstance(x, (list, tuple)) else [np.asarray(x)]
