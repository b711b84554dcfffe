"""The audit's streamed pass: every image read once, and everything the audit keeps made from
the same pixels.

Each file is decoded once, in threads one chunk ahead of the model (bounded memory: a chunk of
images at a time), and gives a :class:`~transfer.data.fingerprint.Fingerprint` (exact-pixel
hash, perceptual hash, thumbnails), a few quality numbers (:data:`QUALITY`, batched per image
size) and the model input, made exactly as the model's own loader makes it
(:func:`transfer.data.image.load_image` with the run's recorded pixel recipe; checked on the
first images by :func:`check_pixels`). The model input goes to a :class:`FeatureSink`, which
writes the features of the audit's models (:class:`~transfer.analysis.audit_engine.FeatureEngine`)
to memory-mapped files batch by batch.

Example::

    parity = check_pixels(paths[:64], (32, 32), recipe=run.recipe)
    got = stream_pass(paths, FeatureSink(engine, files, len(paths)), (32, 32), recipe=run.recipe,
                      exact=parity.exact, batch=64, workers=2, p=as_progress(None))
    got.ok, got.quality, got.bad        # per image: decoded?, quality numbers; unreadable ones
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.fingerprint import THUMB, VERIFY, fingerprint_array
from ..data.image import DRAFT_MARGIN, load_image, recipe_version, resize_image
from ..data.stream import decode_item
from ..errors import ImageDecodeError
from ..fsutil import atomic_path

#: quality numbers per image, in this order (:func:`quality_batch`)
QUALITY = ("mean", "std", "noise", "sharpness", "height", "width", "colour")
#: images with at most this many pixels have their quality computed in batches (cheaper per image)
_BATCH_QUALITY_PIXELS = 128 * 128
#: model input the pass holds while the model is still being converted (it decodes on meanwhile)
WAIT_BUFFER_BYTES = 128 << 20
#: audited images whose pixels and features are compared with the model's own loader and Keras before the pass
PARITY_IMAGES = 32


def quality_batch(rgb: np.ndarray) -> np.ndarray:
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
class PassResult:
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


def read_one(path: Path, size, recipe: dict | None, exact: bool = False):
    """Decode one file and derive everything the audit keeps from the same pixels (runs in a
    thread): (error, fingerprint, model input, small image or quality numbers). The model input
    is :func:`model_input`'s, or with ``exact`` the loader's own (a second decode)."""

    item = decode_item(str(path), None, recipe=recipe)  # at its own size: every recipe decodes the same pixels
    if item.pixels is None:
        return item.error or "cannot decode", None, None, None
    px = item.pixels
    fp = fingerprint_array(px)
    small = px if px.shape[0] * px.shape[1] <= _BATCH_QUALITY_PIXELS else None
    q = None if small is not None else quality_batch(px[None])[0]
    try:
        x = load_image(path, tuple(size), recipe=recipe) if exact else model_input(path, px, size, recipe=recipe)
    except ImageDecodeError as exc:  # changed on disk between the two decodes
        return exc.reason, None, None, None
    return None, fp, x, (small if small is not None else q)


class FeatureSink:
    """Pooled features of the images, one memory-mapped file per model of ``engine``
    (:class:`~transfer.analysis.audit_engine.FeatureEngine`), filled batch by batch once the
    engine is ready; until then the pass keeps decoding and holds up to :data:`WAIT_BUFFER_BYTES`
    of model input."""

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


@dataclass
class Parity:
    """The first audited images as the pass makes their model input (``x``, ``paths``), and how
    that input compares with the model's own loader (:func:`check_pixels`)."""

    x: np.ndarray
    paths: list
    record: dict
    exact: bool = False


def check_pixels(paths: Sequence[Path], size, *, recipe: dict | None, limit: int = PARITY_IMAGES,
                 read=None) -> Parity:
    """The pass's model input of the first ``limit`` decodable ``paths`` (``read``: the pass's
    reader, :func:`read_one`), compared pixel for pixel with :func:`transfer.data.image.load_image`
    at ``size`` with the run's ``recipe`` -- the pixels the model was trained and evaluated on.
    Any difference switches the pass to decoding every model input through ``load_image``
    (``exact``), and the record says so."""
    read = read or read_one
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
    return Parity(x, used, record, exact)


def stream_pass(paths: list[Path], sink, size, *, recipe: dict | None, exact: bool, batch: int, workers: int,
                p) -> PassResult:
    """Read every image once, in ``workers`` threads, one chunk ahead of the model (bounded memory):
    the file is decoded once and its fingerprint (pixel digest, perceptual hash, thumbnails),
    quality numbers and model input (:func:`model_input` with ``recipe``; ``exact``: through
    ``load_image``) all come from those pixels; features go to ``sink`` in batches of ``batch``."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(paths)
    res = PassResult(np.zeros(n, bool), np.zeros((n, THUMB, THUMB), np.uint8),
                     np.zeros((n, VERIFY, VERIFY), np.uint8), np.zeros(n, np.uint64), [None] * n,
                     np.zeros((n, len(QUALITY))), {}, {"model": 0.0})
    chunk = max(batch, 256)
    pending_x: list[np.ndarray] = []
    small: dict[tuple, list] = {}

    def flush_quality(force: bool = False):
        for shape in list(small):
            group = small[shape]
            if force or len(group) >= 256:
                res.quality[[i for i, _ in group]] = quality_batch(np.stack([a for _, a in group]))
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
            return [pool.submit(read_one, paths[i], size, recipe, exact) for i in range(s, min(n, s + chunk))]

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


__all__ = [
    "PARITY_IMAGES",
    "QUALITY",
    "FeatureSink",
    "Parity",
    "PassResult",
    "check_pixels",
    "model_input",
    "quality_batch",
    "read_one",
    "stream_pass",
]
