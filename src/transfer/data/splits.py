"""Train / val / test splits (stratified or random) and stratified k-fold.

Splits are deterministic: the samples are sorted by path first, so the same seed gives
the same split whatever order the samples came in.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ConfigError, DataError
from ..tables import write_csv
from .folder import Sample

SPLIT_METHODS = ("stratified", "random")


def _check_fractions(val: float, test: float) -> None:
    for name, v in (("val", val), ("test", test)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            raise ConfigError(f"split fraction {name}={v!r} is invalid; it must be a number >= 0",
                              hint="e.g. val 0.2 and test 0.1", option=name)
    if val + test >= 1:
        raise ConfigError(
            f"split fractions val={val} + test={test} = {val + test:g} leave nothing to train on; "
            "val + test must be < 1",
            hint="e.g. val 0.2 and test 0.1", option="val",
        )


def _sorted_unique(samples: Iterable[Sample]) -> list[Sample]:
    return sorted(set(samples), key=lambda s: (s.path, s.label))


def _by_class(samples: list[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.label].append(s)
    return dict(sorted(groups.items()))


def _class_counts(n: int, val: float, test: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of n images: proportional, at least 1 each when n >= 3."""
    n_test = int(round(n * test))
    n_val = int(round(n * val))
    if n >= 3:
        if test > 0:
            n_test = max(1, n_test)
        if val > 0:
            n_val = max(1, n_val)
    # keep at least one training image
    while n_val + n_test > n - 1 and (n_val > 0 or n_test > 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split_samples(
    samples: Iterable[Sample],
    *,
    method: str = "stratified",
    val: float = 0.2,
    test: float = 0.1,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Split samples into ``{"train", "val", "test"}`` lists (each sorted by path).

    Args:
        samples: the dataset's samples (any order; they are sorted first).
        method: ``"stratified"`` keeps class proportions (a class with >= 3 images is in
            every non-empty split); ``"random"`` is a seeded shuffle.
        val, test: fractions, ``0 <= val, test`` and ``val + test < 1``.
        seed: same seed, same split.

    Raises:
        ConfigError: unknown method or invalid fractions.
        DataError: no samples.

    Example::

        parts = split_samples(idx.samples, val=0.2, test=0.1, seed=0)
        sorted(parts)
        # ['test', 'train', 'val']
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(f"unknown split method {method!r}; accepted: {', '.join(SPLIT_METHODS)}")
    _check_fractions(val, test)
    items = _sorted_unique(samples)
    if not items:
        raise DataError("cannot split an empty list of samples")
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    if method == "random":
        rng = np.random.default_rng([int(seed), 0x5EED])
        order = rng.permutation(len(items))
        n = len(items)
        n_val, n_test = _class_counts(n, val, test)
        shuffled = [items[i] for i in order]
        out["test"] = shuffled[:n_test]
        out["val"] = shuffled[n_test:n_test + n_val]
        out["train"] = shuffled[n_test + n_val:]
    else:
        for label, group in _by_class(items).items():
            rng = np.random.default_rng([int(seed), int(label) + 1])
            shuffled = [group[i] for i in rng.permutation(len(group))]
            n_val, n_test = _class_counts(len(group), val, test)
            out["test"].extend(shuffled[:n_test])
            out["val"].extend(shuffled[n_test:n_test + n_val])
            out["train"].extend(shuffled[n_test + n_val:])
    return {k: sorted(v, key=lambda s: s.path) for k, v in out.items()}


def split_warnings(parts: dict[str, list[Sample]], class_names: list[str] | None = None) -> list[str]:
    """Classes too small for the split: a class with no image in a split that exists (val or
    test has images of other classes), so it is never validated or tested. One line a split,
    naming the classes and their image counts; empty when every class is in every split.

    Example::

        split_warnings(split_samples(idx.samples, val=0.2, test=0.1), idx.class_names)
        # ["class(es) with no val image (too few images for the split): rare (1 image)"]
    """
    totals: dict[int, int] = defaultdict(int)
    for v in parts.values():
        for s in v:
            totals[s.label] += 1
    out = []
    for split in ("val", "test"):
        if not parts.get(split):
            continue
        present = {s.label for s in parts[split]}
        missing = [lab for lab in sorted(totals) if lab not in present]
        if missing:
            def name(lab):
                return class_names[lab] if class_names and lab < len(class_names) else str(lab)

            listed = ", ".join(f"{name(lab)} ({totals[lab]} image{'s' if totals[lab] != 1 else ''})"
                               for lab in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            out.append(f"class(es) with no {split} image (too few images for the split): {listed}{more}; "
                       f"their {split} accuracy is not measured")
    return out


def kfold_splits(
    samples: Iterable[Sample], k: int, *, seed: int = 0, test: float = 0.1
) -> tuple[list[Sample], list[tuple[list[Sample], list[Sample]]]]:
    """Hold out a stratified test split, then stratified k-fold over the rest.

    Returns:
        ``(test, [(train_1, val_1), ..., (train_k, val_k)])``; every non-test sample is in
        exactly one ``val_i``.

    Raises:
        ConfigError: ``k < 2`` or an invalid ``test`` fraction.
        DataError: a class has fewer than ``k`` images outside the test split.

    Example::

        test, folds = kfold_splits(idx.samples, 5, seed=0)
        len(folds)
        # 5
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k-fold needs k >= 2 folds (got {k!r})", hint="e.g. 5 folds", option="kfold")
    k = int(k)
    _check_fractions(0.0, test)
    parts = split_samples(samples, method="stratified", val=0.0, test=test, seed=seed)
    rest, test_part = parts["train"], parts["test"]
    groups = _by_class(rest)
    short = {lab: len(g) for lab, g in groups.items() if len(g) < k}
    if short:
        detail = ", ".join(f"class {lab}: {n}" for lab, n in short.items())
        raise DataError(
            f"{k}-fold cross-validation needs at least {k} images per class outside the test "
            f"split; too few in {detail}",
            hint="use fewer folds, a smaller test fraction, or add images",
        )
    folds: list[list[Sample]] = [[] for _ in range(k)]
    offset = 0
    for label, group in groups.items():
        rng = np.random.default_rng([int(seed), int(label) + 1, k])
        for j, i in enumerate(rng.permutation(len(group))):
            folds[(offset + j) % k].append(group[i])
        offset = (offset + len(group)) % k
    result = []
    for i in range(k):
        val_i = sorted(folds[i], key=lambda s: s.path)
        train_i = sorted((s for j in range(k) if j != i for s in folds[j]), key=lambda s: s.path)
        result.append((train_i, val_i))
    return test_part, result


def write_split_csv(path: str | os.PathLike, samples: Iterable[Sample]) -> None:
    """Write ``path,label`` rows atomically (:func:`transfer.tables.write_csv`).

    Example::

        write_split_csv("runs/x/splits/train.csv", parts["train"])
    """
    write_csv(path, ["path", "label"], [[s.path, int(s.label)] for s in samples])


def read_split_csv(path: str | os.PathLike) -> list[Sample]:
    """Read a split written by :func:`write_split_csv`.

    Raises:
        DataError: missing file, wrong header or a bad row (named by line number).

    Example::

        train = read_split_csv("runs/x/splits/train.csv")
    """
    p = Path(path)
    try:
        f = open(p, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read split file {p}: {exc.strerror or exc}") from exc
    out: list[Sample] = []
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["path", "label"]:
            raise DataError(f"split file {p} must start with the header 'path,label' (got {header!r})")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"split file {p}, line {lineno}: expected 2 columns, got {len(row)}")
            try:
                label = int(row[1])
            except ValueError:
                raise DataError(f"split file {p}, line {lineno}: label {row[1]!r} is not an integer") from None
            if label < 0:
                raise DataError(f"split file {p}, line {lineno}: negative label {label}")
            out.append(Sample(row[0], label))
    return out
