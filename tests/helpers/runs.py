"""Helpers of the analysis tests: a tiny learnable image folder and a tiny real run."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers.images import make_pattern_folder  # noqa: F401  (20 images per class)


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
