"""Duplicate images: exact (same decoded pixels) and near (resized, re-compressed or slightly
cropped copies), grouped; and splits that keep every group on one side. No TensorFlow.

Each image is described by a :class:`Fingerprint` made from its decoded pixels (the same
decoding as training, :func:`transfer.data.image.decode_image`):

* ``pixels``: SHA-256 of the RGB pixels and their shape -- equal = an exact duplicate,
  whatever the file format or metadata;
* ``phash``: the 64-bit perceptual hash of ``imagehash.phash`` (DCT of a 32x32 grey image);
* ``thumb``: a 24x24 grey thumbnail (uint8), ``grey``: a 32x32 one (:data:`VERIFY`), ``side``:
  the shorter side of the image.

Near duplicates (:func:`near_pairs`), in three steps:

1. *candidates*: each image's :data:`NEIGHBOURS` nearest neighbours by a descriptor -- its
   thumbnail at 16x16, band-passed (fine detail minus the coarse shape), zero-mean, projected
   on 48 principal axes -- also from its centred 9 % crop (:func:`nearest`: exact for small
   sets, an inverted file beyond), and the images within :data:`PHASH_BITS` bits of its
   perceptual hash (a multi-index);
2. a *cheap score*: the best similarity of the two descriptors, either one also taken as a
   centred crop of 3, 6 or 9 % (:data:`ZOOMS`); pairs whose 4x4 layouts differ
   (:data:`COARSE_GATE`) or scoring below :data:`PREFILTER` are dropped;
3. the *verification* (:func:`verify_pairs`): the correlation of the two 32x32 images'
   band-passed detail, one taken as a crop of the other, either way round; a near duplicate
   from ``threshold`` (:data:`NEAR_THRESHOLD`).

Pairs are merged into *components* (:func:`components`): every image linked to another by a
chain of verified pairs is in its group, so a crop of a resized copy of an original joins the
original's group even when the crop and the original do not verify against each other.
Everything that keeps groups on one side or warns about a group across the split uses them
(:func:`duplicate_groups`, :func:`sample_groups`, :func:`grouped_split`) and the audit. (Star
groups -- each member a verified duplicate of the group's first image, as before -- let such a
crop land in test while the original trains.) On 60,000 Fashion-MNIST images the components are
small: 205 groups of 2-7 images where star groups made 210 of 2-5 (docs/audit.md). Measured
(docs/audit.md): on 60,000 Fashion-MNIST images with 300 planted copies, 94 % of the copies are
found (resized 1.0, re-compressed 0.98, cropped 0.84); the other reported pairs are mostly
different photographs that are nearly the same picture, which no pixel score can tell from
copies.

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
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .._lazy import require
from .stream import decode_item

#: side of the thumbnail kept per image
THUMB = 24
#: side of the band-passed descriptor whose cosine scores a pair
DESCRIPTOR = 16
#: default verification score (:func:`verify_pairs`) of a near-duplicate pair
NEAR_THRESHOLD = 0.96
#: side of the grey image kept per image for the verification of candidate pairs
VERIFY = 32
#: band-pass of the verification: Gaussian blur sigmas (pixels at VERIFY = 32) whose difference is compared
VERIFY_BAND = (1.0, 2.5)
#: crops tried by the verification: each side cut by each of these fractions (either image)
VERIFY_CROPS = (0.0, 0.04)
#: a pair whose smaller image has a shorter side below this many pixels compares coarser detail
SMALL_SIDE = 28
_SCALES = (1.0, 1.25, 1.5, 2.0)
#: pairs verified from this up to the threshold are verified again on a finer grid of crops
REFINE_FROM = 0.85
REFINE_CROPS = (0.0, 0.02, 0.04)
#: candidate pairs whose cheap descriptor score is below this are not verified
PREFILTER = 0.85
#: a pair with an image under TINY_SIDE pixels (8x8 digits, their copies) also needs this
#: descriptor similarity (a cropped 26-px Fashion-MNIST copy must not: its descriptor moves)
TINY_SIDE = 16
TINY_DESCRIPTOR = 0.985
#: dimensions of the descriptor projection the neighbour search uses
SEARCH_DIMS = 48
#: query x base rows up to which :func:`nearest` compares everything (beyond: inverted file)
EXACT_PAIRS = 100_000_000
#: centred crops (as zoom factors) compared too: a copy cropped by a few percent matches one of them
ZOOMS = (1.03, 1.06, 1.09)
#: pairs whose 4x4 block means differ by more than this (RMS grey levels) are not duplicates
COARSE_GATE = 24.0
#: noise floor of the descriptor similarity (squared norm of grey-level noise of about 1 over 256 pixels)
_EPS = 256.0
#: candidates per image: nearest thumbnails, and perceptual hashes within this many bits
NEIGHBOURS = 6
PHASH_BITS = 6


@dataclass(frozen=True)
class Fingerprint:
    """What duplicate detection keeps of one image."""

    pixels: str
    phash: int
    thumb: np.ndarray  # uint8 (THUMB, THUMB)
    grey: np.ndarray  # uint8 (VERIFY, VERIFY)
    side: int = 0  # the shorter side of the decoded image (pixels)


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


# --------------------------------------------------------------------------- groups


def components(n: int, pairs: Sequence[tuple]) -> list[list[int]]:
    """Connected components (of size >= 2) of ``n`` items linked by duplicate ``pairs`` (``(i, j)`` or
    ``(i, j, score)``), each sorted, ordered by their first item.

    A chain A~B, B~C puts A, B and C in one group even when A~C was not verified: this is the
    grouping for keeping duplicates on one side of a split and for warning about a group across
    it (a star group around A would leave C free to land in test while A and B train).

    Example::

        components(5, [(0, 1, 0.99), (1, 2, 0.97)])   # [[0, 1, 2]]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n < 2 or not len(pairs):
        return []
    ij = np.array([(int(p[0]), int(p[1])) for p in pairs], dtype=np.int64)
    if ij.min() < 0 or ij.max() >= n:
        raise ValueError(f"duplicate pairs name items outside 0..{n - 1}")
    graph = coo_matrix((np.ones(len(ij), np.int8), (ij[:, 0], ij[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.argsort(label, kind="stable")
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    return sorted((g.tolist() for g in np.split(order, cuts) if len(g) > 1), key=lambda g: g[0])


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
    cos = np.einsum("ij,ij->i", np.asarray(ua, np.float32), np.asarray(ub, np.float32))
    return ((_EPS + na * nb * cos) / (_EPS + na * nb)).astype(np.float32)


def _coarse(thumbs: np.ndarray) -> np.ndarray:
    """4x4 block means of the thumbnails (brightness and layout, which every copy keeps)."""
    n = len(thumbs)
    b = THUMB // 4
    return thumbs.astype(np.float32).reshape(n, 4, b, 4, b).mean(axis=(2, 4)).reshape(n, 16)


def nearest(query: np.ndarray, base: np.ndarray, k: int, *, same: bool = False, probes: int = 8,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's ``k`` most similar base rows by dot product (cosine for unit rows):
    ``(indices (n, k), similarities (n, k))``, most similar first (index -1 / similarity -inf
    where fewer were found); with ``same`` (query is base) a row is not its own neighbour.

    Small sets: exact, as float32 matrix products. From :data:`EXACT_PAIRS` query-base pairs
    on: an inverted-file search -- the base is cut into about ``sqrt(len(base))`` clusters
    (spherical k-means on a sample) and each query is compared with the members of its
    ``probes`` nearest clusters only (a few percent of the base), so 60,000 images take seconds,
    not minutes. Rows this alike (near duplicates, nearest neighbours) almost always share a
    cluster or sit in neighbouring ones; a neighbour in an unprobed cluster is missed.
    """
    query = np.ascontiguousarray(query, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    n, m = len(query), len(base)
    k = max(0, min(int(k), m - (1 if same else 0)))
    if k < 1 or n == 0:
        return np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    if n * m <= EXACT_PAIRS:
        return _top_k(query, base, np.arange(n), np.arange(m), k, same, n)
    rng = np.random.default_rng(seed)
    centres = _spherical_kmeans(base, max(2, int(np.sqrt(m))), rng)
    home = np.empty(m, np.int64)
    for s in range(0, m, 8192):
        home[s:s + 8192] = (base[s:s + 8192] @ centres.T).argmax(axis=1)
    p = min(probes, len(centres))
    qa, qb = [], []
    probe = np.empty((n, p), np.int64)
    for s in range(0, n, 8192):
        sims = query[s:s + 8192] @ centres.T
        probe[s:s + 8192] = np.argpartition(-sims, p - 1, axis=1)[:, :p]
    order = np.argsort(home, kind="stable")
    bounds = np.searchsorted(home[order], np.arange(len(centres) + 1))
    q_of = np.repeat(np.arange(n), p)
    c_of = probe.ravel()
    qorder = np.argsort(c_of, kind="stable")
    qbounds = np.searchsorted(c_of[qorder], np.arange(len(centres) + 1))
    for c in range(len(centres)):
        members = order[bounds[c]:bounds[c + 1]]
        qs_c = q_of[qorder[qbounds[c]:qbounds[c + 1]]]
        if not len(members) or not len(qs_c):
            continue
        i, (j, v) = _top_k(query[qs_c], base[members], qs_c, members, k, same, None)
        qa.append(i.astype(np.int32))
        qb.append((j.astype(np.int32), v))
    rows = np.concatenate(qa) if qa else np.zeros(0, np.int32)
    del qa
    cols = np.concatenate([b[0] for b in qb]) if qb else np.zeros(0, np.int32)
    vals = np.concatenate([b[1] for b in qb]) if qb else np.zeros(0, np.float32)
    del qb
    return _merge_top_k(rows.astype(np.int64), cols.astype(np.int64), vals, n, k)


def _top_k(q: np.ndarray, b: np.ndarray, qid: np.ndarray, bid: np.ndarray, k: int, same: bool, n: int | None,
           block: int = 2048):
    """Exact top ``k`` of ``q @ b.T`` per row; with ``n``: as ``(indices (n, k), sims)``, else as
    ``(row ids, (base ids, sims))`` of the hits, for :func:`_merge_top_k`."""
    rows_out, cols_out, vals_out = [], [], []
    kk = min(k, len(b))
    for s in range(0, len(q), block):
        sims = q[s:s + block] @ b.T
        if same:
            sims[qid[s:s + block, None] == bid[None, :]] = -np.inf
        top = np.empty((len(sims), kk), np.int64)
        v = np.empty((len(sims), kk), np.float32)
        r = np.arange(len(sims))
        for t in range(kk):  # k passes of argmax: faster than argpartition for a few neighbours
            top[:, t] = sims.argmax(axis=1)
            v[:, t] = sims[r, top[:, t]]
            sims[r, top[:, t]] = -np.inf
        rows_out.append(np.repeat(qid[s:s + block], top.shape[1]))
        cols_out.append(bid[top].ravel())
        vals_out.append(v.ravel())
    rows, cols, vals = np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(vals_out)
    if n is None:
        return rows, (cols, vals)
    return _merge_top_k(rows, cols, vals, n, k)


def _merge_top_k(rows, cols, vals, n: int, k: int):
    keep = np.isfinite(vals)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    # by row, then most similar first (each base row sits in one cluster: no repeats)
    order = np.argsort(rows * 4.0 + (1.0 - np.clip(vals.astype(np.float64), -1.0, 1.0)), kind="stable")
    rows, cols, vals = rows[order], cols[order], vals[order]
    first = np.searchsorted(rows, np.arange(n))
    rank = np.arange(len(rows)) - first[rows]
    sel = rank < k
    idx = np.full((n, k), -1, np.int64)
    sim = np.full((n, k), -np.inf, np.float32)
    idx[rows[sel], rank[sel]] = cols[sel]
    sim[rows[sel], rank[sel]] = vals[sel]
    return idx, sim


def _spherical_kmeans(x: np.ndarray, clusters: int, rng, iterations: int = 8, sample: int = 20000) -> np.ndarray:
    """Unit centres of ``clusters`` spherical k-means clusters of (a sample of) the rows of ``x``."""
    pick = x[rng.choice(len(x), min(len(x), sample), replace=False)]
    centres = pick[rng.choice(len(pick), clusters, replace=False)].copy()
    for _ in range(iterations):
        home = (pick @ centres.T).argmax(axis=1)
        sums = np.zeros_like(centres)
        np.add.at(sums, home, pick)
        norm = np.linalg.norm(sums, axis=1, keepdims=True)
        empty = norm[:, 0] < 1e-9
        centres = np.where(empty[:, None], centres, sums / np.maximum(norm, 1e-9))
    return centres.astype(np.float32)


def _knn_candidates(query: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Pairs ``(i, j)`` (``i < j``, unique) of each row and its ``k`` nearest other base rows."""
    idx, _ = nearest(query, base, k, same=True)  # row i of query and of base: the same image
    i = np.repeat(np.arange(len(idx)), idx.shape[1])
    j = idx.ravel()
    ok = j >= 0
    return _unique_pairs(np.minimum(i[ok], j[ok]), np.maximum(i[ok], j[ok]))


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    keep = a != b
    a, b = a[keep].astype(np.int64), b[keep].astype(np.int64)
    if not len(a):
        return np.zeros((0, 2), np.int64)
    key = np.unique(a * (int(max(a.max(), b.max())) + 1) + b)
    w = int(max(a.max(), b.max())) + 1
    return np.stack([key // w, key % w], axis=1)


def _project(vectors: list[np.ndarray], dims: int, seed: int = 0) -> list[np.ndarray]:
    """The vectors projected on the first ``dims`` principal axes of the first set (fitted on a
    sample of at most 5,000 rows) and made unit length: a cheaper search for the same neighbours."""
    base = vectors[0]
    if base.shape[1] <= dims:
        return [v.astype(np.float32) for v in vectors]
    rng = np.random.default_rng(seed)
    sample = base[rng.choice(len(base), min(len(base), 5000), replace=False)].astype(np.float32)
    _, vecs = np.linalg.eigh((sample.T @ sample).astype(np.float64))  # ascending eigenvalues
    axes = vecs[:, ::-1][:, :dims].astype(np.float32)
    out = []
    for v in vectors:
        p = np.empty((len(v), dims), np.float32)
        for s in range(0, len(v), 8192):  # no float32 copy of the whole set
            p[s:s + 8192] = v[s:s + 8192].astype(np.float32) @ axes
        p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-9)
        out.append(p)
    return out


def _descriptors(thumbs: np.ndarray, chunk: int = 4096, workers: int = 1) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Descriptors of the thumbnails and of their centred crops (:data:`ZOOMS`), as float16 (half
    the memory; the scores are computed in float32); chunks in ``workers`` threads."""
    n = len(thumbs)
    out = {z: (np.zeros((n, DESCRIPTOR * DESCRIPTOR), np.float16), np.zeros(n, np.float32)) for z in (1.0, *ZOOMS)}

    def one(job):  # chunks of images: the intermediate arrays stay small
        z, s = job
        out[z][0][s:s + chunk], out[z][1][s:s + chunk] = _band(thumbs[s:s + chunk], z, z)

    _in_threads(one, [(z, s) for z in out for s in range(0, n, chunk)], workers)
    return out


def _pair_scores(desc: dict, coarse: np.ndarray, pairs: np.ndarray, chunk: int = 8192, workers: int = 1) -> np.ndarray:
    """Best similarity of each pair over "neither cropped" and "one is a centred crop of the other";
    -1 where the coarse layouts differ by more than :data:`COARSE_GATE` grey levels (RMS). Each
    descriptor a chunk needs is gathered and widened to float32 once (float16 -> float32 has no
    fast path in numpy: widening each one per comparison took 14 of the 18 s at 60k images)."""
    out = np.empty(len(pairs), np.float32)

    def one(s: int) -> None:
        a, b = pairs[s:s + chunk, 0], pairs[s:s + chunk, 1]
        (u, nrm) = desc[1.0]
        ua, ub = u[a].astype(np.float32), u[b].astype(np.float32)
        na, nb = nrm[a], nrm[b]
        best = _similarity(ua, na, ub, nb)
        for z in ZOOMS:
            zu, zn = desc[z]
            best = np.maximum(best, _similarity(zu[a].astype(np.float32), zn[a], ub, nb))
            best = np.maximum(best, _similarity(ua, na, zu[b].astype(np.float32), zn[b]))
        gate = np.sqrt(((coarse[a] - coarse[b]) ** 2).mean(axis=1)) > COARSE_GATE
        best[gate] = -1.0
        out[s:s + chunk] = best

    _in_threads(one, range(0, len(pairs), chunk), workers)
    return out


def _phash_candidates(hashes: np.ndarray, bits: int, k: int, chunk: int = 256) -> np.ndarray:
    """Pairs ``(i, j)`` whose perceptual hashes differ in at most ``bits`` bits, found with a
    multi-index: the 64 bits are cut into ``bits + 1`` bands, and two hashes within ``bits`` bits
    agree on at least one band (pigeonhole), so only images sharing a band value are compared.
    In each band, an image keeps its ``k`` closest (a set of many equal hashes -- blank images --
    gives ``k`` pairs an image per band, not all pairs)."""
    h = hashes.astype(np.uint64)
    bands = bits + 1
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    found_a, found_b = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        cuts = np.flatnonzero(np.diff(key[order])) + 1
        for run in np.split(order, cuts):
            m = len(run)
            if m < 2:
                continue
            for s in range(0, m, chunk):
                rows = run[s:s + chunk]
                d = np.bitwise_count(h[rows, None] ^ h[None, run]).astype(np.int16)
                d[np.arange(len(rows))[:, None] >= np.arange(m)[None, :] - s] = 99  # each pair once
                close = d <= bits
                # keep each row's k closest: only rows with more than k close hashes need choosing
                # (a row's close hashes are all among its k closest when there are at most k)
                heavy = np.flatnonzero(close.sum(axis=1) > k)
                if len(heavy):
                    top = np.argpartition(d[heavy], min(k, m - 1), axis=1)[:, :k]
                    mask = np.zeros((len(heavy), m), dtype=bool)
                    np.put_along_axis(mask, top, True, axis=1)
                    close[heavy] &= mask
                r, c = np.nonzero(close)
                found_a.append(rows[r])
                found_b.append(run[c])
    if not found_a:
        return np.zeros((0, 2), np.int64)
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    return _unique_pairs(np.minimum(a, b), np.maximum(a, b))


def _band_filter(side: int, scale: float = 1.0) -> np.ndarray:
    """(side, side) matrix of the verification's band-pass (blur :data:`VERIFY_BAND` [0] minus blur
    [1], both times ``scale``)."""
    from scipy import ndimage

    eye = np.eye(side, dtype=np.float32)
    lo, hi = (s * scale * side / 32.0 for s in VERIFY_BAND)
    return (ndimage.gaussian_filter1d(eye, lo, axis=0, mode="nearest")
            - ndimage.gaussian_filter1d(eye, hi, axis=0, mode="nearest"))


def _crop_matrix(c0: float, c1: float, side: int) -> np.ndarray:
    """(side, side) linear interpolation of the part ``[c0, 1 - c1]`` of a row onto the whole row."""
    u = (np.arange(side) + 0.5) / side
    src = np.clip((c0 + u * (1.0 - c0 - c1)) * side - 0.5, 0, side - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, side - 1)
    w = (src - lo).astype(np.float32)
    m = np.zeros((side, side), np.float32)
    np.add.at(m, (np.arange(side), lo), 1 - w)
    np.add.at(m, (np.arange(side), hi), w)
    return m


def verify_pairs(greys: np.ndarray, pairs: np.ndarray, *, crops: Sequence[float] = VERIFY_CROPS,
                 sides: np.ndarray | None = None, chunk: int = 64, workers: int = 1) -> np.ndarray:
    """Verification score of candidate pairs: the best normalized cross-correlation of the two
    images' band-passed detail (:data:`VERIFY_BAND`) when one is taken as a crop of the other
    (each side cut by each fraction of ``crops``) and resized back, either way round.

    ``greys``: (n, S, S) uint8 grey images at :data:`VERIFY`; ``pairs``: (m, 2) indices;
    ``sides``: the shorter side of each source image -- a pair with an image smaller than
    :data:`SMALL_SIDE` pixels (e.g. a copy shrunk to 21 px) has no finer detail to compare, so its
    band is made coarser in proportion (steps of :data:`_SCALES`).
    A resized, re-compressed or slightly cropped copy keeps the same detail in the same place
    (measured on Fashion-MNIST: 0.944 or more); two different pictures of look-alike things
    differ in it (almost all below 0.93), however alike their shapes (plain correlation 0.97-0.99).
    A pair with a flat image (no band-passed detail, :data:`FLAT`) scores 0.

    Computed pair by pair or image by image (:func:`_verify_by_image`: each image's crops once for
    all its pairs; 60k Fashion-MNIST's 354,655 pairs: 8.6 s against 33 s), whichever costs fewer
    multiplications; ``workers`` threads share the work.
    """
    out = np.full(len(pairs), -1.0, np.float32)
    if not len(pairs):
        return out
    if sides is not None:
        small = np.minimum(sides[pairs[:, 0]], sides[pairs[:, 1]]).astype(np.float64)
        want = np.maximum(1.0, SMALL_SIDE / np.maximum(small, 1.0))
        step = np.searchsorted(np.array(_SCALES), want - 1e-9).clip(0, len(_SCALES) - 1)
        for k in np.unique(step):
            sel = np.flatnonzero(step == k)
            out[sel] = _verify_scaled(greys, pairs[sel], crops, _SCALES[k], chunk, workers)
        return out
    return _verify_scaled(greys, pairs, crops, 1.0, chunk, workers)


#: band-passed detail (norm, grey levels) below which an image is flat: a constant image leaves
#: float rounding only (at most 3e-5 at grey 255), one pixel one grey level off gives 0.05-0.1;
#: a pair with a flat side scores 0 (its unit vector would be rounding noise)
FLAT = 1e-3


def _band_unit(greys: np.ndarray, band: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Band-passed (``band @ G @ band.T``), zero-mean, unit-norm images, flattened ``(n, S*S)``
    float32; a flat image (norm below :data:`FLAT`) gives zeros."""
    n, side = len(greys), greys.shape[1]
    out = np.empty((n, side * side), np.float32)
    for s in range(0, n, chunk):
        g = greys[s:s + chunk].astype(np.float32)
        m = len(g)
        b = (g.reshape(m * side, side) @ band.T).reshape(m, side, side).transpose(0, 2, 1)  # (G band^T)^T
        b = (b.reshape(m * side, side) @ band.T).reshape(m, side, side).transpose(0, 2, 1).reshape(m, -1)
        b -= b.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(b, axis=1, keepdims=True)
        out[s:s + chunk] = np.where(norm >= FLAT, b / np.maximum(norm, FLAT), 0.0)
    return out


def _crop_warps(side: int, crops, scale: float) -> np.ndarray:
    """``band @ crop`` for every crop box ``(c0, c1)`` of ``crops`` x ``crops``: ``(K, S, S)``."""
    band = _band_filter(side, scale)
    return np.stack([band @ _crop_matrix(a, b, side) for a in crops for b in crops])


def _in_threads(fn, items, workers: int) -> None:
    """``fn(item)`` for every item, in ``workers`` threads (numpy's matrix products release the GIL)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transfer-dedupe") as pool:
        for f in [pool.submit(fn, it) for it in items]:
            f.result()


def _verify_scaled(greys: np.ndarray, pairs: np.ndarray, crops, scale: float, chunk: int,
                   workers: int = 1) -> np.ndarray:
    """:func:`verify_pairs` at one band scale, by whichever of the two equal computations costs
    less: pair by pair, or image by image (each image's crops computed once for all its pairs)."""
    side, k = greys.shape[1], len(crops) ** 2
    images = len(np.unique(pairs)) if len(pairs) else 0
    per_pair = 2 * len(pairs) * (3 * k * side ** 3 + 2 * k * k * side ** 2)
    per_image = images * (k + k * k) * side ** 3 + 2 * len(pairs) * (k * k * side ** 2 + 2 * side ** 3)
    if per_image < per_pair:
        return _verify_by_image(greys, pairs, crops, scale, workers=workers)
    return _verify_pairwise(greys, pairs, crops, scale, chunk, workers=workers)


def _verify_pairwise(greys: np.ndarray, pairs: np.ndarray, crops, scale: float, chunk: int,
                     workers: int = 1) -> np.ndarray:
    """:func:`verify_pairs` pair by pair, ``chunk`` pairs at a time: the cheaper way for few pairs per image."""
    out = np.full(len(pairs), -1.0, np.float32)
    side = greys.shape[1]
    band = _band_filter(side, scale)
    warps = _crop_warps(side, crops, scale)  # (K, S, S)
    nk = len(warps)
    stacked = warps.reshape(nk * side, side)
    area = float(side * side)
    gram = np.einsum("xjw,xjv->xwv", warps, warps).reshape(nk, side * side)  # R_x^T R_x
    colsum = warps.sum(axis=1)  # (K, S): 1^T R_x
    def one(s: int) -> None:
        p = pairs[s:s + chunk]
        n = len(p)
        best = np.full(n, -1.0, np.float32)
        for col in (0, 1):
            # w[y, x] = R_y A R_x^T (A cropped by box (y, x), band-passed); b: the other image
            a = greys[p[:, col]].astype(np.float32)
            b = _band_unit(greys[p[:, 1 - col]], band).reshape(n, side, side)
            t1 = (stacked @ a).reshape(n, nk, side, side)  # R_y A
            c = np.matmul(b[:, None], warps[None])  # (n, K, S, S): B R_x
            dot = np.matmul(t1.reshape(n, nk, side * side), c.reshape(n, nk, side * side).transpose(0, 2, 1))
            s1 = np.matmul(t1.sum(axis=2), colsum.T)  # (n, Ky, Kx)
            g1 = np.matmul(t1.transpose(0, 1, 3, 2), t1).reshape(n, nk, side * side)  # (R_y A)^T (R_y A)
            var = g1 @ gram.T - s1 * s1 / area
            score = np.where(var >= FLAT ** 2, dot / np.sqrt(np.maximum(var, FLAT ** 2)), 0.0)
            best = np.maximum(best, score.reshape(n, -1).max(axis=1))
        out[s:s + chunk] = best

    _in_threads(one, range(0, len(pairs), chunk), workers)
    return out


def _verify_by_image(greys: np.ndarray, pairs: np.ndarray, crops, scale: float, block: int = 64,
                     workers: int = 1, group: int = 1024) -> np.ndarray:
    """:func:`verify_pairs` image by image: for each image, its K x K crops (band-passed,
    normalized: ``W_yx / std``) once, then a matrix product with the band-passed other images of
    all its pairs. The cheaper way when images have several pairs each (60k Fashion-MNIST:
    354,655 pairs over about 60,000 images). Images go by groups of ``group`` (one group per
    thread at a time: the band-passed partners of a group only, ``block`` images' crops at a
    time), so memory stays at a few tens of MB whatever the number of images."""
    out = np.full(len(pairs), -1.0, np.float32)
    if not len(pairs):
        return out
    side = greys.shape[1]
    area = float(side * side)
    warps = _crop_warps(side, crops, scale)
    band = _band_filter(side, scale)
    nk = len(warps)
    stacked = warps.reshape(nk * side, side)  # rows of R_y, for every y
    # directed pairs (image whose crops are taken, other image), ordered by the first
    first = np.concatenate([pairs[:, 0], pairs[:, 1]])
    other = np.concatenate([pairs[:, 1], pairs[:, 0]])
    which = np.concatenate([np.arange(len(pairs))] * 2)
    order = np.argsort(first, kind="stable")
    first, other, which = first[order], other[order], which[order]
    uniq, starts = np.unique(first, return_index=True)
    ends = np.append(starts[1:], len(first))
    outs = [out] + [out.copy() for _ in range(max(1, workers) - 1)]  # one per thread: np.maximum.at is not atomic

    def one_group(t: int, g: int) -> None:
        lo_g, hi_g = starts[g], ends[min(g + group, len(uniq)) - 1]
        used = np.unique(other[lo_g:hi_g])
        bhat = _band_unit(greys[used], band)
        row = np.searchsorted(used, other[lo_g:hi_g])  # partner rows in bhat, for this group's directed pairs
        for s in range(g, min(g + group, len(uniq)), block):
            m = len(uniq[s:min(s + block, g + group)])
            a = greys[uniq[s:s + m]].astype(np.float32)
            t1 = (stacked @ a.transpose(1, 0, 2).reshape(side, m * side)).reshape(nk * side, m, side)  # R_y A
            # (R_y A) R_x^T: rows (m, y, i), columns (x, j)
            w = t1.transpose(1, 0, 2).reshape(m * nk * side, side) @ stacked.T
            del t1
            w = w.reshape(m, nk, side, nk, side).transpose(0, 1, 3, 2, 4).reshape(m, nk * nk, side * side)
            s1 = w.sum(axis=2)
            var = np.einsum("mkp,mkp->mk", w, w) - s1 * s1 / area
            w *= np.where(var >= FLAT ** 2, 1.0 / np.sqrt(np.maximum(var, FLAT ** 2)), 0.0)[:, :, None]
            for k in range(m):
                lo, hi = starts[s + k], ends[s + k]
                score = (w[k] @ bhat[row[lo - lo_g:hi - lo_g]].T).max(axis=0)
                np.maximum.at(outs[t], which[lo:hi], score)

    groups = list(range(0, len(uniq), group))
    _in_threads(lambda t: [one_group(t, g) for g in groups[t::len(outs)]], range(len(outs)), workers)
    return np.maximum.reduce(outs)


@dataclass
class NearStats:
    """What :func:`near_pairs` did (for the audit's summary)."""

    candidates: int = 0
    prefiltered: int = 0
    verified: int = 0
    refined: int = 0
    seconds: dict = field(default_factory=dict)


def near_pairs_arrays(thumbs: np.ndarray, greys: np.ndarray, hashes: np.ndarray, digests: Sequence[str],
                      sides: np.ndarray | None = None, *, threshold: float = NEAR_THRESHOLD,
                      neighbours: int = NEIGHBOURS, phash_bits: int = PHASH_BITS,
                      stats: NearStats | None = None, workers: int = 2) -> list[tuple[int, int, float]]:
    """:func:`near_pairs` on arrays: thumbnails (n, THUMB, THUMB), verification greys (n, VERIFY,
    VERIFY), perceptual hashes (n,) uint64 and pixel digests; the verification in ``workers``
    threads, every matrix product on one BLAS thread (BLAS's own threads fight over a busy
    machine's cores: a (128 x 32) @ (32 x 8192) product took 15.6 ms with OpenBLAS's two
    threads, 1.9 ms with one, on this 2-core machine at load 3.5)."""
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(1):
        return _near_pairs_arrays(thumbs, greys, hashes, digests, sides, threshold=threshold, neighbours=neighbours,
                                  phash_bits=phash_bits, stats=stats, workers=workers)


def _near_pairs_arrays(thumbs, greys, hashes, digests, sides, *, threshold, neighbours, phash_bits, stats,
                       workers) -> list[tuple[int, int, float]]:
    import time

    n = len(thumbs)
    st = stats if stats is not None else NearStats()
    st.seconds = {}
    if n < 2:
        return []
    from concurrent.futures import ThreadPoolExecutor

    def by_phash():  # beside the neighbour search: mostly Python, while that is mostly matrix products
        t = time.perf_counter()
        found = _phash_candidates(np.asarray(hashes, dtype=np.uint64), phash_bits, neighbours)
        st.seconds["phash"] = time.perf_counter() - t
        return found

    with ThreadPoolExecutor(1, thread_name_prefix="transfer-dedupe-phash") as pool:
        phash = pool.submit(by_phash) if workers > 1 else None
        t = time.perf_counter()
        desc = _descriptors(thumbs, workers=workers)
        plain, zoomed = _project([desc[1.0][0], desc[ZOOMS[-1]][0]], SEARCH_DIMS)
        cands = [_knn_candidates(plain, plain, neighbours)]
        # an original's centred crop finds its cropped copy
        cands.append(_knn_candidates(zoomed, plain, neighbours))
        del plain, zoomed
        st.seconds["neighbours"] = time.perf_counter() - t
        cands.append(phash.result() if phash is not None else by_phash())
    allc = np.concatenate(cands)
    if not len(allc):
        return []
    pairs = _unique_pairs(allc[:, 0], allc[:, 1])
    st.candidates = len(pairs)
    t = time.perf_counter()
    cheap = _pair_scores(desc, _coarse(thumbs), pairs, workers=workers)
    del desc
    pairs, cheap = pairs[cheap >= PREFILTER], cheap[cheap >= PREFILTER]
    st.prefiltered = len(pairs)
    st.seconds["prefilter"] = time.perf_counter() - t
    t = time.perf_counter()
    score = verify_pairs(greys, pairs, sides=sides, workers=workers)
    maybe = (score >= REFINE_FROM) & (score < threshold)
    if maybe.any():  # crops between the grid's steps
        score[maybe] = np.maximum(score[maybe], verify_pairs(greys, pairs[maybe], crops=REFINE_CROPS, sides=sides,
                                                             workers=workers))
    st.verified, st.refined = len(pairs), int(maybe.sum())
    st.seconds["verify"] = time.perf_counter() - t
    if sides is not None and len(pairs):
        # below TINY_SIDE the verification's band is so coarse that different look-alike
        # pictures pass it (8x8 digits: 361 "near duplicates" in 1,797 distinct images); such
        # pairs must also have near-identical descriptors (24/24 planted x1.5 copies kept, 0 others)
        tiny = np.minimum(sides[pairs[:, 0]], sides[pairs[:, 1]]) < TINY_SIDE
        score[tiny & (cheap < TINY_DESCRIPTOR)] = -1.0
    same = np.array([digests[i] == digests[j] for i, j in pairs], dtype=bool)
    score[same] = 1.0
    keep = score >= threshold
    return [(int(i), int(j), float(v)) for (i, j), v in zip(pairs[keep], score[keep])]


def near_pairs(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD, neighbours: int = NEIGHBOURS,
               phash_bits: int = PHASH_BITS) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs ``(i, j, score)`` (``i < j``; exact duplicates included).

    Candidates (nearest descriptors, close perceptual hashes) -> a cheap descriptor score
    (:data:`PREFILTER`) -> the verification of :func:`verify_pairs` at :data:`VERIFY` pixels;
    a pair is a near duplicate from ``threshold``.
    Memory: a few small arrays per image and one block of similarities at a time.
    """
    if len(fps) < 2:
        return []
    return near_pairs_arrays(np.stack([fp.thumb for fp in fps]), np.stack([fp.grey for fp in fps]),
                             np.array([fp.phash for fp in fps], dtype=np.uint64), [fp.pixels for fp in fps],
                             np.array([fp.side for fp in fps]), threshold=threshold, neighbours=neighbours,
                             phash_bits=phash_bits)


def duplicate_groups(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD) -> list[list[int]]:
    """Groups of exact and near duplicates (indices into ``fps``): the :func:`components` of the
    verified pairs, so a chain of copies is one group."""
    return components(len(fps), list(exact_pairs(fps)) + near_pairs(fps, threshold=threshold))


# --------------------------------------------------------------------------- splits


def grouped_split(samples: Sequence, groups: Sequence[Sequence[int]],
                  split: Callable[[list], dict[str, list]]) -> dict[str, list]:
    """Split ``samples`` so that every group of duplicates lands in one part.

    Groups that share a member are one group (their union: a chain of groups never straddles
    the split, whatever grouping the caller made). Each group is represented by its first
    sample; ``split`` (e.g. a stratified :func:`transfer.data.splits.split_samples`) splits the
    representatives and the other members follow theirs. Stratification is by the
    representative's label.

    Args:
        samples: the samples (anything ``split`` takes, with a ``path``).
        groups: index lists into ``samples`` (from :func:`duplicate_groups`).
        split: splits a list of samples into named parts (``{"train": [...], ...}``).

    Returns:
        The parts of ``split``, with every group's members beside its representative.
    """
    links = [(g[0], j) for g in groups for j in g[1:]]
    follower_of: dict[int, list[int]] = {}
    hidden: set[int] = set()
    for g in components(len(samples), links):
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


__all__ = ["Fingerprint", "fingerprint_array", "exact_pairs", "near_pairs", "components",
           "duplicate_groups", "grouped_split", "straddling_groups", "NEAR_THRESHOLD"]


# --------------------------------------------------------------------------- reading


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


def sample_groups(samples: Sequence, root, *, workers: int = 2, threshold: float = NEAR_THRESHOLD) -> list[list[int]]:
    """Duplicate groups (indices into ``samples``, each with a ``path`` relative to ``root``): the
    :func:`components` of the verified pairs.

    This is what ``transfer train --dedupe`` keeps on one side of the split, what
    ``duplicates.csv`` lists and what the warning about duplicates across the split counts; an
    unreadable file belongs to no group.
    """
    from pathlib import Path

    fps = fingerprint_paths([Path(root) / s.path for s in samples], workers=workers)
    ok = [i for i, fp in enumerate(fps) if fp is not None]
    return [[ok[k] for k in g] for g in duplicate_groups([fps[i] for i in ok], threshold=threshold)]


__all__ += ["map_decoded", "fingerprint_paths", "sample_groups"]
