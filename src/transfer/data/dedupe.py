"""Duplicate images: exact (same decoded pixels) and near (resized, re-compressed or slightly
cropped copies), grouped; and splits that keep every group on one side. No TensorFlow.

Each image is described by a :class:`Fingerprint` made from its decoded pixels (the same
decoding as training, :func:`transfer.data.image.decode_image`):

* ``pixels``: SHA-256 of the RGB pixels and their shape -- equal = an exact duplicate,
  whatever the file format or metadata;
* ``phash``: the 64-bit perceptual hash of ``imagehash.phash`` (DCT of a 32x32 grey image);
* ``thumb``: a 24x24 grey thumbnail (uint8).

Near duplicates (:func:`near_pairs`): the *candidates* of an image are its nearest neighbours
by a descriptor -- its thumbnail at 16x16, band-passed (fine detail minus the coarse shape),
zero-mean and unit-norm -- and the images within a few bits of its perceptual hash; a
candidate pair is a near duplicate when the cosine of the two descriptors reaches
``threshold`` (0.98 by default: resized and re-compressed copies score above 0.99, copies
cropped by a few percent above 0.98 on the test data). Pairs are merged into groups
(connected components). In a set of tiny, centred pictures (8x8 digits, 28x28 clothes)
different pictures can be this alike; the score is in the audit's table, and the threshold
can be raised.

Training uses the groups so that a group never straddles train / val / test
(:func:`grouped_split`); :func:`straddling_groups` lists the groups a split already
straddles.

Example::

    fps = [fingerprint_array(load_image(p)) for p in paths]
    groups = duplicate_groups(fps)                   # [[0, 7], [3, 4, 9], ...]
    parts = grouped_split(samples, groups, lambda s: split_samples(s, val=0.2, test=0.1))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

#: side of the thumbnail kept per image
THUMB = 24
#: side of the band-passed descriptor whose cosine scores a pair
DESCRIPTOR = 16
#: default descriptor cosine of a near-duplicate pair
NEAR_THRESHOLD = 0.98
#: candidates per image: nearest thumbnails, and perceptual hashes within this many bits
NEIGHBOURS = 4
PHASH_BITS = 6



@dataclass(frozen=True)
class Fingerprint:
    """What duplicate detection keeps of one image."""

    pixels: str
    phash: int
    thumb: np.ndarray  # uint8 (THUMB, THUMB)


def _imagehash():
    from .._lazy import require

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
    return Fingerprint(digest.hexdigest(), phash, thumb)


# --------------------------------------------------------------------------- groups


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def groups_of(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of size >= 2) of ``n`` items linked by ``pairs``, each sorted, ordered
    by their first item."""
    uf = _UnionFind(n)
    for i, j in pairs:
        uf.union(int(i), int(j))
    out: dict[int, list[int]] = {}
    for i in range(n):
        out.setdefault(uf.find(i), []).append(i)
    return sorted((g for g in out.values() if len(g) > 1), key=lambda g: g[0])


def exact_pairs(fps: Sequence[Fingerprint]) -> list[tuple[int, int]]:
    """Pairs (first, other) of images with the same decoded pixels."""
    first: dict[str, int] = {}
    out = []
    for i, fp in enumerate(fps):
        j = first.setdefault(fp.pixels, i)
        if j != i:
            out.append((j, i))
    return out


# --------------------------------------------------------------------------- near duplicates


def _band(thumbs: np.ndarray, side: int) -> np.ndarray:
    """Band-passed (fine detail minus the coarse shape), zero-mean, unit-norm ``side x side`` images."""
    from scipy import ndimage

    x = thumbs.astype(np.float32)
    if x.shape[1] != side:
        x = ndimage.zoom(x, (1, side / x.shape[1], side / x.shape[2]), order=1)
    s = side / THUMB
    x = ndimage.gaussian_filter(x, (0, 0.6 * s, 0.6 * s)) - ndimage.gaussian_filter(x, (0, 3.0 * s, 3.0 * s))
    x -= x.mean(axis=(1, 2), keepdims=True)
    norm = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-6)


def _knn_candidates(desc: np.ndarray, k: int, chunk: int = 512) -> set[tuple[int, int]]:
    """Each row's ``k`` most similar other rows (cosine of unit vectors), in chunks of ``chunk`` rows."""
    n = len(desc)
    k = min(k, n - 1)
    out: set[tuple[int, int]] = set()
    if k < 1:
        return out
    for s in range(0, n, chunk):
        sims = desc[s:s + chunk] @ desc.T
        rows = np.arange(len(sims))
        sims[rows, s + rows] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        for r, js in enumerate(top):
            i = s + r
            out.update((min(i, int(j)), max(i, int(j))) for j in js)
    return out


def _phash_candidates(hashes: np.ndarray, bits: int, k: int, chunk: int = 1024) -> set[tuple[int, int]]:
    """Pairs whose perceptual hashes differ in at most ``bits`` bits (at most ``k`` per image, closest first)."""
    n = len(hashes)
    out: set[tuple[int, int]] = set()
    for s in range(0, n, chunk):
        d = np.bitwise_count(hashes[s:s + chunk, None] ^ hashes[None, :])
        rows = np.arange(len(d))
        d[rows, s + rows] = 255
        for r in range(len(d)):
            close = np.flatnonzero(d[r] <= bits)
            if len(close) > k:
                close = close[np.argsort(d[r, close], kind="stable")[:k]]
            i = s + r
            out.update((min(i, int(j)), max(i, int(j))) for j in close)
    return out


def near_pairs(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD, neighbours: int = NEIGHBOURS,
               phash_bits: int = PHASH_BITS) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs ``(i, j, similarity)`` (``i < j``; exact duplicates included).

    Memory: the thumbnails (24x24 bytes per image) and one chunk of similarities at a time.
    """
    n = len(fps)
    if n < 2:
        return []
    desc = _band(np.stack([fp.thumb for fp in fps]), DESCRIPTOR).reshape(n, -1)
    cands = _knn_candidates(desc, neighbours)
    cands |= _phash_candidates(np.array([fp.phash for fp in fps], dtype=np.uint64), phash_bits, neighbours)
    if not cands:
        return []
    pairs = np.array(sorted(cands), dtype=np.int64)
    sim = np.einsum("ij,ij->i", desc[pairs[:, 0]], desc[pairs[:, 1]]).astype(np.float32)
    same = np.array([fps[i].pixels == fps[j].pixels for i, j in pairs])
    sim[same] = 1.0
    keep = sim >= threshold
    return [(int(i), int(j), float(v)) for (i, j), v in zip(pairs[keep], sim[keep])]


def duplicate_groups(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD) -> list[list[int]]:
    """Groups of exact and near duplicates (indices into ``fps``)."""
    pairs = [(i, j) for i, j in exact_pairs(fps)] + [(i, j) for i, j, _ in near_pairs(fps, threshold=threshold)]
    return groups_of(len(fps), pairs)


# --------------------------------------------------------------------------- splits


def grouped_split(samples: Sequence, groups: Sequence[Sequence[int]],
                  split: Callable[[list], dict[str, list]]) -> dict[str, list]:
    """Split ``samples`` so that every group of duplicates lands in one part.

    Each group is represented by its first sample; ``split`` (e.g. a stratified
    :func:`transfer.data.splits.split_samples`) splits the representatives and the other
    members follow theirs. Stratification is by the representative's label.

    Args:
        samples: the samples (anything ``split`` takes, with a ``path``).
        groups: index lists into ``samples`` (from :func:`duplicate_groups`).
        split: splits a list of samples into named parts (``{"train": [...], ...}``).

    Returns:
        The parts of ``split``, with every group's members beside its representative.
    """
    follower_of: dict[int, list[int]] = {}
    hidden: set[int] = set()
    for g in groups:
        follower_of[g[0]] = list(g[1:])
        hidden.update(g[1:])
    reps = [s for i, s in enumerate(samples) if i not in hidden]
    index = {s.path: i for i, s in enumerate(samples)}
    parts = split(reps)
    out = {}
    for name, part in parts.items():
        members = []
        for s in part:
            members.append(s)
            members.extend(samples[j] for j in follower_of.get(index[s.path], ()))
        out[name] = sorted(members, key=lambda s: s.path)
    return out


def straddling_groups(parts: dict[str, Sequence], groups: Sequence[Sequence[str]]) -> list[dict]:
    """The groups (of sample paths) whose members sit in more than one part: ``[{"paths", "parts"}]``."""
    where = {s.path: name for name, part in parts.items() for s in part}
    out = []
    for g in groups:
        names = sorted({where[p] for p in g if p in where})
        if len(names) > 1:
            out.append({"paths": list(g), "parts": names})
    return out


__all__ = ["Fingerprint", "fingerprint_array", "exact_pairs", "near_pairs", "groups_of",
           "duplicate_groups", "grouped_split", "straddling_groups", "NEAR_THRESHOLD"]


# --------------------------------------------------------------------------- reading


def map_decoded(paths: Sequence, fn: Callable, *, workers: int = 2, chunk: int = 256):
    """``fn(path, pixels, error)`` for every path in order, the files decoded at their own size in
    ``workers`` threads, ``chunk`` at a time (bounded memory); a bad file gets ``pixels=None``
    and the reason in ``error``. Yields the results of ``fn``."""
    from concurrent.futures import ThreadPoolExecutor

    from .stream import decode_item

    def one(p):
        item = decode_item(str(p), None)
        return fn(p, item.pixels, item.error)

    with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="transfer-dedupe") as pool:
        for s in range(0, len(paths), chunk):
            yield from pool.map(one, paths[s:s + chunk])


def fingerprint_paths(paths: Sequence, *, workers: int = 2) -> list[Fingerprint | None]:
    """Fingerprints of image files (``None`` for a file that cannot be decoded)."""
    return list(map_decoded(paths, lambda p, px, err: fingerprint_array(px) if px is not None else None,
                            workers=workers))


def sample_groups(samples: Sequence, root, *, workers: int = 2, threshold: float = NEAR_THRESHOLD) -> list[list[int]]:
    """Duplicate groups (indices into ``samples``, each with a ``path`` relative to ``root``).

    This is what ``transfer train --dedupe`` keeps on one side of the split; an unreadable
    file belongs to no group.
    """
    from pathlib import Path

    fps = fingerprint_paths([Path(root) / s.path for s in samples], workers=workers)
    ok = [i for i, fp in enumerate(fps) if fp is not None]
    return [[ok[k] for k in g] for g in duplicate_groups([fps[i] for i in ok], threshold=threshold)]


__all__ += ["map_decoded", "fingerprint_paths", "sample_groups"]
