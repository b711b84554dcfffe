"""Duplicate images grouped, and splits that keep every group on one side. No TensorFlow.

Exact duplicates have the same decoded pixels (:class:`~transfer.data.fingerprint.Fingerprint`'s
``pixels``); near duplicates -- resized, re-compressed or slightly cropped copies -- are the
verified pairs of the search in :mod:`transfer.data.near_search` (:func:`near_pairs`).

Pairs are merged into *components* (:func:`components`): every image linked to another by a
chain of verified pairs is in its group, so a crop of a resized copy of an original joins the
original's group even when the crop and the original do not verify against each other.
Everything that keeps groups on one side or warns about a group across the split uses them
(:func:`duplicate_groups`, :func:`sample_groups`, :func:`grouped_split`) and the audit. (Star
groups -- each member a verified duplicate of the group's first image, as before -- let such a
crop land in test while the original trains.) On 60,000 Fashion-MNIST images the components are
small: 205 groups of 2-7 images where star groups made 210 of 2-5 (docs/audit.md).

Training uses the groups so that a group never straddles train / val / test
(:func:`grouped_split`); :func:`straddling_groups` lists the groups a split already
straddles.

Example::

    fps = [fingerprint_array(load_image(p)) for p in paths]
    groups = duplicate_groups(fps)                   # [[0, 7], [3, 4, 9], ...]
    parts = grouped_split(samples, groups, lambda s: split_samples(s, val=0.2, test=0.1))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .fingerprint import Fingerprint, Fingerprints, fingerprint_paths
from .near_search import NEIGHBOURS, PHASH_BITS, near_pairs_arrays
from .near_verify import NEAR_THRESHOLD


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


def near_pairs(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD, neighbours: int = NEIGHBOURS,
               phash_bits: int = PHASH_BITS) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs ``(i, j, score)`` (``i < j``; exact duplicates included) of a
    list of fingerprints: :func:`transfer.data.near_search.near_pairs_arrays` on their arrays.

    Candidates (nearest descriptors, close perceptual hashes) -> a cheap descriptor score
    -> the verification of :func:`transfer.data.near_verify.verify_pairs`; a pair is a near
    duplicate from ``threshold``.
    """
    if len(fps) < 2:
        return []
    return near_pairs_arrays(Fingerprints.stack(fps), threshold=threshold, neighbours=neighbours,
                             phash_bits=phash_bits)
def duplicate_groups(fps: Sequence[Fingerprint], *, threshold: float = NEAR_THRESHOLD) -> list[list[int]]:
    """Groups of exact and near duplicates (indices into ``fps``): the :func:`components` of the
    verified pairs, so a chain of copies is one group."""
    return components(len(fps), list(exact_pairs(fps)) + near_pairs(fps, threshold=threshold))

def sample_groups(samples: Sequence, root, *, workers: int = 2, threshold: float = NEAR_THRESHOLD) -> list[list[int]]:
    """Duplicate groups (indices into ``samples``, each with a ``path`` relative to ``root``): the
    :func:`components` of the verified pairs.

    This is what ``transfer train --dedupe`` keeps on one side of the split, what
    ``duplicates.csv`` lists and what the warning about duplicates across the split counts; an
    unreadable file belongs to no group.
    """
    fps = fingerprint_paths([Path(root) / s.path for s in samples], workers=workers)
    ok = [i for i, fp in enumerate(fps) if fp is not None]
    return [[ok[k] for k in g] for g in duplicate_groups([fps[i] for i in ok], threshold=threshold)]


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


__all__ = [
    "components",
    "duplicate_groups",
    "exact_pairs",
    "grouped_split",
    "near_pairs",
    "sample_groups",
    "straddling_groups",
]
