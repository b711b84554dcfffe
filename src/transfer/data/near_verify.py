"""The verification of candidate near-duplicate pairs (:func:`verify_pairs`): the best
normalized cross-correlation of the two images' band-passed detail, one taken as a slight crop
of the other, either way round. Numpy (and scipy's filters), no TensorFlow.

A resized, re-compressed or slightly cropped copy keeps the same detail in the same place;
two different pictures of look-alike things differ in it, however alike their shapes. The
search that proposes the pairs is :mod:`transfer.data.near_search`; a pair is a near duplicate
from :data:`NEAR_THRESHOLD`.

Example::

    score = verify_pairs(greys, np.array([[0, 1], [0, 2]]))     # greys: (n, 32, 32) uint8
    score >= NEAR_THRESHOLD                                     # [True, False]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: default verification score (:func:`verify_pairs`) of a near-duplicate pair
NEAR_THRESHOLD = 0.96
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


def _band_filter(side: int, scale: float = 1.0) -> np.ndarray:
    """(side, side) matrix of the verification's band-pass (blur :data:`VERIFY_BAND` [0] minus blur
    [1], both times ``scale``)."""
    from scipy import ndimage

    eye = np.eye(side, dtype=np.float32)
    lo, hi = (s * scale * side / 32.0 for s in VERIFY_BAND)
    return (ndimage.gaussian_filter1d(eye, lo, axis=0, mode="nearest")
            - ndimage.gaussian_filter1d(eye, hi, axis=0, mode="nearest"))


def interp_rows(src: np.ndarray, size: int) -> np.ndarray:
    """``(len(src), size)`` float32 matrix whose row i interpolates a row of ``size`` pixels
    linearly at position ``src[i]`` (clipped to ``[0, size - 1]``)."""
    src = np.clip(np.asarray(src, np.float64), 0, size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    w = (src - lo).astype(np.float32)
    m = np.zeros((len(src), size), np.float32)
    np.add.at(m, (np.arange(len(src)), lo), 1 - w)
    np.add.at(m, (np.arange(len(src)), hi), w)
    return m


def _crop_matrix(c0: float, c1: float, side: int) -> np.ndarray:
    """(side, side) linear interpolation of the part ``[c0, 1 - c1]`` of a row onto the whole row."""
    u = (np.arange(side) + 0.5) / side
    return interp_rows((c0 + u * (1.0 - c0 - c1)) * side - 0.5, side)


def verify_pairs(greys: np.ndarray, pairs: np.ndarray, *, crops: Sequence[float] = VERIFY_CROPS,
                 sides: np.ndarray | None = None, chunk: int = 64, workers: int = 1) -> np.ndarray:
    """Verification score of candidate pairs: the best normalized cross-correlation of the two
    images' band-passed detail (:data:`VERIFY_BAND`) when one is taken as a crop of the other
    (each side cut by each fraction of ``crops``) and resized back, either way round.

    ``greys``: (n, S, S) uint8 grey images at :data:`~transfer.data.fingerprint.VERIFY`; ``pairs``: (m, 2) indices;
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


def in_threads(fn, items, workers: int) -> None:
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

    in_threads(one, range(0, len(pairs), chunk), workers)
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
    in_threads(lambda t: [one_group(t, g) for g in groups[t::len(outs)]], range(len(outs)), workers)
    return np.maximum.reduce(outs)


__all__ = ["NEAR_THRESHOLD", "REFINE_CROPS", "REFINE_FROM", "VERIFY_CROPS", "in_threads", "interp_rows", "verify_pairs"]
