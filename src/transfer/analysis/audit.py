"""Audit an image folder before training: duplicates, train/test leakage, label errors,
outliers and image quality, tied to the split a run uses.

One streamed pass reads every image once (bounded memory: a chunk of images at a time, in
threads one chunk ahead of the model): each file is decoded once and everything kept comes from
those pixels -- a :class:`~transfer.data.fingerprint.Fingerprint` (exact-pixel hash, perceptual hash,
thumbnails), a few quality numbers (batched per image size) and the model input, made exactly as
the model's own loader makes it (:func:`transfer.data.image.load_image` with the run's recorded
pixel recipe; checked on the first images). The model input goes through the pooled features of
a trained trial's model or of a chosen backbone (memory-mapped ``features.npy``) and, with a run,
of the same trial's network at its initial weights (``initial_features.npy``). The models run in
ONNX Runtime, converted by a child process that alone imports TensorFlow and checked against
Keras on the first images (:class:`_Engine`, :mod:`transfer.analysis.audit_model`). The SHA-256
of every file is taken before, to tell whether an earlier audit still holds. Then:

* **duplicates** -- exact (same decoded pixels) and near (:func:`transfer.data.near_search.near_pairs_arrays`),
  verified pair by pair and grouped into chains (:func:`transfer.data.dedupe.components`); a
  group is *within a class*, *across classes* (conflicting labels) and, when the images belong
  to a run's splits (or the folder's own ``train/val/test``), *across splits* (leakage). Each
  group also carries the cosine of its features.
* **label issues** -- confident learning (cleanlab) on probabilities that no model fit the
  judged label to: heads cross-fitted on the initial weights' features and the pixels for the
  images the trial trained on, and on the trained features too for the others
  (:mod:`transfer.analysis.audit_labels`), ranked by self-confidence, with the suggested label.
* **outliers** -- mean cosine distance to the nearest neighbours in feature space
  (:func:`transfer.data.nearest.nearest`), flagged far above the folder's own spread.
* **quality** -- near-constant (blank), very dark or bright, noise, blurry, tiny or extreme
  aspect ratio, grayscale in a colour set.

Outputs (``OUT/``): ``audit.csv`` (path, kind, score, group, label, suggested label, split),
``audit.json`` (summary, class balance, groups), ``audit.html`` (thumbnails per finding),
``files.csv`` (path, SHA-256 of every audited file), ``features.npy`` and (with a run)
``initial_features.npy``. A later audit with
the same ``OUT`` reuses the result only when every file's SHA-256 and the feature source
are unchanged; otherwise it says what changed and audits again.

Example::

    res = audit_folder("data/fashion", run="runs/fashion", out="runs/fashion/audit")
    res.summary["counts"]        # {"near_duplicate": 31, "label_issue": 402, ...}
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.dedupe import components
from ..data.fingerprint import THUMB, VERIFY, Fingerprints, fingerprint_array
from ..data.folder import index_folder
from ..data.image import DRAFT_MARGIN, load_image, recipe_version, resize_image
from ..data.near_search import NearStats, near_pairs_arrays
from ..data.nearest import nearest
from ..data.stream import decode_item
from ..errors import ConfigError, DataError, ImageDecodeError, RunFolderError
from ..fsutil import atomic_path, read_json, sha256_file, write_json_atomic
from ..models.onnx_convert import two_output_model
from ..models.registry import get_backbone
from ..options import replace
from ..progress import ProgressLike, as_progress
from ..runtime.sessions import make_session
from ..tables import markdown, write_csv
from .audit_config import AuditConfig
from .audit_labels import Group, find_label_issues, pixel_features
from .audit_model import initial_weights_path, load_source_model
from .audit_page import KINDS, write_page
from .features import open_run, resolve_trial

AUDIT_VERSION = 3
CSV_COLUMNS = ("path", "kind", "score", "group", "label", "suggested_label", "split", "detail")
#: robust z-score (median / MAD) beyond which a quality number or an outlier score is flagged
Z_FLAG = 6.0


def audit_dir(run) -> Path:
    """Where an audit of a run's data goes by default (``RUN/audit``)."""
    return Path(run.path if hasattr(run, "path") else run) / "audit"


@dataclass
class AuditResult:
    out: Path
    summary: dict
    rows: list[dict] = field(default_factory=list)
    reused: bool = False

    @property
    def table(self) -> str:
        """Counts per kind as a Markdown table."""
        counts = self.summary["counts"]
        return markdown(["finding", "images"], [[k, counts.get(k, 0)] for k in KINDS if counts.get(k)] or
                        [["(nothing found)", 0]])


# --------------------------------------------------------------------------- the streamed pass


#: quality numbers per image, in this order (:func:`_quality_batch`)
QUALITY = ("mean", "std", "noise", "sharpness", "height", "width", "colour")
#: images with at most this many pixels have their quality computed in batches (cheaper per image)
_BATCH_QUALITY_PIXELS = 128 * 128


def _quality_batch(rgb: np.ndarray) -> np.ndarray:
    """Quality numbers (:data:`QUALITY`) of same-sized RGB uint8 images ``(n, H, W, 3)``: grey mean
    and std, pixel-level noise (detail finer than a 1-px blur over the std), sharpness (variance
    of the Laplacian of the blurred image over the variance), size and colourfulness."""
    from scipy import ndimage

    x = rgb.astype(np.float32)
    # = x.mean(axis=3) bit for bit (the same sum, in the same order), 10x faster than numpy's
    # reduction over a last axis of 3 (26.9 -> 12 ms a batch of 256 28x28 images, all of this)
    grey = (x[..., 0] + x[..., 1] + x[..., 2]) / np.float32(3)
    std = grey.std(axis=(1, 2))
    blur = ndimage.gaussian_filter(grey, (0, 1.0, 1.0))
    high = np.abs(grey - blur).mean(axis=(1, 2))
    lap = (ndimage.correlate1d(blur, [1.0, -2.0, 1.0], axis=1, mode="reflect")
           + ndimage.correlate1d(blur, [1.0, -2.0, 1.0], axis=2, mode="reflect")).var(axis=(1, 2))
    colour = np.abs(x - grey[..., None]).mean(axis=(1, 2, 3))
    n, h, w = grey.shape
    return np.stack([grey.mean(axis=(1, 2)), std, high / (std + 1.0), lap / (std ** 2 + 1.0), np.full(n, h),
                     np.full(n, w), colour], axis=1).astype(np.float64)


@dataclass
class _Pass:
    """What the streamed pass keeps per image, as arrays (bounded: a few hundred bytes an image)."""

    ok: np.ndarray  # bool (n,)
    thumbs: np.ndarray  # uint8 (n, THUMB, THUMB)
    greys: np.ndarray  # uint8 (n, VERIFY, VERIFY)
    hashes: np.ndarray  # uint64 (n,)
    digests: list  # SHA-256 of the decoded pixels (str) or None
    quality: np.ndarray  # float64 (n, len(QUALITY))
    bad: dict  # index -> reason the file did not decode
    seconds: dict


def _is_jpeg(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(3) == b"\xff\xd8\xff"
    except OSError:
        return False


def model_input(path: Path, pixels: np.ndarray, size, *, recipe: dict | None) -> np.ndarray:
    """The model input of a file already decoded at its own size (``pixels``), as
    :func:`transfer.data.image.load_image` (``path``, ``size``, ``recipe``) makes it.

    A file's full-size pixels are the same under every recipe, and so is the resize of them,
    except where recipe 2 decodes a large JPEG in the DCT at a reduced scale (Pillow's draft): it
    does so only when a side is at least ``2 * DRAFT_MARGIN`` times the model's, and then the
    file is decoded again through the recipe. (Should these pixels ever differ from the loader's,
    :func:`check_pixels` notices it on the first images and the pass decodes every model input
    through ``load_image``.)"""
    h, w = int(size[0]), int(size[1])
    big = pixels.shape[0] >= 2 * DRAFT_MARGIN * h and pixels.shape[1] >= 2 * DRAFT_MARGIN * w
    if big and recipe_version(recipe) >= 2 and _is_jpeg(path):
        return load_image(path, (h, w), recipe=recipe)
    return resize_image(pixels, (h, w), recipe=recipe)


def _read_one(path: Path, size, recipe: dict | None, exact: bool = False):
    """Decode one file and derive everything the audit keeps from the same pixels (runs in a
    thread): (error, fingerprint, model input, small image or quality numbers). The model input
    is :func:`model_input`'s, or with ``exact`` the loader's own (a second decode)."""

    item = decode_item(str(path), None, recipe=recipe)  # at its own size: every recipe decodes the same pixels
    if item.pixels is None:
        return item.error or "cannot decode", None, None, None
    px = item.pixels
    fp = fingerprint_array(px)
    small = px if px.shape[0] * px.shape[1] <= _BATCH_QUALITY_PIXELS else None
    q = None if small is not None else _quality_batch(px[None])[0]
    try:
        x = load_image(path, tuple(size), recipe=recipe) if exact else model_input(path, px, size, recipe=recipe)
    except ImageDecodeError as exc:  # changed on disk between the two decodes
        return exc.reason, None, None, None
    return None, fp, x, (small if small is not None else q)


class _FeatureSink:
    """Pooled features of the images, one memory-mapped file per model of ``engine``
    (:class:`_Engine`), filled batch by batch once the engine is ready; until then the pass keeps
    decoding and holds up to :data:`WAIT_BUFFER_BYTES` of model input."""

    def __init__(self, engine, paths: dict[str, Path], n: int):
        self.engine, self.paths, self.n = engine, paths, n
        self.features: dict | None = None
        self.written = 0

    def ready(self, wait: bool) -> bool:
        if self.features is None:
            if not self.engine.ready(wait):
                return False
            from numpy.lib.format import open_memmap

            self.features = {name: open_memmap(self.paths[name], mode="w+", dtype=np.float32,
                                               shape=(self.n, self.engine.dims[name])) for name in self.engine.names}
        return True

    def add(self, x: np.ndarray) -> None:
        self.ready(True)
        m = len(x)
        for name, f in self.engine.run(x.astype(np.float32)).items():
            self.features[name][self.written:self.written + m] = np.asarray(f, np.float32).reshape(m, -1)
        self.written += m

    def finish(self) -> dict[str, np.ndarray]:
        """The features of the images that decoded, per model (each file is cut to them:
        unreadable files have no row)."""
        self.ready(True)
        out = {}
        for name, arr in self.features.items():
            if self.written < self.n:
                kept = np.array(arr[:self.written])
                del arr
                self.features[name] = None
                with atomic_path(self.paths[name]) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, kept)
                self.features[name] = kept
            out[name] = np.asarray(self.features[name][:self.written])
        return out


#: model input the pass holds while the model is still being converted (it decodes on meanwhile)
WAIT_BUFFER_BYTES = 128 << 20
#: audited images whose pixels and features are compared with the model's own loader and Keras before the pass
PARITY_IMAGES = 32
#: largest difference between ONNX Runtime's and Keras's features allowed, relative to their largest magnitude
PARITY_TOLERANCE = 1e-4
#: ONNX Runtime threads of the forward pass (the decoding threads run beside it)
ORT_THREADS = 1
#: the outputs of a contract model an audit model gives (by index)
OUTPUTS = ("features", "probs")


@dataclass
class _Parity:
    """The first audited images as the pass makes their model input (``x``, ``paths``), and how
    that input compares with the model's own loader (:func:`check_pixels`)."""

    x: np.ndarray
    paths: list
    record: dict
    exact: bool = False


def check_pixels(paths: Sequence[Path], size, *, recipe: dict | None, limit: int = PARITY_IMAGES,
                 read=None) -> _Parity:
    """The pass's model input of the first ``limit`` decodable ``paths`` (``read``: the pass's
    reader, :func:`_read_one`), compared pixel for pixel with :func:`transfer.data.image.load_image`
    at ``size`` with the run's ``recipe`` -- the pixels the model was trained and evaluated on.
    Any difference switches the pass to decoding every model input through ``load_image``
    (``exact``), and the record says so."""
    read = read or _read_one
    xs, used, diff = [], [], 0
    for path in paths:
        err, _, x, _ = read(path, size, recipe)
        if err is not None:
            continue
        ref = load_image(path, tuple(size), recipe=recipe)
        diff = max(diff, int(np.abs(x.astype(np.int16) - ref.astype(np.int16)).max()))
        xs.append(x)
        used.append(path)
        if len(xs) >= limit:
            break
    exact = diff > 0
    if exact:
        xs = [load_image(path, tuple(size), recipe=recipe) for path in used]
    h, w = (int(v) for v in size)
    record = {"recipe": recipe_version(recipe), "images": len(used), "max_abs_diff": diff,
              "decode": "load_image for every model input (the pass's pixels differed)" if exact
              else "once per file (the same pixels as load_image)"}
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, h, w, 3), np.float32)
    return _Parity(x, used, record, exact)


class _Engine:
    """Runs the audit's models on batches: ``run(x) -> {name: features}``.

    A child process converts the models to ONNX (:mod:`transfer.analysis.audit_model`; only it
    imports TensorFlow) while the audit hashes the files; :meth:`ready` waits for it, opens an
    ONNX Runtime session per model on ``threads`` threads (it releases the GIL: the decoding
    threads keep working beside it) and compares each session's features of the pass's own
    pixels of the first audited images (``parity.x``) with Keras's features of the same images as
    the model's loader decodes them (:data:`PARITY_IMAGES`): a difference in the conversion or in
    the pixels shows. A difference above :data:`PARITY_TOLERANCE` of their largest magnitude, or a
    model the child could not convert, falls back to Keras in this process for that model,
    saying why (a model that cannot be loaded at all then raises its error here). ``describe``
    records, per model, which ran and the measured difference (``audit.json``: ``feature_engine``).
    """

    def __init__(self, src: "_Source", folder: Path, parity: _Parity, *, threads: int, p):
        import json
        import subprocess
        import sys

        self.src, self.p, self.threads, self.parity = src, p, threads, parity
        self.names = [m["name"] for m in src.models]
        self.outputs = {m["name"]: OUTPUTS.index(m.get("output", "features")) for m in src.models}
        self.folder = folder
        self.sessions: dict = {}
        self.keras: dict = {}
        self.dims: dict[str, int] = {}
        self.done, self.waited = False, 0.0
        self.describe: dict = {}
        self.spec = {"models": [{**m, "onnx": str(folder / f"{m['name']}.onnx"),
                                 "reference": str(folder / f"{m['name']}.npz")} for m in src.models],
                     "parity": [str(x) for x in parity.paths], "size": list(src.size), "limit": len(parity.paths),
                     "recipe": src.recipe}
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[2])  # the folder holding this ``transfer`` package
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        p.say(f"audit: converting the model{'s' if len(self.names) > 1 else ''} to ONNX (child process)")
        self.child = subprocess.Popen([sys.executable, "-m", "transfer.analysis.audit_model", json.dumps(self.spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def ready(self, wait: bool = True) -> bool:
        """Whether the models can run: with ``wait``, waits for the conversion (the seconds waited
        add to ``waited``); then opens the ONNX Runtime sessions (parity-checked) or Keras."""
        if self.done:
            return True
        if not wait and self.child.poll() is None:
            return False
        t = time.perf_counter()
        self._open()
        self.done = True
        self.waited += time.perf_counter() - t
        return True

    def _open(self) -> None:
        import json

        out, err = self.child.communicate()
        lines = out.splitlines()
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:]
        for m in self.src.models:
            name = m["name"]
            result = [ln.split(" ", 2)[2] for ln in lines if ln.startswith(f"RESULT {name} ")]
            if not result:
                said = [ln.split(" ", 2)[2] for ln in lines if ln.startswith(f"ERROR {name} ")]
                self._keras_because(m, "the model was not converted to ONNX ("
                                    + ((said or tail or [f"exit status {self.child.returncode}"])[0]) + ")")
                continue
            res = json.loads(result[0])
            self.dims[name] = int(res["classes"] if m.get("output") == "probs" else res["dim"])
            try:
                self.sessions[name], _ = make_session(self.spec["models"][self.names.index(name)]["onnx"], "cpu",
                                                      threads=self.threads)
            except Exception as exc:  # noqa: BLE001 -- ONNX Runtime raises its own kinds; Keras still runs the model
                self._keras_because(m, f"ONNX Runtime cannot open the converted model ({type(exc).__name__}: {exc})")
                continue
            self._check(m)

    def _check(self, m: dict) -> None:
        """ONNX Runtime's features of the pass's pixels against Keras's of the loader's pixels."""
        name = m["name"]
        ref = np.load(self.spec["models"][self.names.index(name)]["reference"])
        k = len(ref["x"])
        same_images = [str(q) for q in ref["paths"]] == [str(q) for q in self.parity.paths]
        out = OUTPUTS[self.outputs[name]]
        if not same_images:
            self.describe[name] = {"parity_images": 0}
            return self._keras_because(m, "the conversion checked other images than the pass's first ones")
        diff, scale = 0.0, 1.0
        if k:
            f = self.sessions[name].run([out], {"image": self.parity.x})[0]
            diff = float(np.abs(f - ref[out]).max())
            scale = float(max(np.abs(ref[out]).max(), 1e-6))
        self.describe[name] = {"engine": "onnxruntime", "threads": self.threads, "parity_images": k,
                               "parity_max_abs_diff": diff, "parity_relative": diff / scale}
        if diff > PARITY_TOLERANCE * scale:
            self._keras_because(m, f"ONNX Runtime's {out} of the audit's pixels differ from Keras's of the model "
                                   f"loader's pixels by {diff:.3g} (largest magnitude {scale:.3g}) on {k} of the "
                                   f"audited images")

    def _keras_because(self, m: dict, why: str) -> None:

        name = m["name"]
        self.sessions.pop(name, None)
        parity = {k: v for k, v in self.describe.get(name, {}).items() if k.startswith("parity")}
        self.describe[name] = {"engine": "keras", "why": why, **parity}
        self.p.say(f"audit: {name} features by Keras: {why}")
        self.keras[name] = two_output_model(load_source_model(m))
        self.dims[name] = int(self.keras[name].outputs[self.outputs[name]].shape[-1])

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Each model's features (its softmax for a model whose spec says ``"output": "probs"``)."""
        out = {}
        for name in self.names:
            if name in self.sessions:
                out[name] = np.asarray(self.sessions[name].run([OUTPUTS[self.outputs[name]]], {"image": x})[0])
            else:
                out[name] = np.asarray(self.keras[name].predict_on_batch(x)[self.outputs[name]])
        return out

    def release(self) -> None:
        """Free the models (the pass is over)."""
        self.sessions, self.keras = {}, {}

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.communicate()


def _stream(paths: list[Path], sink, size, *, recipe: dict | None, exact: bool, batch: int, workers: int,
            p) -> _Pass:
    """Read every image once, in ``workers`` threads, one chunk ahead of the model (bounded memory):
    the file is decoded once and its fingerprint (pixel digest, perceptual hash, thumbnails),
    quality numbers and model input (:func:`model_input` with ``recipe``; ``exact``: through
    ``load_image``) all come from those pixels; features go to ``sink`` in batches of ``batch``."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(paths)
    res = _Pass(np.zeros(n, bool), np.zeros((n, THUMB, THUMB), np.uint8), np.zeros((n, VERIFY, VERIFY), np.uint8),
                np.zeros(n, np.uint64), [None] * n, np.zeros((n, len(QUALITY))), {}, {"model": 0.0})
    chunk = max(batch, 256)
    pending_x: list[np.ndarray] = []
    small: dict[tuple, list] = {}

    def flush_quality(force: bool = False):
        for shape in list(small):
            group = small[shape]
            if force or len(group) >= 256:
                res.quality[[i for i, _ in group]] = _quality_batch(np.stack([a for _, a in group]))
                del small[shape]

    def feed(force: bool = False):
        if pending_x and not sink.ready(force or len(pending_x) * pending_x[0].nbytes > WAIT_BUFFER_BYTES):
            return  # the model is not converted yet: decode on
        while len(pending_x) >= batch or (force and pending_x):
            x = np.stack(pending_x[:batch])
            del pending_x[:batch]
            t = time.perf_counter()
            sink.add(x)
            res.seconds["model"] += time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="transfer-audit") as pool, \
            p.bar(n, "audit", unit="images") as bar:
        def submit(s):
            return [pool.submit(_read_one, paths[i], size, recipe, exact) for i in range(s, min(n, s + chunk))]

        ahead = submit(0)
        for s in range(0, n, chunk):
            futs, ahead = ahead, (submit(s + chunk) if s + chunk < n else [])
            for k, f in enumerate(futs):
                i = s + k
                err, fp, x, q = f.result()
                if err is not None:
                    res.bad[i] = err
                    bar.set(f"{len(res.bad)} unreadable")
                    continue
                res.ok[i] = True
                res.thumbs[i], res.greys[i], res.hashes[i], res.digests[i] = fp.thumb, fp.grey, fp.phash, fp.pixels
                if q.ndim == 1:
                    res.quality[i] = q
                else:
                    small.setdefault(q.shape, []).append((i, q))
                pending_x.append(x)
            flush_quality()
            feed()
            bar.update(len(futs))
        flush_quality(force=True)
        feed(force=True)
    return res


# --------------------------------------------------------------------------- the feature source


@dataclass
class _Source:
    """The models whose features the audit uses (contract classifiers, ``image -> features ->
    probs``, each named by a spec for :func:`transfer.analysis.audit_model.load_source_model`):
    ``models[0]`` (``source``) is the trained trial's or the backbone's, ``initial`` (with a
    run) the trial's network at its initial weights. Also: their input size and pixel recipe,
    how to name them, the paths (relative to the data root) the trial trained on (``None``
    without a run) and notes for the user."""

    models: list
    size: tuple[int, int]
    recipe: dict | None
    describe: dict
    fit: frozenset | None = None
    notes: list = field(default_factory=list)
    #: a k-fold run: each image's held-out fold model (path -> model name), the models, the run's classes
    folds: dict | None = None


def _source(run, trial: str, backbone: str | None, weights: str | None, image_size: int | None) -> _Source:
    """The feature sources, checked without loading a model (that happens in the child process)."""
    if run is not None:

        run = open_run(run)
        t = resolve_trial(run, trial).require_finished()
        path = str(run.path.resolve())
        recipe = run.recipe
        try:
            version = recipe_version(recipe)
        except ValueError as exc:
            raise RunFolderError(f"the run's pixel recipe (dataset.json) is not one this version implements: {exc}",
                                 hint="audit with the transfer version that trained the run") from exc
        models = [{"name": "source", "run": path, "trial": t.name}]
        desc = {"run": path, "trial": t.name, "model_sha256": sha256_file(t.model_path), "recipe": version}
        notes = []
        try:
            init = initial_weights_path(run, t)
        except RunFolderError as exc:
            notes.append(f"label issues of the images trial {t.name} trained on: {exc.message}; they are judged by "
                         "their pixels alone")
        else:
            models.append({"name": "initial", "run": path, "trial": t.name, "initial": True})
            desc["initial_sha256"] = sha256_file(init)
        fit = frozenset(rel for rel, _ in run.split("train", fold=t.fold))
        folds = _fold_models(run, t, notes)
        if folds is not None:
            models += [{"name": name, "run": path, "trial": trial_name, "output": "probs"}
                       for name, trial_name in folds["trials"].items()]
            desc["fold_trials"] = sorted(folds["trials"].values())
        return _Source(models, t.image_size, recipe, desc, fit, notes, folds)
    if backbone is None:
        raise ConfigError("the audit needs features: give a run (and trial) or a backbone and its weights",
                          option="run")

    spec = get_backbone(backbone)
    side = int(image_size or spec.default_size)
    w = str(weights or "imagenet")
    desc = {"backbone": backbone, "weights": w, "image_size": side}
    if Path(w).is_file():
        desc["weights_sha256"] = sha256_file(w)
    # a chosen backbone is not tied to a run: today's pixel recipe, as `transfer train` would use
    return _Source([{"name": "source", "backbone": backbone, "weights": None if weights is None else str(weights),
                     "image_size": side}], (side, side), None, desc)


def _fold_models(run, t, notes: list) -> dict | None:
    """With a k-fold run (``transfer train --kfold K``): the fold trials of ``t``'s group, one per
    fold, and for each image of a fold's val split the model that did not train on it --
    ``{"trials": {name: trial}, "held_out": {path: name}, "classes": [...]}``; ``None`` otherwise
    (with a note when the folds are not all finished)."""
    if not t.fold:
        return None
    k = int(run.config().get("kfold") or 0)
    mine = {x.fold: x for x in run.finished_trials() if x.meta.get("group") == t.meta.get("group") and x.fold}
    if k < 2 or sorted(mine) != list(range(1, k + 1)):
        notes.append(f"label issues: {len(mine)} of the {k} fold trials of {t.meta.get('group')} are finished; the "
                     "k-fold models are used once all are")
        return None
    trials = {f"fold{f}": mine[f].name for f in sorted(mine)}
    held_out = {rel: f"fold{f}" for f in sorted(mine) for rel, _ in run.split("val", fold=f)}
    return {"trials": trials, "held_out": held_out, "classes": run.class_names}


# --------------------------------------------------------------------------- findings


def _robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    mad = np.median(np.abs(v - med)) * 1.4826
    return (v - med) / max(mad, 1e-6 * max(1.0, abs(med)))


def _knn(features: np.ndarray, k: int):
    """(cosine distances, indices) of each row's ``k`` nearest other rows
    (:func:`transfer.data.nearest.nearest`: exact for small sets, an inverted-file search beyond)."""
    from threadpoolctl import threadpool_limits

    f = np.asarray(features, dtype=np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    with threadpool_limits(1):  # small products: BLAS's threads only fight (see near_search.near_pairs_arrays)
        idx, sim = nearest(f, f, min(k, len(f) - 1), same=True)
    sim = np.where(np.isfinite(sim), sim, -1.0)
    return 1.0 - sim, idx


def _quality_findings(quality: np.ndarray, ok: list[int]) -> list[tuple[int, str, float, str]]:
    """(image, kind, score, detail) of the quality checks; thresholds relative to the folder where it has a spread.

    ``quality``: rows of :data:`QUALITY` numbers of the images ``ok``."""
    arr = {k: quality[:, c].astype(np.float64) for c, k in enumerate(QUALITY)}
    out = []
    blank = arr["std"] < 2.0
    z_noise = _robust_z(arr["noise"])
    z_sharp = _robust_z(np.log(arr["sharpness"] + 1e-6))
    side = np.minimum(arr["height"], arr["width"])
    aspect = np.maximum(arr["height"], arr["width"]) / np.maximum(side, 1)
    colour_set = np.mean(arr["colour"] > 2.0) >= 0.9
    med_side = np.median(side)
    for k, i in enumerate(ok):
        if blank[k]:
            out.append((i, "blank", float(arr["std"][k]), "near-constant image (grey-level std below 2)"))
            continue
        if z_noise[k] > Z_FLAG and arr["noise"][k] > 0.5:
            out.append((i, "noise", float(arr["noise"][k]), "mostly pixel-level noise"))
        if arr["mean"][k] < 15:
            out.append((i, "dark", float(arr["mean"][k]), "mean grey level below 15"))
        if arr["mean"][k] > 240:
            out.append((i, "bright", float(arr["mean"][k]), "mean grey level above 240"))
        if z_sharp[k] < -Z_FLAG:
            out.append((i, "blurry", float(arr["sharpness"][k]), "far less detail than the folder's images"))
        if side[k] < 0.5 * med_side or side[k] < 8:
            out.append((i, "tiny", float(side[k]), f"{int(arr['width'][k])}x{int(arr['height'][k])} px"))
        if aspect[k] > 3.0:
            out.append((i, "aspect_ratio", float(aspect[k]), f"{int(arr['width'][k])}x{int(arr['height'][k])} px"))
        if colour_set and arr["colour"][k] <= 2.0:
            out.append((i, "grayscale", float(arr["colour"][k]), "grayscale in a colour set"))
    return out


# --------------------------------------------------------------------------- the audit


@dataclass
class _Data:
    root: Path
    class_names: list[str]
    rel: list[str]
    labels: np.ndarray
    split: list[str | None]
    unreadable: list[tuple[str, str]]


def _data(data, run, p) -> _Data:
    p.say(f"audit: indexing {data}")
    idx = index_folder(data, strict=False, decode=False)  # the pass decodes every file and lists the bad ones
    if not idx.samples:
        raise DataError(f"{data} holds no readable image to audit")
    where: dict[str, str] = {}
    if idx.given_splits is not None:
        where = {s.path: name for name, part in idx.given_splits.items() for s in part}
    if run is not None:
        run = open_run(run)
        for name in ("train", "val", "test"):
            where.update({rel: name for rel, _ in run.split(name)})
    rel = [s.path for s in idx.samples]
    return _Data(Path(idx.root), list(idx.class_names), rel, np.array([s.label for s in idx.samples], np.int64),
                 [where.get(r) for r in rel], [(b.path, b.reason) for b in idx.bad])


def _file_hashes(root: Path, rel: Sequence[str], workers: int) -> dict[str, str]:
    """SHA-256 of every file (in threads: hashing and reading release the GIL); a file that cannot
    be read gets ``unreadable: <why>`` (the pass lists it), so it too counts as changed once it can."""
    from concurrent.futures import ThreadPoolExecutor

    def one(r: str) -> str:
        try:
            return sha256_file(root / r)
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="transfer-audit-hash") as pool:
        return dict(zip(rel, pool.map(one, rel, chunksize=64)))


def _previous(out: Path, hashes: dict[str, str], source: dict, settings: dict) -> tuple[dict | None, str]:
    """The earlier audit's summary when nothing changed, else ``None`` and why."""
    js, files = out / "audit.json", out / "files.csv"
    if not js.is_file() or not files.is_file():
        return None, ""
    try:
        old = read_json(js)
        import csv

        with open(files, newline="", encoding="utf-8") as f:
            before = {r["path"]: r["sha256"] for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError):
        return None, "the earlier audit is unreadable"
    if old.get("version") != AUDIT_VERSION or old.get("source") != source or old.get("settings") != settings:
        return None, "the feature source or settings differ from the earlier audit"
    changed = sum(1 for k, v in hashes.items() if k in before and before[k] != v)
    added, removed = len(set(hashes) - set(before)), len(set(before) - set(hashes))
    if changed or added or removed:
        return None, f"files changed since the earlier audit ({changed} changed, {added} added, {removed} removed)"
    return old, ""


def audit_folder(data: str | os.PathLike, config: AuditConfig | None = None, *, progress: ProgressLike = None,
                 **options) -> AuditResult:
    """Audit the image folder ``data`` and write ``audit.csv``, ``audit.json`` and ``audit.html``.

    Args:
        data: ``DATA/<class>/*`` or ``DATA/{train,val,test}/<class>/*``.
        config: the options (:class:`~transfer.analysis.audit_config.AuditConfig`): ``run``, a run
            folder whose trial (``trial``) gives the features and whose splits give the leakage
            check (paths relative to ``data``); without a run, ``backbone``, ``weights``
            (``imagenet`` or a weights file) and ``image_size`` give them; ``out`` (default
            ``RUN/audit`` with a run, else ``<data>-audit`` beside it); ``near_threshold`` (the
            verification score of a near-duplicate pair, :func:`transfer.data.near_verify.verify_pairs`);
            ``folds`` of the out-of-fold probabilities for label issues; ``neighbours`` of the
            outlier score; ``batch_size`` and ``workers`` (decoding threads); ``force`` (audit
            again even when nothing changed). ``options`` are laid over it by name.
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``.

    Returns:
        An :class:`AuditResult`.

    Raises:
        ConfigError: no feature source, bad numbers. DataError: no readable image.
        RunFolderError / ModelError: as opening the run or building the backbone.
    """
    cfg = replace(config or AuditConfig(), **options)
    p = as_progress(progress)
    run, workers = cfg.run, cfg.workers
    d = _data(data, run, p)
    out = Path(cfg.out) if cfg.out is not None else (audit_dir(run) if run is not None
                                                     else d.root.parent / f"{d.root.name}-audit")
    settings = {"near_threshold": cfg.threshold, "folds": cfg.folds, "neighbours": cfg.neighbours}
    src = _source(run, cfg.trial, cfg.backbone, cfg.weights, cfg.image_size)
    for note in src.notes:
        p.say(f"note: {note}")
    hashes = _file_hashes(d.root, d.rel, workers)
    if not cfg.force:
        old, why = _previous(out, hashes, src.describe, settings)
        if old is not None:
            p.say(f"audit: nothing changed since {old.get('created')}; reusing {out}")
            return AuditResult(out, old, _read_rows(out / "audit.csv"), reused=True)
        if why:
            p.say(f"audit: {why}; auditing again")
    out.mkdir(parents=True, exist_ok=True)
    parity = check_pixels([d.root / r for r in d.rel[:2 * PARITY_IMAGES]], src.size, recipe=src.recipe)
    if parity.exact:
        p.say(f"audit: the pass's model input differs from load_image's (recipe {parity.record['recipe']}) by up to "
              f"{parity.record['max_abs_diff']} grey levels on the first images; decoding every model input "
              "through load_image")
    with tempfile.TemporaryDirectory(prefix="transfer-audit-") as tmp:
        engine = _Engine(src, Path(tmp), parity, threads=ORT_THREADS, p=p)
        try:
            return _run(d, src, engine, out, hashes, settings, batch_size=cfg.batch_size, workers=workers, p=p)
        finally:
            engine.close()


def _run(d: _Data, src: _Source, engine: _Engine, out: Path, hashes: dict, settings: dict, *, batch_size, workers,
         p) -> AuditResult:
    t0 = time.perf_counter()
    _return_large_blocks()
    phases: dict[str, float] = {}
    paths = [d.root / r for r in d.rel]
    files = {name: engine.folder / f"{name}.npy" for name in engine.names}  # the k-fold models' softmax
    files.update({"source": out / "features.npy", "initial": out / "initial_features.npy"})
    sink = _FeatureSink(engine, files, len(paths))
    if "initial" not in engine.names:
        (out / "initial_features.npy").unlink(missing_ok=True)  # an earlier audit's, of another source
    got = _stream(paths, sink, src.size, recipe=src.recipe, exact=engine.parity.exact, batch=batch_size,
                  workers=workers, p=p)
    sink.ready(True)
    engine.release()  # the session's memory arena, before the duplicate search's peak
    phases["read_and_features"] = time.perf_counter() - t0
    phases["model_conversion_wait"] = engine.waited
    phases["model"] = got.seconds["model"]
    ok = [int(i) for i in np.flatnonzero(got.ok)]
    if not ok:
        raise DataError(f"{d.root} holds no readable image to audit ({len(got.bad)} files do not decode)")
    feats = sink.finish()
    _release_freed_memory()
    rows = [{"path": r, "kind": "unreadable", "score": None, "group": None, "label": None, "suggested_label": None,
             "split": None, "detail": why} for r, why in d.unreadable]
    rows += [_row(d, i, "unreadable", None, detail=why) for i, why in got.bad.items()]
    from threadpoolctl import threadpool_limits

    # one after the other, every matrix product on one BLAS thread: label issues + outliers in a
    # second thread beside the duplicate search were slower on two shared cores (10k subset,
    # alternating runs: 12.7 and 12.8 s against 9.4 and 11.7 s one after the other, and more CPU;
    # both are partly Python and share the GIL)
    with threadpool_limits(1):
        t = time.perf_counter()
        groups, group_rows, near = _duplicates(d, got, ok, feats["source"], settings["near_threshold"], p)
        phases["duplicates"] = time.perf_counter() - t
        _release_freed_memory()
        found, (score, z), side_phases = _labels_and_outliers(d, src, feats, got.greys[ok], ok, settings, p)
    phases.update(side_phases)
    _release_freed_memory()
    rows += group_rows
    judged = {g["group"]: g for g in found.record.get("groups", [])}
    rows += [_row(d, ok[k], "label_issue", s, suggested=d.class_names[sug],
                  detail=f"judged by {judged[g]['source']}, out of sample ({judged[g]['what']})")
             for k, s, sug, g in found.issues]
    rows += [_row(d, ok[k], "outlier", float(score[k]), detail=f"robust z {z[k]:.1f}")
             for k in np.flatnonzero(z > Z_FLAG)]
    t = time.perf_counter()
    rows += [_row(d, i, kind, s, detail=det) for i, kind, s, det in _quality_findings(got.quality[ok], ok)]
    phases["quality"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = _summary(d, src, settings, rows, groups, ok, time.perf_counter() - t0)
    summary["near_duplicate_search"] = near
    summary["feature_engine"] = {**engine.describe, "pixels": engine.parity.record}
    summary["label_issues"] = found.record
    summary["notes"] = list(src.notes) + list(found.notes)
    _write(out, d, hashes, summary, rows)
    phases["write"] = time.perf_counter() - t
    summary["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
    summary["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "audit.json", summary)
    p.say(f"audit: {len(paths)} images in {summary['seconds']:.0f} s -> {out} ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")")
    return AuditResult(out, summary, rows)


def _labels_and_outliers(d: _Data, src: _Source, feats: dict[str, np.ndarray], greys: np.ndarray, ok: list[int],
                         settings: dict, p):
    """Label issues (:func:`transfer.analysis.audit_labels.find_label_issues`, on views out of
    sample for the rows they judge) and outlier scores (mean cosine distance to the nearest
    neighbours in the source's features, robust z), with the seconds of each."""
    t = time.perf_counter()
    views = {"pixels": pixel_features(greys)}
    probabilities: dict[str, np.ndarray] = {}
    if src.fit is None:  # a chosen backbone never saw these labels
        views["backbone"] = feats["source"]
        groups = [Group("all", np.arange(len(ok)), ("backbone", "pixels"), "every image (the backbone never saw "
                        "their labels)")]
    else:
        views["trained"] = feats["source"]
        if "initial" in feats:
            views["initial"] = feats["initial"]
        fit = np.array([d.rel[i] in src.fit for i in ok], dtype=bool)
        trial = src.describe["trial"]
        groups = [Group("fit", np.flatnonzero(fit), ("folds", "initial", "pixels"),
                        f"the images trial {trial} trained on"),
                  Group("held_out", np.flatnonzero(~fit), ("folds", "trained", "initial", "pixels"),
                        f"the images trial {trial} did not train on")]
        if src.folds is not None:
            probabilities["folds"] = _held_out_softmax(d, src.folds, feats, ok)
    p.say(f"audit: label issues ({settings['folds']}-fold cross-fitted heads on "
          + ", ".join(sorted(views)) + (", with the k-fold models' softmax" if probabilities else "") + "; cleanlab)")
    found = find_label_issues(views, d.labels[ok], groups, folds=settings["folds"], class_names=d.class_names,
                              probabilities=probabilities)
    for g in found.record.get("groups", []):
        if g.get("searched"):
            p.say(f"audit: label issues: {g['issues']} among {g['what']} ({g['images']} images; judged by "
                  f"{g['source']}, out-of-fold log loss {g['log_loss'][g['source']]:.3f})")
    for note in found.notes:
        p.say(f"note: {note}")
    t1 = time.perf_counter()
    dist, _ = _knn(feats["source"], settings["neighbours"])
    score = dist.mean(axis=1)
    return found, (score, _robust_z(score)), {"label_issues": t1 - t, "outliers": time.perf_counter() - t1}


def _held_out_softmax(d: _Data, folds: dict, feats: dict[str, np.ndarray], ok: list[int]) -> np.ndarray:
    """Per image the softmax of the k-fold model that did not train on it (the mean of all for an
    image in no fold's val split: test, or outside the run), over the audit's classes (matched by
    name with the run's)."""
    names = list(folds["trials"])
    mean = np.mean([feats[n] for n in names], axis=0)
    out = np.zeros((len(ok), len(d.class_names)), np.float64)
    cols = [d.class_names.index(c) if c in d.class_names else -1 for c in folds["classes"]]
    keep = [j for j, c in enumerate(cols) if c >= 0]
    for k, i in enumerate(ok):
        name = folds["held_out"].get(d.rel[i])
        row = feats[name][k] if name is not None else mean[k]
        out[k, [cols[j] for j in keep]] = row[keep]
    return out


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to tune
        return None


def _release_freed_memory() -> None:
    """Hand memory freed by the decoding threads and the duplicate search back to the system
    (glibc keeps it in per-thread arenas otherwise, and the next phase's peak adds to it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _return_large_blocks() -> None:
    """Serve every allocation from 1 MiB up with its own mapping, returned to the system when freed
    (glibc's default threshold grows to 32 MiB, and the duplicate search's many blocks of a few
    MiB then stay in the heap: measured on the 60k Fashion-MNIST fingerprints, the search's peak
    went from +321 to +244 MB; it costs some speed in the verification, measured 10-30 %)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed, no longer adjusted dynamically)


def _row(d: _Data, i: int, kind: str, score, *, group=None, suggested=None, detail: str = "") -> dict:
    return {"path": d.rel[i], "kind": kind, "score": None if score is None else round(float(score), 6),
            "group": group, "label": d.class_names[d.labels[i]], "suggested_label": suggested, "split": d.split[i],
            "detail": detail}


def _duplicates(d: _Data, got: _Pass, ok: list[int], feats: np.ndarray, threshold: float, p):
    """Groups of exact / near duplicates, their rows (one per member, per kind that applies) and
    what the near-duplicate search did."""
    p.say(f"audit: duplicates (exact pixels; near: verification score >= {threshold:g})")
    digests = [got.digests[i] for i in ok]
    first: dict[str, int] = {}
    exact = []
    for k, dg in enumerate(digests):
        j = first.setdefault(dg, k)
        if j != k:
            exact.append((j, k))
    st = NearStats()
    sides = np.minimum(got.quality[ok, QUALITY.index("height")], got.quality[ok, QUALITY.index("width")])
    fps = Fingerprints(got.thumbs[ok], got.greys[ok], got.hashes[ok], digests, sides)
    near = near_pairs_arrays(fps, threshold=threshold, stats=st)
    groups = components(len(ok), list(exact) + near)  # chains: a crop of a copy joins its original
    best: dict[int, float] = {}
    for i, j, s in near:
        best[i] = max(best.get(i, 0.0), s)
        best[j] = max(best.get(j, 0.0), s)
    rows, out_groups = [], []
    for gid, g in enumerate(groups, start=1):
        members = [ok[k] for k in g]
        labels = {int(d.labels[i]) for i in members}
        splits = {d.split[i] for i in members if d.split[i]}
        fcos = _group_cosine(feats, g)
        out_groups.append({"group": gid, "paths": [d.rel[i] for i in members], "splits": sorted(splits),
                           "labels": sorted(d.class_names[c] for c in labels), "feature_cosine": fcos})
        all_exact = all(digests[k] == digests[g[0]] for k in g[1:])
        kind = "exact_duplicate" if all_exact else "near_duplicate"
        for k, i in zip(g, members):
            detail = f"{len(g)} images; feature cosine {fcos:.3f}"
            rows.append(_row(d, i, kind, 1.0 if all_exact else best.get(k, 1.0), group=gid, detail=detail))
            if len(labels) > 1:
                rows.append(_row(d, i, "conflicting_labels", float(len(labels)), group=gid,
                                 detail="labels " + ", ".join(sorted(d.class_names[c] for c in labels))))
            if len(splits) > 1:
                rows.append(_row(d, i, "leakage", float(len(splits)), group=gid,
                                 detail="splits " + ", ".join(sorted(splits))))
    search = {"candidate_pairs": st.candidates, "verified_pairs": st.verified, "refined_pairs": st.refined,
              "near_pairs": len(near), "seconds": {k: round(v, 2) for k, v in st.seconds.items()}}
    return out_groups, rows, search


def _group_cosine(feats: np.ndarray, g: Sequence[int]) -> float:
    """Smallest cosine between the features of a group's first member and the others."""
    f = feats[list(g)].astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return float((f[1:] @ f[0]).min()) if len(g) > 1 else 1.0


def _summary(d: _Data, src: _Source, settings: dict, rows: list[dict], groups: list[dict], ok: list[int],
             seconds: float) -> dict:
    """``audit.json``'s content; class balance and ``readable`` count the images that decoded (``ok``)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    balance = np.bincount(d.labels[ok], minlength=len(d.class_names))
    return {
        "version": AUDIT_VERSION, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": str(d.root.resolve()), "images": len(d.rel) + len(d.unreadable), "readable": len(ok),
        "source": src.describe, "settings": settings, "counts": counts,
        "class_balance": {c: int(n) for c, n in zip(d.class_names, balance)},
        "groups": groups, "leaking_groups": sum(1 for g in groups if len(g["splits"]) > 1),
        "seconds": seconds,
    }


def _write(out: Path, d: _Data, hashes: dict, summary: dict, rows: list[dict]) -> None:
    order = {k: i for i, k in enumerate(KINDS)}
    rows.sort(key=lambda r: (order.get(r["kind"], 99), -(r["score"] or 0.0) if r["kind"] != "label_issue" else 0,
                             r["group"] or 0))
    write_csv(out / "files.csv", ["path", "sha256"], sorted(hashes.items()))
    write_csv(out / "audit.csv", CSV_COLUMNS, [[r[c] for c in CSV_COLUMNS] for r in rows])
    write_json_atomic(out / "audit.json", summary)
    write_page(out, d.root, summary, rows)


def _read_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


__all__ = ["audit_folder", "audit_dir", "AuditResult", "KINDS"]
