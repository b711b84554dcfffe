"""Duplicate groups for splitting are connected components of verified pairs: a chain of copies
(an original, a cropped and enlarged copy, a crop of that copy -- real photographs, built here)
is one group, so it never straddles the split, though its ends do not verify against each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.chains import chain, photo_patches, star_groups
from transfer.data import dedupe
from transfer.data.fingerprint import fingerprint_array
from transfer.data.folder import Sample
from transfer.data.splits import split_samples

#: patches of the sample photos whose chain a star grouping breaks (A~B scores above B~C);
#: checked in test_a_chain_is_one_component_where_a_star_leaves_its_end_out
BROKEN = (1, 4, 5, 6, 8, 10)


@pytest.fixture(scope="module")
def chains():
    patches = photo_patches(12)
    return [[np.asarray(im) for im in chain(patches[k])] for k in BROKEN]


def test_components_of_pairs():
    assert dedupe.components(6, [(0, 1, 0.99), (1, 2, 0.97), (4, 5)]) == [[0, 1, 2], [4, 5]]
    assert dedupe.components(3, []) == []
    # the star around 0 (the best pair first) leaves 2 out
    assert star_groups(3, [(0, 1, 0.99), (1, 2, 0.97)]) == [[0, 1]]
    with pytest.raises(ValueError, match="outside"):
        dedupe.components(2, [(0, 2)])


def test_a_chain_is_one_component_where_a_star_leaves_its_end_out(chains):
    for a, b, c in chains:
        fps = [fingerprint_array(x) for x in (a, b, c)]
        pairs = {(i, j): s for i, j, s in dedupe.near_pairs(fps)}
        assert set(pairs) == {(0, 1), (1, 2)}, pairs  # A~B and B~C verified, A~C not
        assert star_groups(3, [(i, j, s) for (i, j), s in pairs.items()]) == [[0, 1]]
        assert dedupe.duplicate_groups(fps) == [[0, 1, 2]]


def _folder(root: Path, chains, distinct: int = 40) -> list[Sample]:
    """Two classes of distinct photo patches, and the chains (each in one class)."""
    from PIL import Image

    samples = []
    rng = np.random.default_rng(0)
    for k in range(distinct):  # distinct pictures: smooth noise of different seeds
        from scipy import ndimage

        img = (ndimage.gaussian_filter(rng.random((48, 48, 3)), (2, 2, 0)) * 255).astype(np.uint8)
        rel = f"c{k % 2}/d{k:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        samples.append(Sample(rel, k % 2))
    for k, ims in enumerate(chains):
        for m, im in enumerate(ims):
            rel = f"c{k % 2}/chain{k}_{'abc'[m]}.png"
            Image.fromarray(im).save(root / rel)
            samples.append(Sample(rel, k % 2))
    return samples


def test_grouped_split_never_puts_a_chain_across_the_split(chains, tmp_path):
    samples = _folder(tmp_path / "d", chains)
    groups = dedupe.sample_groups(samples, tmp_path / "d")
    at = {s.path: i for i, s in enumerate(samples)}
    chain_idx = [[at[f"c{k % 2}/chain{k}_{m}.png"] for m in "abc"] for k in range(len(chains))]
    assert sorted(map(sorted, groups)) == sorted(chain_idx)  # each chain one group, nothing else
    star = [g[:2] for g in chain_idx]  # what a star grouping gives: C in no group
    straddled_by_star = 0
    for seed in range(10):
        def split(s):
            return split_samples(s, val=0.3, test=0.3, seed=seed)

        parts = dedupe.grouped_split(samples, groups, split)
        assert sorted(s.path for p in parts.values() for s in p) == sorted(s.path for s in samples)
        paths = [[samples[i].path for i in g] for g in chain_idx]
        assert dedupe.straddling_groups(parts, paths) == [], seed
        straddled_by_star += len(dedupe.straddling_groups(dedupe.grouped_split(samples, star, split), paths))
    assert straddled_by_star > 0  # the star groups do let chain ends cross the split


def test_grouped_split_merges_groups_that_share_a_member():
    samples = [Sample(f"c{i % 2}/{i:03d}.png", i % 2) for i in range(40)]
    groups = [[0, 1], [1, 2], [2, 3], [10, 11]]  # 0~1~2~3 one chain, given as overlapping pairs
    for seed in range(10):
        parts = dedupe.grouped_split(samples, groups, lambda s: split_samples(s, val=0.3, test=0.3, seed=seed))
        where = {s.path: k for k, v in parts.items() for s in v}
        assert len({where[samples[i].path] for i in (0, 1, 2, 3)}) == 1
        assert len(where) == 40
