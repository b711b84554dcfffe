"""Splits: determinism, stratification, order independence, fractions, k-fold, CSV."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from transfer.data.folder import Sample
from transfer.data.splits import kfold_splits, read_split_csv, split_samples, write_split_csv
from transfer.errors import ConfigError, DataError


def _samples(counts):
    return [Sample(f"c{lab}/{i:04d}.png", lab) for lab, n in enumerate(counts) for i in range(n)]


def test_stratified_keeps_proportions_and_is_deterministic():
    s = _samples([100, 50, 3, 20])
    a = split_samples(s, val=0.2, test=0.1, seed=7)
    b = split_samples(list(reversed(s)), val=0.2, test=0.1, seed=7)
    shuffled = s[:]
    random.Random(1).shuffle(shuffled)
    c = split_samples(shuffled, val=0.2, test=0.1, seed=7)
    assert a == b == c
    all_paths = [x.path for part in a.values() for x in part]
    assert sorted(all_paths) == sorted(x.path for x in s) and len(set(all_paths)) == len(s)
    val, test = Counter(x.label for x in a["val"]), Counter(x.label for x in a["test"])
    assert val == {0: 20, 1: 10, 2: 1, 3: 4} and test == {0: 10, 1: 5, 2: 1, 3: 2}
    d = split_samples(s, val=0.2, test=0.1, seed=8)
    assert d != a


def test_random_split_is_seeded_shuffle():
    s = _samples([60, 40])
    a = split_samples(s, method="random", val=0.25, test=0.15, seed=3)
    assert a == split_samples(list(reversed(s)), method="random", val=0.25, test=0.15, seed=3)
    assert [len(a[k]) for k in ("train", "val", "test")] == [60, 25, 15]
    assert a != split_samples(s, method="random", val=0.25, test=0.15, seed=4)


def test_test_zero_and_bad_fractions():
    s = _samples([10, 10])
    parts = split_samples(s, val=0.3, test=0.0)
    assert parts["test"] == [] and len(parts["val"]) == 6
    for val, test in ((-0.1, 0.1), (0.6, 0.4), (0.9, 0.2), (float("nan"), 0)):
        with pytest.raises(ConfigError, match="split fraction"):
            split_samples(s, val=val, test=test)
    with pytest.raises(ConfigError, match="accepted: stratified, random"):
        split_samples(s, method="kfold")
    with pytest.raises(DataError):
        split_samples([])


def test_kfold_partitions_and_stratifies():
    s = _samples([30, 20])
    test, folds = kfold_splits(s, 5, seed=1, test=0.1)
    assert len(folds) == 5 and Counter(x.label for x in test) == {0: 3, 1: 2}
    vals = [x for _, v in folds for x in v]
    rest = set(s) - set(test)
    assert sorted(vals, key=lambda x: x.path) == sorted(rest, key=lambda x: x.path)
    for train, val in folds:
        assert set(train) | set(val) == rest and not set(train) & set(val)
        c = Counter(x.label for x in val)
        assert c[0] in (5, 6) and c[1] in (3, 4)
    assert kfold_splits(list(reversed(s)), 5, seed=1, test=0.1) == (test, folds)


def test_kfold_errors():
    s = _samples([10, 3])
    with pytest.raises(ConfigError, match="k >= 2"):
        kfold_splits(s, 1)
    with pytest.raises(DataError, match="at least 5 images per class"):
        kfold_splits(s, 5, test=0.0)


def test_csv_roundtrip(tmp_path):
    s = _samples([3, 2])
    write_split_csv(tmp_path / "splits" / "train.csv", s)
    assert read_split_csv(tmp_path / "splits" / "train.csv") == s
    (tmp_path / "bad.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(DataError, match="line 2"):
        read_split_csv(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="cannot read"):
        read_split_csv(tmp_path / "missing.csv")


def test_classes_too_small_for_the_split_are_named():
    from transfer.data.splits import split_warnings

    samples = [Sample(f"big/{i}.png", 0) for i in range(20)] + [Sample("rare/0.png", 1), Sample("rare/1.png", 1)]
    parts = split_samples(samples, val=0.2, test=0.1, seed=0)
    warnings = split_warnings(parts, ["big", "rare"])
    assert warnings and all("rare (2 images)" in w for w in warnings) and "big" not in " ".join(warnings)
    assert any("no val image" in w for w in warnings) or any("no test image" in w for w in warnings)
    fine = split_samples([Sample(f"{c}/{i}.png", k) for k, c in enumerate("ab") for i in range(10)], val=0.2, test=0.2)
    assert split_warnings(fine, ["a", "b"]) == []
