"""Duplicates across the split: found before training, warned about and listed; ``--dedupe``
keeps every group on one side; the test accuracy without the leaked images is measured.
Groups are chains of verified pairs: an original, a copy and a copy of the copy (real
photographs) stay together though the ends do not verify against each other."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.chains import chain, photo_patches, star_groups
from helpers.trainer import base_overrides
from transfer.trainer.config import load_config
from transfer.trainer.sweep import run_sweep

COPIES = 24


def _digits(root: Path, per_class: int) -> None:
    from transfer.data.datasets import write_digits

    write_digits(root)
    for c in list(root.iterdir()):
        if c.name not in {"0", "1", "2", "3"}:
            shutil.rmtree(c)
        else:
            for f in sorted(c.iterdir())[per_class:]:
                f.unlink()


def _plant_copies(root: Path, n: int) -> list[tuple[str, str]]:
    """``n`` resized (x1.5) copies of images of the folder, beside their originals: (original, copy)."""
    files = sorted(p for p in root.rglob("*.png"))
    pairs = []
    for i, f in enumerate(files[:: max(1, len(files) // n)][:n]):
        with Image.open(f) as im:
            big = im.convert("RGB").resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC)
        copy = f.with_name(f"{f.stem}_copy{i}.png")
        big.save(copy)
        pairs.append((f.relative_to(root).as_posix(), copy.relative_to(root).as_posix()))
    return pairs


def _plant_chains(root: Path, which=(1, 4, 5, 6, 8, 10)) -> list[list[str]]:
    """Chains A~B~C of photo patches (:mod:`helpers.chains`), one per class folder in turn: [[A, B, C]]."""
    patches = photo_patches(12)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for n, k in enumerate(which):
        rels = [f"{classes[n % len(classes)]}/chain{k}_{m}.png" for m in "abc"]
        for rel, im in zip(rels, chain(patches[k])):
            im.save(root / rel)
        out.append(rels)
    return out


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> tuple[Path, list, list]:
    """Digits with resized copies of some, and chains of photo copies whose star grouping breaks."""
    from transfer.data import dedupe
    from transfer.data.fingerprint import fingerprint_paths

    root = tmp_path_factory.mktemp("leaky") / "d"
    _digits(root, 40)
    pairs = _plant_copies(root, COPIES)
    chains = _plant_chains(root)
    broken = 0
    for rels in chains:  # the fixture does exercise chains: a star around A leaves C out
        fps = fingerprint_paths([root / r for r in rels])
        broken += star_groups(3, dedupe.near_pairs(fps)) == [[0, 1]]
    assert broken == len(chains)
    return root, pairs, chains


def _split_of(run: Path) -> dict[str, str]:
    where = {}
    for k in ("train", "val", "test"):
        with open(run / "splits" / f"{k}.csv", newline="") as f:
            where.update({r["path"]: k for r in csv.DictReader(f)})
    return where


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sweep(data: Path, out: Path, said: list, **kw):
    cfg = load_config(None, base_overrides(data, out, trainable="0", epochs=1, test=0.25, **kw))
    res = run_sweep(cfg, progress=said.append)
    assert res.ok, res.failed
    return res


def test_without_dedupe_the_leak_is_warned_listed_and_measured(leaky, tmp_path):
    data, pairs, chains = leaky
    said: list[str] = []
    res = _sweep(data, tmp_path / "run", said)
    where = _split_of(res.run_dir)
    crossing = [(a, b) for a, b in pairs if where[a] != where[b]]
    assert crossing  # a random split puts some planted copies on both sides
    rows = _rows(res.run_dir / "duplicates.csv")
    group_of = {r["path"]: r["group"] for r in rows}
    for a, b in pairs:  # every planted copy is found, grouped with its original
        assert a in group_of and group_of[a] == group_of[b], (a, b)
    straddles = {r["path"] for r in rows if r["straddles"] == "yes"}
    assert all(a in straddles and b in straddles for a, b in crossing)
    # a chain is one group; one across the split is listed as straddling, its ends included
    crossing_chains = [c for c in chains if len({where[q] for q in c}) > 1]
    assert crossing_chains
    for c in chains:
        assert len({group_of[q] for q in c}) == 1, c
    assert all(q in straddles for c in crossing_chains for q in c)
    ds = json.loads((res.run_dir / "dataset.json").read_text())
    rec = ds["duplicates"]
    assert rec["straddling_groups"] >= len(crossing) and rec["dedupe"] is False and ds["split"]["dedupe"] is False
    warning = next(s for s in said if "straddle the split" in s)
    assert str(res.run_dir / "duplicates.csv") in warning
    m = json.loads((res.run_dir / "trials" / "arc2-t000" / "metrics.json").read_text())
    leaked_test = {r["path"] for r in rows if r["straddles"] == "yes" and r["split"] == "test"}
    assert leaked_test
    clean = m["test_without_duplicates"]
    assert clean["left_out"] == len(leaked_test)
    assert clean["images"] + clean["left_out"] == len([p for p, k in where.items() if k == "test"])
    assert 0.0 <= clean["accuracy"] <= 1.0
    # the report shows both test accuracies and the table has the column
    from transfer.analysis.report import write_report

    md = write_report(res.run_dir)["md"].read_text()
    assert f"that have a copy in train or val: {m['test']['accuracy']:.4f}" in md
    assert f"without them ({clean['images']} images): {clean['accuracy']:.4f}" in md
    assert "straddle the split" in md and "test acc. w/o copies" in (res.run_dir / "sweep.md").read_text()


def test_dedupe_keeps_every_group_on_one_side(leaky, tmp_path):
    data, pairs, chains = leaky
    said: list[str] = []
    res = _sweep(data, tmp_path / "run", said, dedupe=True)
    where = _split_of(res.run_dir)
    for a, b in pairs:
        assert where[a] == where[b], (a, b, where[a], where[b])
    for c in chains:  # A~B~C: never across the split, though A and C are no verified pair
        assert len({where[q] for q in c}) == 1, [(q, where[q]) for q in c]
    rows = _rows(res.run_dir / "duplicates.csv")
    groups: dict[str, set] = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(where[r["path"]])
    assert groups and all(len(v) == 1 for v in groups.values())
    ds = json.loads((res.run_dir / "dataset.json").read_text())
    assert ds["split"]["dedupe"] is True and ds["duplicates"]["straddling_groups"] == 0
    assert not any("straddle the split" in s for s in said)
    m = json.loads((res.run_dir / "trials" / "arc2-t000" / "metrics.json").read_text())
    assert "test_without_duplicates" not in m
    # the split is still stratified over the representatives: every class is in every split
    for k in ("train", "val", "test"):
        labels = {r["label"] for r in _rows(res.run_dir / "splits" / f"{k}.csv")}
        assert labels == {"0", "1", "2", "3"}, k


def test_dedupe_on_a_given_split_leaves_the_copies_out_of_test(tmp_path):
    """Folders cannot be re-split: a copy of a training image in test/ is not tested on."""
    src = tmp_path / "src"
    _digits(src, 30)
    data = tmp_path / "given"
    for c in src.iterdir():
        files = sorted(c.iterdir())
        for part, chunk in (("train", files[:22]), ("test", files[22:])):
            (data / part / c.name).mkdir(parents=True)
            for f in chunk:
                shutil.copy(f, data / part / c.name / f.name)
    planted = []
    for c in sorted((data / "train").iterdir()):
        f = sorted(c.iterdir())[0]
        with Image.open(f) as im:
            im.convert("RGB").resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC).save(
                data / "test" / c.name / "leak.png")
        planted.append(f"test/{c.name}/leak.png")
    said: list[str] = []
    res = _sweep(data, tmp_path / "run", said, dedupe=True)
    where = _split_of(res.run_dir)
    assert not any(p in where for p in planted)
    rows = {r["path"]: r for r in _rows(res.run_dir / "duplicates.csv")}
    assert all(rows[p]["action"].startswith("left out") for p in planted)
    ds = json.loads((res.run_dir / "dataset.json").read_text())
    assert ds["duplicates"]["left_out"] >= len(planted)
    assert ds["counts"]["test"] == len([p for p, k in where.items() if k == "test"]) <= 8 * 4


def test_a_resumed_run_keeps_the_pixel_recipe_it_was_made_with(tmp_path):
    """A run made before the current decoding recipe resumes with its own (dataset.json and
    every trial's metrics say which), so its trials stay comparable."""
    from helpers.trainer import make_pattern_folder
    from transfer.data.image import RECIPES

    data = make_pattern_folder(tmp_path / "p")
    out = tmp_path / "run"
    cfg = load_config(None, base_overrides(data, out, trainable="0,1", epochs=1))
    assert run_sweep(cfg, progress=lambda s: None).ok
    shutil.rmtree(out / "trials" / "arc2-t100")  # as if the run had stopped before its second trial
    ds_path = out / "dataset.json"
    ds = json.loads(ds_path.read_text())
    ds["preprocessing"] = RECIPES[1]  # as written by a release before recipe 2
    ds_path.write_text(json.dumps(ds))
    assert run_sweep(cfg, progress=lambda s: None).ok
    assert json.loads(ds_path.read_text())["preprocessing"] == RECIPES[1]
    m = json.loads((out / "trials" / "arc2-t100" / "metrics.json").read_text())
    assert m["recipe"] == 1
    m0 = json.loads((out / "trials" / "arc2-t000" / "metrics.json").read_text())
    assert m0["recipe"] == 2  # trained before the edit: it says what it used


def test_nested_class_folders_are_refused_unless_allowed(tmp_path):
    from helpers.trainer import make_pattern_folder
    from transfer.errors import DataError

    data = make_pattern_folder(tmp_path / "p")
    cls = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (cls / "more").mkdir()
    for f in sorted(cls.glob("*.png"))[:3]:
        shutil.copy(f, cls / "more" / f"n_{f.name}")
    with pytest.raises(DataError, match="more"):
        run_sweep(load_config(None, base_overrides(data, tmp_path / "r1", trainable="0", epochs=1)),
                  progress=lambda s: None)
    res = run_sweep(load_config(None, base_overrides(data, tmp_path / "r2", trainable="0", epochs=1,
                                                     allow_nested=True)), progress=lambda s: None)
    assert res.ok
    ds = json.loads((res.run_dir / "dataset.json").read_text())
    assert ds["num_images"] == sum(1 for _ in data.rglob("*.png"))
    assert np.isfinite(json.loads((res.run_dir / "trials" / "arc2-t000" / "metrics.json").read_text())
                       ["test"]["accuracy"])
