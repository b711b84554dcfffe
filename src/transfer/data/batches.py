"""Batches of pixels for training and evaluation, decoded on demand (no TensorFlow).

:class:`BatchSource` holds only file names; :meth:`BatchSource.get` decodes one batch
with :func:`transfer.data.stream.decode_item` (the package's one per-file decode, on
:func:`transfer.data.image.load_image`, the one source of pixels), optionally
augments it in numpy / Pillow, and returns it. Only the batch in hand is in memory, so
a dataset larger than RAM works. ``get`` is thread-safe and deterministic: the order
depends on ``(seed, epoch)`` and each sample's augmentation on ``(seed, epoch, index)``,
never on thread scheduling.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..options import check_int
from .folder import BadFile, Sample
from .image import DEFAULT_MAX_PIXELS
from .stream import decode_item

#: Accepted augmentation names (applied in this order when asked).
AUGMENTATIONS = ("flip", "translate", "rotate", "zoom", "brightness", "contrast")

#: Strength of each augmentation.
AUGMENT_LIMITS = {
    "translate": 0.1,   # shift up to 10 % of height / width
    "rotate": 15.0,     # degrees
    "zoom": 0.15,       # scale in [1 - z, 1 + z]
    "brightness": 0.2,  # multiply by [1 - b, 1 + b]
    "contrast": 0.2,    # scale around the mean by [1 - c, 1 + c]
}


@dataclass
class Batch:
    """One batch: ``x`` float32 (n, H, W, 3) RGB 0..255, ``y`` int64 (n,)."""

    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    failed: list[BadFile] = field(default_factory=list)


def check_augmentations(augment: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate augmentation names; returns them in canonical order without duplicates.

    Raises:
        ConfigError: an unknown name (lists the accepted ones).
    """
    if augment is None:
        return ()
    if isinstance(augment, str):
        augment = [a for a in augment.split(",") if a.strip()]
    names = [str(a).strip().lower() for a in augment]
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(
            f"unknown augmentation {', '.join(repr(a) for a in unknown)}; "
            f"accepted: {', '.join(AUGMENTATIONS)}"
        )
    return tuple(a for a in AUGMENTATIONS if a in names)


def _affine(img: np.ndarray, *, angle: float = 0.0, scale: float = 1.0,
            shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Rotate (degrees) / zoom / shift (pixels dy, dx) about the centre; black fill."""
    h, w = img.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    dy, dx = shift
    # inverse map: output (x, y) -> input coordinates
    ox, oy = cx + dx, cy + dy
    coeffs = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
    out = Image.fromarray(img, mode="RGB").transform(
        (w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.asarray(out, dtype=np.uint8)


def augment_image(img: np.ndarray, augment: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Apply the named augmentations to a uint8 RGB image with ``rng``; returns uint8 (same shape).

    Example::

        augment_image(x, ("flip", "rotate"), np.random.default_rng(0))
    """
    out = img
    if "flip" in augment and rng.random() < 0.5:
        out = out[:, ::-1]
    angle, scale, shift = 0.0, 1.0, (0.0, 0.0)
    if "translate" in augment:
        t = AUGMENT_LIMITS["translate"]
        shift = (rng.uniform(-t, t) * out.shape[0], rng.uniform(-t, t) * out.shape[1])
    if "rotate" in augment:
        r = AUGMENT_LIMITS["rotate"]
        angle = rng.uniform(-r, r)
    if "zoom" in augment:
        z = AUGMENT_LIMITS["zoom"]
        scale = rng.uniform(1 - z, 1 + z)
    if angle or scale != 1.0 or shift != (0.0, 0.0):
        out = _affine(np.ascontiguousarray(out), angle=angle, scale=scale, shift=shift)
    if "brightness" in augment or "contrast" in augment:
        f = out.astype(np.float32)
        if "brightness" in augment:
            b = AUGMENT_LIMITS["brightness"]
            f *= rng.uniform(1 - b, 1 + b)
        if "contrast" in augment:
            c = AUGMENT_LIMITS["contrast"]
            mean = f.mean()
            f = (f - mean) * rng.uniform(1 - c, 1 + c) + mean
        out = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def read_ahead(get: Callable[[int], object], n: int, *, workers: int, ahead: int) -> Iterator:
    """``get(0) .. get(n - 1)`` in order, computed by ``workers`` threads at most ``ahead`` items
    early; only those are held (a finished item is released once it is yielded).

    Example::

        for batch in read_ahead(source.get, len(source), workers=2, ahead=3):
            model.predict_on_batch(batch.x)
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="transfer-read-ahead") as pool:
        pending: deque = deque(pool.submit(get, i) for i in range(min(n, max(1, int(ahead)))))
        for i in range(n):
            item = pending.popleft().result()
            if i + len(pending) + 1 < n:
                pending.append(pool.submit(get, i + len(pending) + 1))
            yield item


@dataclass(frozen=True)
class Sampling:
    """How a :class:`BatchSource` draws each epoch's batches from its samples.

    Attributes:
        shuffle: reorder each epoch, deterministically from ``(seed, epoch)``.
        seed: base seed for order and augmentation.
        augment: names from :data:`AUGMENTATIONS` (the trainer passes them for train only);
            kept in canonical order without duplicates.
        drop_remainder: drop the last incomplete batch.
        pad_to_multiple: pad every batch to a multiple of this many images by repeating
            its own first images (``--strategy mirrored``: each of N replicas must get
            the same number of images; TensorFlow fails on an empty or uneven share).

    Raises:
        ConfigError: an unknown augmentation name, or ``pad_to_multiple`` below 1.

    Example::

        Sampling(shuffle=True, seed=3, augment=("flip", "rotate"))
    """

    shuffle: bool = False
    seed: int = 0
    augment: Sequence[str] = ()
    drop_remainder: bool = False
    pad_to_multiple: int = 1

    def __post_init__(self):
        check_int(self.pad_to_multiple, "pad_to_multiple", option="pad_to_multiple")
        object.__setattr__(self, "augment", check_augmentations(self.augment))


class BatchSource:
    """Indexable batches over a list of samples, decoded on demand.

    Args:
        root: dataset root the sample paths are relative to.
        samples: the split's samples.
        batch_size: images per batch (the last batch may be smaller unless ``drop_remainder``).
        image_size: (H, W) of the model input.
        sampling: order, augmentation and batch shape of each epoch (:class:`Sampling`).
        max_pixels: decode limit, as for indexing.
        recipe: the run's recorded pixel recipe (None: the current one).

    A file that fails to decode is recorded in :attr:`failed` and replaced by the next
    decodable sample of the split (in sample order), so batches keep their size.

    Raises:
        ConfigError: bad batch size, image size or augmentation name.

    Example::

        src = BatchSource("data/digits", parts["train"], 32, (32, 32), sampling=Sampling(shuffle=True))
        b = src.get(0); b.x.shape
        # (32, 32, 32, 3)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        samples: Sequence[Sample],
        batch_size: int,
        image_size: tuple[int, int],
        *,
        sampling: Sampling = Sampling(),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        recipe: dict | None = None,
    ):
        check_int(batch_size, "batch size", option="batch_size")
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ConfigError(f"image size must be (height, width) (got {image_size!r})") from None
        check_int(h, "image size's height", option="image_size")
        check_int(w, "image size's width", option="image_size")
        self.root = Path(root)
        self.samples = list(samples)
        self.batch_size = int(batch_size)
        self.image_size = (h, w)
        self.sampling = sampling
        self.shuffle = bool(sampling.shuffle)
        self.seed = int(sampling.seed)
        self.augment = sampling.augment
        self.drop_remainder = bool(sampling.drop_remainder)
        self.max_pixels = max_pixels
        self.recipe = recipe  # the run's recorded pixel recipe (None: the current one)
        self.pad_to_multiple = int(sampling.pad_to_multiple)
        self.failed: list[BadFile] = []
        self._lock = threading.Lock()
        self._bad_index: dict[int, str] = {}
        self._state = (0, self._order(0))

    # ---- order -------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.samples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch), 0x0DE5]).permutation(n)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (when ``shuffle``) and reseed augmentation for ``epoch``."""
        self._state = (int(epoch), self._order(int(epoch)))

    @property
    def epoch(self) -> int:
        return self._state[0]

    def __len__(self) -> int:
        n = len(self.samples)
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    # ---- decoding ----------------------------------------------------------
    def _record(self, idx: int, reason: str) -> BadFile:
        bf = BadFile(self.samples[idx].path, reason)
        with self._lock:
            if idx not in self._bad_index:
                self._bad_index[idx] = reason
                self.failed.append(bf)
        return bf

    def _load(self, idx: int, failed: list[BadFile]) -> tuple[np.ndarray, int]:
        """Pixels of sample ``idx`` or of the next decodable sample after it."""
        n = len(self.samples)
        for step in range(n):
            j = (idx + step) % n
            reason = self._bad_index.get(j)
            if reason is None:
                item = decode_item(os.fspath(self.root / self.samples[j].path), self.image_size,
                                   recipe=self.recipe, max_pixels=self.max_pixels)
                if item.error is None:
                    return item.pixels, j
                reason = item.error
                self._record(j, reason)
            if step == 0:
                failed.append(BadFile(self.samples[j].path, reason))
        raise DataError(
            f"none of the {n} images of this split under {self.root} can be decoded "
            f"(first: {self.failed[0].path}: {self.failed[0].reason})" if self.failed else
            f"none of the {n} images of this split under {self.root} can be decoded",
            hint=f"run `transfer data check {self.root}`",
        )

    def get(self, i: int) -> Batch:
        """Batch ``i`` of the current epoch (thread-safe).

        Raises:
            IndexError: ``i`` out of range.
            DataError: no image of the split can be decoded.
        """
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range (0..{len(self) - 1})")
        epoch, order = self._state
        idxs = order[i * self.batch_size:(i + 1) * self.batch_size]
        k = self.pad_to_multiple
        if len(idxs) % k:  # repeat the batch's own images up to a multiple of k
            idxs = np.resize(idxs, -(-len(idxs) // k) * k)
        h, w = self.image_size
        x = np.empty((len(idxs), h, w, 3), dtype=np.float32)
        y = np.empty((len(idxs),), dtype=np.int64)
        paths: list[str] = []
        failed: list[BadFile] = []
        for k, idx in enumerate(idxs):
            img, j = self._load(int(idx), failed)
            if self.augment:
                rng = np.random.default_rng([self.seed, epoch, j, 0xA06])
                img = augment_image(img, self.augment, rng)
            x[k] = img
            y[k] = self.samples[j].label
            paths.append(self.samples[j].path)
        return Batch(x=x, y=y, paths=paths, failed=failed)

    def __getitem__(self, i: int) -> Batch:
        return self.get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)
