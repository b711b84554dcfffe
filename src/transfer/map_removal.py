"""How pixels are removed when a map is tested (numpy; scipy for ROAD, imported when used).

The faithfulness curves (:mod:`transfer.faithfulness`) take pixels away from an image in
the order a map ranks them (:func:`ranks`, ties broken at random) and ask the model again:

* deletion and insertion set a removed pixel to a *baseline* (:func:`substrate`: the
  image's median or mean colour, black, or the image blurred);
* ROAD (Rong et al. 2022) fills the removed pixels by noisy linear imputation
  (:func:`impute_linear`: each the weighted mean of its 8 neighbours, the whole hole one
  linear system, plus Gaussian noise of :data:`ROAD_NOISE` grey levels or the
  image's own noise level, :func:`noise_level`), so the fill's shape does not tell the
  model where pixels were removed.

scipy comes with scikit-learn; it is imported only when ROAD or the blur baseline runs.

Example::

    from transfer.map_removal import impute_linear, substrate
    filled = impute_linear(x, map_ >= np.quantile(map_, 0.8))    # the top 20 % filled in
    grey = substrate(images, "median")                           # what deletion puts in
"""

from __future__ import annotations

import numpy as np

#: standard deviation (grey levels on 0..255) of the noise ROAD adds to imputed pixels (1 % of the range)
ROAD_NOISE = 2.55
#: the baselines in words
BASELINE_TEXT = {"median": "the image's median colour", "mean": "the image's mean colour", "zero": "black",
                 "blur": "the image blurred"}


def ranks(m: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Rank of each pixel (0 = highest map value), ties broken by ``ties`` (random keys, one per pixel)."""
    flat = m.reshape(-1).astype(np.float64)
    order = np.lexsort((ties, -flat))
    rank = np.empty(flat.size, np.int64)
    rank[order] = np.arange(flat.size)
    return rank


#: the 8 neighbours of a pixel and their weights in the ROAD imputation (Rong et al. 2022)
_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
               (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


#: above this (bandwidth + 1)^2 x unknowns a hole is solved by sparse LU, below it by banded Cholesky:
#: banded was 2-4x faster up to 128 x 128 and still faster at 448 x 448; at 640 x 640 LU was 2.1x
#: faster for 30 % removed (1.9e10) (``benchmarks/bench_road.py``, docs/benchmarks.md)
BANDED_WORK = 2e10


def impute_linear(image: np.ndarray, removed: np.ndarray, *, noise: float = ROAD_NOISE,
                  rng: np.random.Generator | None = None, noise_field: np.ndarray | None = None) -> np.ndarray:
    """Noisy linear imputation (ROAD): removed pixels become the weighted mean of their 8 neighbours.

    One sparse linear system per image holds every removed pixel (edge and diagonal
    neighbours weigh 1/6 and 1/12, neighbours outside the image are left out), so a hole
    is filled smoothly from its rim; Gaussian noise of ``noise`` grey levels is added to
    the filled pixels (``noise_field``, ``(H, W, C)`` standard normals, gives the draws so
    two removals can share them). Values are clipped to 0..255.

    The system is symmetric positive definite (every hole touches a known pixel). In the
    removed pixels' row-major order its bandwidth is at most the image width plus one, so
    it is solved as a banded Cholesky (:func:`scipy.linalg.solveh_banded`) unless that costs
    more than :data:`BANDED_WORK`, then by sparse LU with a symmetric fill-reducing order.

    Args:
        image: ``(H, W, C)`` pixels.
        removed: ``(H, W)`` bool, True = impute; not every pixel.

    Example::

        impute_linear(x, map_ >= np.quantile(map_, 0.8))    # the top 20 % filled in
    """
    x = np.asarray(image, dtype=np.float64)
    H, W, C = x.shape
    flat = np.asarray(removed, bool).reshape(-1)
    idx = np.flatnonzero(flat)
    out = x.copy()
    if idx.size == 0:
        return out.astype(np.float32)
    if idx.size == flat.size:
        raise ValueError("cannot impute every pixel of an image: nothing is left to impute from")
    n = idx.size
    vid = np.full(flat.size, -1, np.int64)
    vid[idx] = np.arange(n)
    yy, xx = np.divmod(idx, W)
    xf = x.reshape(-1, C)
    diag = np.zeros(n)
    b = np.zeros((n, C))
    lower_rows, lower_cols, lower_vals = [], [], []  # each pair of removed neighbours once: (later, earlier)
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = yy + dy, xx + dx
        ok = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        eq = np.flatnonzero(ok)
        nb = ny[ok] * W + nx[ok]
        diag[eq] += wt
        unknown = flat[nb]
        if dy > 0 or (dy == 0 and dx > 0):
            lower_rows.append(vid[nb[unknown]])
            lower_cols.append(eq[unknown])
            lower_vals.append(np.full(int(unknown.sum()), -wt))
        np.add.at(b, eq[~unknown], wt * xf[nb[~unknown]])
    rows, cols, vals = (np.concatenate(a) for a in (lower_rows, lower_cols, lower_vals))
    band = int((rows - cols).max()) if rows.size else 0
    if (band + 1) ** 2 * n <= BANDED_WORK:
        from scipy.linalg import solveh_banded

        ab = np.zeros((band + 1, n))  # lower form: ab[d, j] = A[j + d, j]
        ab[0] = diag
        ab[rows - cols, cols] = vals
        v = solveh_banded(ab, b, lower=True, check_finite=False)
    else:
        from scipy.sparse import csc_matrix
        from scipy.sparse.linalg import splu

        everything = np.arange(n)
        a = csc_matrix((np.concatenate([diag, vals, vals]), (np.concatenate([everything, rows, cols]),
                                                              np.concatenate([everything, cols, rows]))), shape=(n, n))
        # no pivoting, a symmetric fill-reducing order (~2x faster than spsolve)
        lu = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        v = np.asarray(lu.solve(b)).reshape(n, C)
    if noise:
        z = (noise_field.reshape(-1, C)[idx] if noise_field is not None
             else (rng or np.random.default_rng()).standard_normal((n, C)))
        v = v + noise * z
    out.reshape(-1, C)[idx] = v
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def noise_level(images: np.ndarray) -> np.ndarray:
    """Each image's pixel noise (grey levels): a robust estimate from differences of horizontal neighbours.

    The median absolute difference of neighbouring pixels / (0.6745 * sqrt(2)) is the
    standard deviation of white noise on a locally flat image; edges barely move a median.
    """
    x = np.asarray(images, dtype=np.float64)
    d = np.abs(np.diff(x, axis=2)).reshape(len(x), -1)
    return np.median(d, axis=1) / (0.6745 * np.sqrt(2.0)) if d.size else np.zeros(len(x))


def substrate(images: np.ndarray, baseline: str) -> np.ndarray:
    """What removed pixels become in deletion / insertion (``(N, H, W, C)`` float32).

    ``median``: each image's median colour (per channel) -- its background where one colour
    dominates (black behind a digit, the background colour behind a shape), so a removed
    pixel looks like "nothing there"; ``mean``: its mean colour; ``zero``: black; ``blur``: the
    image blurred (Gaussian, sigma = 1/8 of the longer side; RISE's insertion start).
    """
    x = np.asarray(images, dtype=np.float32)
    n, H, W, C = x.shape
    if baseline == "zero":
        return np.zeros_like(x)
    if baseline == "blur":
        from scipy.ndimage import gaussian_filter

        s = max(H, W) / 8
        return np.stack([gaussian_filter(xi, sigma=(s, s, 0), mode="nearest") for xi in x]).astype(np.float32)
    flat = x.reshape(n, -1, C)
    colour = np.median(flat, axis=1) if baseline == "median" else flat.mean(axis=1)
    return np.broadcast_to(colour[:, None, None, :], x.shape).astype(np.float32)


__all__ = ["BANDED_WORK", "BASELINE_TEXT", "ROAD_NOISE", "impute_linear", "noise_level", "ranks", "substrate"]
