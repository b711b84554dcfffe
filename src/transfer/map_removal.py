"""How pixels are removed when a map is tested (numpy; scipy for ROAD, imported when used).

The faithfulness curves (:mod:`transfer.faithfulness`) take pixels away from an image in
the order a map ranks them (:func:`ranks`, ties broken at random) and ask the model again:

* deletion and insertion set a removed pixel to a *baseline* (:func:`substrate`: the
  image's median or mean colour, black, or the image blurred);
* ROAD (Rong et al. 2022) fills the removed pixels by noisy linear imputation
  (:func:`impute_linear`: each the weighted mean of its 8 neighbours, the whole hole one
  sparse linear system, plus Gaussian noise of :data:`ROAD_NOISE` grey levels or the
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


def impute_linear(image: np.ndarray, removed: np.ndarray, *, noise: float = ROAD_NOISE,
                  rng: np.random.Generator | None = None, noise_field: np.ndarray | None = None) -> np.ndarray:
    """Noisy linear imputation (ROAD): removed pixels become the weighted mean of their 8 neighbours.

    One sparse linear system per image holds every removed pixel (edge and diagonal
    neighbours weigh 1/6 and 1/12, neighbours outside the image are left out), so a hole
    is filled smoothly from its rim; Gaussian noise of ``noise`` grey levels is added to
    the filled pixels (``noise_field``, ``(H, W, C)`` standard normals, gives the draws so
    two removals can share them). Values are clipped to 0..255.

    Args:
        image: ``(H, W, C)`` pixels.
        removed: ``(H, W)`` bool, True = impute; not every pixel.

    Example::

        impute_linear(x, map_ >= np.quantile(map_, 0.8))    # the top 20 % filled in
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

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
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = yy + dy, xx + dx
        ok = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        eq = np.flatnonzero(ok)
        nb = ny[ok] * W + nx[ok]
        diag[eq] += wt
        unknown = flat[nb]
        rows.append(eq[unknown])
        cols.append(vid[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        np.add.at(b, eq[~unknown], wt * xf[nb[~unknown]])
    a = csc_matrix((np.concatenate([diag] + vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # symmetric positive definite: no pivoting, a symmetric fill-reducing order (~2x faster than spsolve)
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


__all__ = ["BASELINE_TEXT", "ROAD_NOISE", "impute_linear", "noise_level", "ranks", "substrate"]
