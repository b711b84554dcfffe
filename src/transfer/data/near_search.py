"""The near-duplicate search over many images' fingerprints (:func:`near_pairs_arrays`): resized,
re-compressed or slightly cropped copies, found without comparing every pair. No TensorFlow.

In three steps:

1. *candidates*: each image's :data:`NEIGHBOURS` nearest neighbours by a descriptor -- its
   thumbnail at 16x16, band-passed (fine detail minus the coarse shape), zero-mean, projected
   on 48 principal axes -- also from its centred 9 % crop (:func:`transfer.data.nearest.nearest`:
   exact for small sets, an inverted file beyond), and the images within :data:`PHASH_BITS`
   bits of its perceptual hash (a multi-index);
2. a *cheap score*: the best similarity of the two descriptors, either one also taken as a
   centred crop of 3, 6 or 9 % (:data:`ZOOMS`); pairs whose 4x4 layouts differ
   (:data:`COARSE_GATE`) or scoring below :data:`PREFILTER` are dropped;
3. the *verification* (:func:`transfer.data.near_verify.verify_pairs`): the correlation of the
   two 32x32 images' band-passed detail, one taken as a crop of the other, either way round; a
   near duplicate from ``threshold`` (:data:`~transfer.data.near_verify.NEAR_THRESHOLD`).

Measured (docs/audit.md): on 60,000 Fashion-MNIST images with 300 planted copies, 94 % of the
copies are found (resized 1.0, re-compressed 0.98, cropped 0.84); the other reported pairs are
mostly different photographs that are nearly the same picture, which no pixel score can tell
from copies. The pairs become groups in :mod:`transfer.data.dedupe`.

Example::

    pairs = near_pairs_arrays(Fingerprints.stack(fps))     # [(i, j, score), ...], i < j
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fingerprint import THUMB, Fingerprints
from .near_verify import (
    NEAR_THRESHOLD,
    REFINE_CROPS,
    REFINE_FROM,
    in_threads,
    interp_rows,
    verify_pairs,
)
from .nearest import nearest

#: side of the band-passed descriptor whose cosine scores a pair
DESCRIPTOR = 16
#: candidate pairs whose cheap descriptor score is below this are not verified
PREFILTER = 0.85
#: a pair with an image under TINY_SIDE pixels (8x8 digits, their copies) also needs this
#: descriptor similarity (a cropped 26-px Fashion-MNIST copy must not: its descriptor moves)
TINY_SIDE = 16
TINY_DESCRIPTOR = 0.985
#: dimensions of the descriptor projection the neighbour search uses
SEARCH_DIMS = 48
#: centred crops (as zoom factors) compared too: a copy cropped by a few percent matches one of them
ZOOMS = (1.03, 1.06, 1.09)
#: pairs whose 4x4 block means differ by more than this (RMS grey levels) are not duplicates
COARSE_GATE = 24.0
#: noise floor of the descriptor similarity (squared norm of grey-level noise of about 1 over 256 pixels)
_EPS = 256.0
#: candidates per image: nearest thumbnails, and perceptual hashes within this many bits
NEIGHBOURS = 6
PHASH_BITS = 6


def _resample_matrix(zoom: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Linear interpolation from :data:`THUMB` to :data:`DESCRIPTOR` pixels of the ``1/zoom`` part
    of a row around its centre moved by ``shift`` pixels (a crop enlarged back), as a matrix."""
    c = (THUMB - 1) / 2.0
    u = (np.arange(DESCRIPTOR) + 0.5) * THUMB / DESCRIPTOR - 0.5
    return interp_rows((u - c) / zoom + c + shift, THUMB)


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

    in_threads(one, [(z, s) for z in out for s in range(0, n, chunk)], workers)
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

    in_threads(one, range(0, len(pairs), chunk), workers)
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


@dataclass
class NearStats:
    """What :func:`near_pairs_arrays` did (for the audit's summary)."""

    candidates: int = 0
    prefiltered: int = 0
    verified: int = 0
    refined: int = 0
    seconds: dict = field(default_factory=dict)


def near_pairs_arrays(fps: Fingerprints, *, threshold: float = NEAR_THRESHOLD, neighbours: int = NEIGHBOURS,
                      phash_bits: int = PHASH_BITS, stats: NearStats | None = None,
                      workers: int = 2) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs ``(i, j, score)`` (``i < j``; exact duplicates included) of
    the images ``fps`` (:class:`~transfer.data.fingerprint.Fingerprints`).

    Candidates (``neighbours`` nearest descriptors, perceptual hashes within ``phash_bits``
    bits) -> a cheap descriptor score (:data:`PREFILTER`) -> the verification; a pair is a near
    duplicate from ``threshold``. ``stats`` (a :class:`NearStats`) is filled with what the search
    did. The work runs in ``workers`` threads, every matrix product on one BLAS thread (BLAS's
    own threads fight over a busy machine's cores: a (128 x 32) @ (32 x 8192) product took
    15.6 ms with OpenBLAS's two threads, 1.9 ms with one, on this 2-core machine at load 3.5).
    Memory: a few small arrays per image and one block of similarities at a time.
    """
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(1):
        return _near_pairs_arrays(fps, threshold=threshold, neighbours=neighbours, phash_bits=phash_bits,
                                  stats=stats, workers=workers)


def _near_pairs_arrays(fps: Fingerprints, *, threshold, neighbours, phash_bits, stats,
                       workers) -> list[tuple[int, int, float]]:
    import time

    thumbs, greys, hashes, digests, sides = fps.thumbs, fps.greys, fps.hashes, fps.digests, fps.sides
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


__all__ = ["NEIGHBOURS", "PHASH_BITS", "NearStats", "near_pairs_arrays"]
