"""Fixtures of the explain tests: one tiny trained run and one object-finding model per session."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from explain_helpers import train_object_model  # noqa: E402


def _pattern_folder(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
    from trainer_helpers import make_pattern_folder

    return make_pattern_folder(root, classes=3, per_class=20, size=16, seed=0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run: arc2 at 16x16, frozen (t000) and fully trainable (t100), 3 classes."""
    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    base = tmp_path_factory.mktemp("explain")
    data = _pattern_folder(base / "data")
    cfg = load_config(None, {
        "data": str(data), "out": str(base / "run"), "backbones": "arc2", "trainable": "0,1",
        "weights": "none", "epochs": 3, "image_size": 16, "batch_size": 16, "patience": 0,
        "workers": 2, "lr": 3e-3, "test": 0.2,
    })
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok, res.failed
    return base / "run"


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run (tests that write into it do not disturb the others)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="session")
def object_model():
    """A small CNN with global average pooling that finds a red or blue 4x4 square (val acc ~1)."""
    model, acc = train_object_model()
    assert acc >= 0.9, f"the object model did not learn (val accuracy {acc:.2f})"
    return model
