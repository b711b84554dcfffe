"""Helpers of the analysis tests: a tiny learnable image folder and a tiny real run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def make_pattern_folder(root: Path, *, classes: int = 3, per_class: int = 20, size: int = 16, seed: int = 0) -> Path:
    """One sub-folder per class; class k = a bright bar at a class-specific place + noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            band = slice(c * size // classes, (c + 1) * size // classes)
            img[band, :, c % 3] = 230
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def build_run(data: Path, out: Path, **kw) -> Path:
    """A real sweep: arc2 at 16x16, random weights, trainable 0 and 1, 2 epochs."""
    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    d = {"data": str(data), "out": str(out), "backbones": "arc2", "trainable": "0,1",
         "weights": "none", "epochs": 2, "image_size": 16, "batch_size": 16, "patience": 0,
         "workers": 2, "lr": 3e-3, "test": 0.2}
    d.update(kw)
    res = run_sweep(load_config(None, d), progress=lambda s: None)
    assert res.ok, res.failed
    return res.run_dir


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run folder (tests that write or break it use one)."""
    shutil.copytree(src, dst)
    return dst
