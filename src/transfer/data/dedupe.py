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
zero-mean -- also from its centred crop, and the images within a few bits of its perceptual
hash. A candidate pair's score is the best similarity of the two descriptors, either one also
taken as a centred crop of 3, 6 or 9 % (:data:`ZOOMS`), and, for pairs just below the
threshold, as an off-centre crop (centre moved by :data:`SHIFTS`); the similarity is the
cosine for detailed images and tends to 1 for two faint images that differ by less than noise.
Pairs whose 4x4 layouts differ (:data:`COARSE_GATE`) score -1. A pair is a near duplicate
from ``threshold`` (0.985 by default). Pairs are merged into groups (connected components).
Measured (docs/audit.md): resized and re-compressed copies score above 0.99; crops of a few
percent mostly pass on small centred pictures but not all on textured ones; sets of tiny,
centred pictures (8x8 digits, 28x28 clothes) hold many pairs of *different* pictures this
alike, which the score cannot tell from copies.

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
NEAR_THRESHOLD = 0.985
#: centred crops (as zoom factors) compared too: a copy cropped by a few percent matches one of them
ZOOMS = (1.03, 1.06, 1.09)
#: pairs scoring from this up to the threshold are also tried as off-centre crops (centre moved by these pixels)
REFINE_FROM = 0.94
REFINE_ZOOMS = ZOOMS
SHIFTS = (-0.6, 0.0, 0.6)
#: pairs whose 4x4 block means differ by more than this (RMS grey levels) are not duplicates
COARSE_GATE = 16.0
#: noise floor of the descriptor similarity (squared norm of grey-level noise of about 1 over 256 pixels)
_EPS = 256.0
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


def groups_of(n: int, pairs: Sequence[tuple]) -> list[list[int]]:
    """Groups (of size >= 2) of ``n`` items from duplicate ``pairs`` (``(i, j)`` or ``(i, j, score)``),
    each sorted, ordered by their first item.

    Star groups, not chains: pairs are taken best score first, and an item joins a group only
    through a pair with the group's first item (its representative), so every member is a
    duplicate of the representative itself. (Chaining "A like B, B like C, ..." merges sets of
    look-alike pictures into groups of thousands.)
    """
    rep: dict[int, int] = {}
    for p in sorted(pairs, key=lambda p: -(p[2] if len(p) > 2 else 1.0)):
        i, j = int(p[0]), int(p[1])
        ri, rj = rep.get(i), rep.get(j)
        if ri is None and rj is None:
            rep[i] = rep[j] = min(i, j)
        elif rj is None and ri == i:
            rep[j] = i
        elif ri is None and rj == j:
            rep[i] = j
    out: dict[int, list[int]] = {}
    for i, r in rep.items():
        out.setdefault(r, []).append(i)
    return sorted((sorted(g) for g in out.values() if len(g) > 1), key=lambda g: g[0])


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


def _resample_matrix(zoom: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Linear interpolation from :data:`THUMB` to :data:`DESCRIPTOR` pixels of the ``1/zoom`` part
    of a row around its centre moved by ``shift`` pixels (a crop enlarged back), as a matrix."""
    c = (THUMB - 1) / 2.0
    u = (np.arange(DESCRIPTOR) + 0.5) * THUMB / DESCRIPTOR - 0.5
    src = np.clip((u - c) / zoom + c + shift, 0, THUMB - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, THUMB - 1)
    w = (src - lo).astype(np.float32)
    m = np.zeros((DESCRIPTOR, THUMB), np.float32)
    np.add.at(m, (np.arange(DESCRIPTOR), lo), 1 - w)
    np.add.at(m, (np.arange(DESCRIPTOR), hi), w)
    return m


def _blur_matrix(sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter1d(np.eye(DESCRIPTOR, dtype=np.float32), sigma, axis=0)


_FINE, _COARSE = _blur_matrix(0.4), _blur_matrix(2.0)


def _band(thumbs: np.ndarray, zy: float = 1.0, zx: float = 1.0, dy: float = 0.0,
          dx: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of thumbnails (or of their crops: zooms ``zy``, ``zx``, centre moved by ``dy``,
    ``dx``) at 16x16, band-passed (fine detail minus the coarse shape) and zero-mean: ``(unit
    vectors (n, 256), their norms (n,))``. Every step is linear and separable, so it is done as
    large matrix products."""
    n = len(thumbs)
    ry, rx = _resample_matrix(zy, dy), _resample_matrix(zx, dx)
    x = thumbs.astype(np.float32)
    out = np.zeros((n, DESCRIPTOR, DESCRIPTOR), np.float32)
    for blur, sign in ((_FINE, 1.0), (_COARSE, -1.0)):
        my, mx = blur @ ry, blur @ rx  # (16, 24)
        y = (x.reshape(n * THUMB, THUMB) @ mx.T).reshape(n, THUMB, DESCRIPTOR)
        y = (y.transpose(0, 2, 1).reshape(n * DESCRIPTOR, THUMB) @ my.T).reshape(n, DESCRIPTOR, DESCRIPTOR)
        out += sign * y.transpose(0, 2, 1)
    out = out.reshape(n, -1)
    out -= out.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(out, axis=1)
    unit = np.divide(out, norm[:, None], out=np.zeros_like(out), where=norm[:, None] > 1e-6)
    return unit, norm


def _similarity(ua, na, ub, nb) -> np.ndarray:
    """``(EPS + |a| |b| cos) / (EPS + |a| |b|)`` of descriptors given as unit vectors and norms: the
    cosine for detailed images (whatever their contrast: a resized copy has less fine detail),
    near 1 for two faint ones that differ by less than noise."""
    cos = np.einsum("ij,ij->i", ua.astype(np.float32), ub.astype(np.float32))
    return ((_EPS + na * nb * cos) / (_EPS + na * nb)).astype(np.float32)


def _coarse(thumbs: np.ndarray) -> np.ndarray:
    """4x4 block means of the thumbnails (brightness and layout, which every copy keeps)."""
    n = len(thumbs)
    b = THUMB // 4
    return thumbs.astype(np.float32).reshape(n, 4, b, 4, b).mean(axis=(2, 4)).reshape(n, 16)


def _knn_candidates(query: np.ndarray, base: np.ndarray, k: int, chunk: int = 256) -> set[tuple[int, int]]:
    """Each query row's ``k`` most similar base rows other than itself (cosine of unit vectors),
    computed ``chunk`` rows at a time."""
    n = len(base)
    k = min(k, n - 1)
    out: set[tuple[int, int]] = set()
    if k < 1:
        return out
    for s in range(0, n, chunk):
        sims = query[s:s + chunk].astype(np.float32) @ base.T
        rows = np.arange(len(sims))
        sims[rows, s + rows] = -np.inf
        top = np.argpartition(sims, n - k, axis=1)[:, n - k:]
        for r, js in enumerate(top):
            i = s + r
            out.update((min(i, int(j)), max(i, int(j))) for j in js)
    return out


def _descriptors(thumbs: np.ndarray) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Descriptors of the thumbnails and of their centred crops (:data:`ZOOMS`; float16 to save memory)."""
    out = {1.0: _band(thumbs)}
    for z in ZOOMS:
        unit, norm = _band(thumbs, z, z)
        out[z] = (unit.astype(np.float16), norm)
    return out


def _pair_scores(desc: dict, coarse: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Best similarity of each pair over "neither cropped" and "one is a centred crop of the other";
    -1 where the coarse layouts differ by more than :data:`COARSE_GATE` grey levels (RMS)."""
    out = np.empty(len(pairs), np.float32)
    (u, nrm) = desc[1.0]
    for s in range(0, len(pairs), chunk):
        a, b = pairs[s:s + chunk, 0], pairs[s:s + chunk, 1]
        best = _similarity(u[a], nrm[a], u[b], nrm[b])
        for z in ZOOMS:
            zu, zn = desc[z]
            best = np.maximum(best, _similarity(zu[a], zn[a], u[b], nrm[b]))
            best = np.maximum(best, _similarity(u[a], nrm[a], zu[b], zn[b]))
        gate = np.sqrt(((coarse[a] - coarse[b]) ** 2).mean(axis=1)) > COARSE_GATE
        best[gate] = -1.0
        out[s:s + chunk] = best
    return out


def _phash_candidates(hashes: np.ndarray, bits: int, k: int, chunk: int = 256) -> set[tuple[int, int]]:
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


def _refine(thumbs: np.ndarray, desc: dict, pairs: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Scores of pairs that may be off-centre crops: either image cropped at the zooms of
    :data:`REFINE_ZOOMS` with its centre moved by :data:`SHIFTS` pixels, against the other.

    The crops are made once per image (``chunk`` images at a time), not once per pair."""
    out = np.full(len(pairs), -1.0, np.float32)
    moves = [(z, z, dy, dx) for z in REFINE_ZOOMS for dy in SHIFTS for dx in SHIFTS
             if (z, dy, dx) != (1.0, 0.0, 0.0)]
    u, nrm = desc[1.0]
    for moving_col in (0, 1):
        moving, fixed = pairs[:, moving_col], pairs[:, 1 - moving_col]
        images = np.unique(moving)
        for s in range(0, len(images), chunk):
            part = images[s:s + chunk]
            sel = np.flatnonzero(np.isin(moving, part))
            row = np.searchsorted(part, moving[sel])
            bu, bn = u[fixed[sel]], nrm[fixed[sel]]
            for zy, zx, dy, dx in moves:
                du, dn = _band(thumbs[part], zy, zx, dy, dx)
                out[sel] = np.maximum(out[sel], _similarity(du[row], dn[row], bu, bn))
    return out


def near_pairs(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD, neighbours: int = NEIGHBOURS,
               phash_bits: int = PHASH_BITS) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs ``(i, j, similarity)`` (``i < j``; exact duplicates included).

    Memory: the thumbnails (24x24 bytes per image) and one chunk of similarities at a time.
    """
    n = len(fps)
    if n < 2:
        return []
    thumbs = np.stack([fp.thumb for fp in fps])
    desc = _descriptors(thumbs)
    cands = _knn_candidates(desc[1.0][0], desc[1.0][0], neighbours)
    cands |= _knn_candidates(desc[ZOOMS[-1]][0], desc[1.0][0], neighbours)  # an original's crop finds the copy
    cands |= _phash_candidates(np.array([fp.phash for fp in fps], dtype=np.uint64), phash_bits, neighbours)
    if not cands:
        return []
    pairs = np.array(sorted(cands), dtype=np.int64)
    sim = _pair_scores(desc, _coarse(thumbs), pairs)
    maybe = (sim >= REFINE_FROM) & (sim < threshold)
    if maybe.any():
        sim[maybe] = np.maximum(sim[maybe], _refine(thumbs, desc, pairs[maybe]))
    same = np.array([fps[i].pixels == fps[j].pixels for i, j in pairs])
    sim[same] = 1.0
    keep = sim >= threshold
    return [(int(i), int(j), float(v)) for (i, j), v in zip(pairs[keep], sim[keep])]


def duplicate_groups(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD) -> list[list[int]]:
    """Groups of exact and near duplicates (indices into ``fps``)."""
    return groups_of(len(fps), list(exact_pairs(fps)) + near_pairs(fps, threshold=threshold))


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
