"""A corrupted copy of a real labelled image set, written as ``ROOT/{train,val,test}/<class>/*.png``,
and the truth of what was planted: flipped labels; resized, re-compressed (JPEG) and slightly
cropped copies of train images placed in val / test; blank and noise images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _copy(img: Image.Image, kind: str, rng) -> Image.Image:
    w, h = img.size
    if kind == "resized":
        f = rng.choice([0.75, 1.5, 2.0])
        return img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)
    if kind == "recompressed":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 90)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    c = max(1, round(0.04 * min(w, h)))  # cropped: a few percent off each side
    box = (int(rng.integers(0, c + 1)), int(rng.integers(0, c + 1)), w - int(rng.integers(0, c + 1)),
           h - int(rng.integers(0, c + 1)))
    return img.crop(box)


def write_corrupted(images: np.ndarray, labels: np.ndarray, class_names: list[str], root: Path, *, flips: int,
                    copies: int, blanks: int, noise: int, split=(0.7, 0.15, 0.15), seed: int = 0) -> dict:
    """Write the folder; returns ``{"flipped": [rel], "copies": [(original rel, copy rel)], "blank": [rel],
    "noise": [rel]}`` (paths relative to ``root``)."""
    rng = np.random.default_rng(seed)
    n = len(images)
    order = rng.permutation(n)
    n_tr, n_va = int(split[0] * n), int(split[1] * n)
    part = np.empty(n, dtype=object)
    part[order[:n_tr]], part[order[n_tr:n_tr + n_va]], part[order[n_tr + n_va:]] = "train", "val", "test"
    lab = labels.copy()
    flipped_idx = rng.choice(n, flips, replace=False)
    for i in flipped_idx:
        lab[i] = (lab[i] + rng.integers(1, len(class_names))) % len(class_names)
    truth: dict = {"flipped": [], "copies": [], "blank": [], "noise": []}
    rel = []
    for i in range(n):
        r = f"{part[i]}/{class_names[lab[i]]}/{i:06d}.png"
        rel.append(r)
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").save(root / r)
    truth["flipped"] = [rel[i] for i in flipped_idx]
    train = [i for i in range(n) if part[i] == "train" and i not in set(flipped_idx)]
    kinds = ("resized", "recompressed", "cropped")
    for k, i in enumerate(rng.choice(train, copies, replace=False)):
        kind = kinds[k % 3]
        where = "test" if k % 2 == 0 else "val"
        ext = "jpg" if kind == "recompressed" else "png"
        r = f"{where}/{class_names[lab[i]]}/copy{k:04d}_{kind}.{ext}"
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        _copy(Image.fromarray(images[i]).convert("RGB"), kind, rng).save(root / r)
        truth["copies"].append((rel[i], r))
    h, w = images.shape[1:3]
    for k in range(blanks + noise):
        kind = "blank" if k < blanks else "noise"
        c = class_names[int(rng.integers(len(class_names)))]
        r = f"{('train', 'val', 'test')[k % 3]}/{c}/{kind}{k:04d}.png"
        px = (np.full((h, w, 3), int(rng.integers(0, 256)), np.uint8) if kind == "blank"
              else rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        Image.fromarray(px).save(root / r)
        truth[kind].append(r)
    return truth


def score_audit(rows: list[dict], summary: dict, truth: dict) -> dict:
    """The audit's numbers on the planted truth: cross-split near-duplicate recall / precision
    (pairs), flipped-label precision@k (k = flips) and blank / noise recall."""
    pairs = {frozenset(p) for p in truth["copies"]}
    source = {}
    for a, b in truth["copies"]:
        source[b] = a
    found, correct, reported = set(), 0, 0
    for g in summary["groups"]:
        if len(g["splits"]) < 2:
            continue
        members = g["paths"]
        split_of = {p: p.split("/")[0] for p in members}
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                a, b = members[x], members[y]
                if split_of[a] == split_of[b]:
                    continue
                reported += 1
                same = frozenset((a, b)) in pairs or (source.get(a, a) == source.get(b, b))
                correct += same
                if frozenset((a, b)) in pairs:
                    found.add(frozenset((a, b)))
    k = len(truth["flipped"])
    issues = [r["path"] for r in rows if r["kind"] == "label_issue"][:k]
    flagged = {r["path"] for r in rows if r["kind"] in ("blank", "noise", "outlier")}
    junk = truth["blank"] + truth["noise"]
    return {
        "dup_recall": len(found) / max(1, len(pairs)), "dup_precision": correct / max(1, reported),
        "dup_reported_pairs": reported,
        "flip_precision_at_k": len(set(issues) & set(truth["flipped"])) / max(1, k),
        "flips_by_split": flips_by_split(rows, truth["flipped"]),
        "blank_noise_recall": len(flagged & set(junk)) / max(1, len(junk)),
    }


def flips_by_split(rows: list[dict], flipped, splits=("train", "val", "test"), where: dict | None = None) -> dict:
    """Per split (``where[path]``, or the first folder of a path): planted flips, images flagged as
    label issues, flips among them, precision and recall."""
    issues = {r["path"] for r in rows if r["kind"] == "label_issue"}

    def split_of(p):
        return where.get(p) if where is not None else p.split("/")[0]

    out = {}
    for s in splits:
        mine = {p for p in flipped if split_of(p) == s}
        flagged = {p for p in issues if split_of(p) == s}
        hit = len(mine & flagged)
        out[s] = {"flips": len(mine), "flagged": len(flagged), "found": hit,
                  "precision": hit / len(flagged) if flagged else None, "recall": hit / len(mine) if mine else None}
    return out
