"""Nearest neighbours by cosine: each query row's ``k`` most similar base rows, exact for small
sets and an inverted-file search beyond (:func:`nearest`). Numpy only, no TensorFlow.

Used by the near-duplicate search (:mod:`transfer.data.near_search`: candidates by thumbnail
descriptor) and by the audit's outlier score (mean distance to the nearest neighbours in
feature space).

Example::

    idx, sim = nearest(unit, unit, 10, same=True)    # (n, 10) indices and cosines, best first
"""

from __future__ import annotations

import numpy as np

#: query x base rows up to which :func:`nearest` compares everything (beyond: inverted file)
EXACT_PAIRS = 100_000_000


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


__all__ = ["EXACT_PAIRS", "nearest"]
