"""What duplicate detection keeps of one image, and reading files into it. No TensorFlow.

Each image is described by a :class:`Fingerprint` made from its decoded pixels (the same
decoding as training, :func:`transfer.data.image.decode_image`):

* ``pixels``: SHA-256 of the RGB pixels and their shape -- equal = an exact duplicate,
  whatever the file format or metadata;
* ``phash``: the 64-bit perceptual hash of ``imagehash.phash`` (DCT of a 32x32 grey image);
* ``thumb``: a 24x24 grey thumbnail (uint8), ``grey``: a 32x32 one (:data:`VERIFY`), ``side``:
  the shorter side of the image.

:class:`Fingerprints` holds many of them as arrays, the form the near-duplicate search
(:func:`transfer.data.near_search.near_pairs_arrays`) takes.

Example::

    fps = fingerprint_paths(paths)                   # None for a file that does not decode
    arrays = Fingerprints.stack([fp for fp in fps if fp is not None])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._lazy import require
from .stream import decode_item

#: side of the thumbnail kept per image
THUMB = 24
#: side of the grey image kept per image for the verification of candidate pairs
VERIFY = 32


@dataclass(frozen=True)
class Fingerprint:
    """What duplicate detection keeps of one image."""

    pixels: str
    phash: int
    thumb: np.ndarray  # uint8 (THUMB, THUMB)
    grey: np.ndarray  # uint8 (VERIFY, VERIFY)
    side: int = 0  # the shorter side of the decoded image (pixels)


@dataclass(frozen=True)
class Fingerprints:
    """The fingerprints of ``n`` images as arrays: thumbnails ``(n, THUMB, THUMB)`` and
    verification greys ``(n, VERIFY, VERIFY)`` (uint8), perceptual hashes ``(n,)`` uint64, pixel
    digests, and the shorter side of each image (``None``: unknown, every image compared at
    full detail)."""

    thumbs: np.ndarray
    greys: np.ndarray
    hashes: np.ndarray
    digests: Sequence[str]
    sides: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.thumbs)

    @classmethod
    def stack(cls, fps: Sequence[Fingerprint]) -> Fingerprints:
        """The arrays of a list of :class:`Fingerprint` (at least one)."""
        return cls(np.stack([fp.thumb for fp in fps]), np.stack([fp.grey for fp in fps]),
                   np.array([fp.phash for fp in fps], dtype=np.uint64), [fp.pixels for fp in fps],
                   np.array([fp.side for fp in fps]))


def _imagehash():
    return require("imagehash", purpose="perceptual hashes for duplicate detection")


def fingerprint_array(arr: np.ndarray) -> Fingerprint:
    """The :class:`Fingerprint` of decoded RGB uint8 pixels ``(H, W, 3)``."""
    from PIL import Image

    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    digest = hashlib.sha256(f"{arr.shape}".encode())
    digest.update(arr.tobytes())
    grey = Image.fromarray(arr).convert("L")
    bits = _imagehash().phash(grey).hash.ravel()
    phash = int.from_bytes(np.packbits(bits).tobytes(), "big")
    thumb = np.asarray(grey.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)
    big = np.asarray(grey.resize((VERIFY, VERIFY), Image.Resampling.BILINEAR), dtype=np.uint8)
    return Fingerprint(digest.hexdigest(), phash, thumb, big, int(min(arr.shape[:2])))


def map_decoded(paths: Sequence, fn: Callable, *, workers: int = 2, chunk: int = 256):
    """``fn(path, pixels, error)`` for every path in order, the files decoded at their own size in
    ``workers`` threads, ``chunk`` at a time (bounded memory); a bad file gets ``pixels=None``
    and the reason in ``error``. Yields the results of ``fn``."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p):
        item = decode_item(str(p), None, recipe=None)  # at its own size: every recipe decodes the same pixels
        return fn(p, item.pixels, item.error)

    with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="transfer-dedupe") as pool:
        for s in range(0, len(paths), chunk):
            yield from pool.map(one, paths[s:s + chunk])


def fingerprint_paths(paths: Sequence, *, workers: int = 2) -> list[Fingerprint | None]:
    """Fingerprints of image files (``None`` for a file that cannot be decoded)."""
    return list(map_decoded(paths, lambda p, px, err: fingerprint_array(px) if px is not None else None,
                            workers=workers))


__all__ = ["THUMB", "VERIFY", "Fingerprint", "Fingerprints", "fingerprint_array", "fingerprint_paths", "map_decoded"]
