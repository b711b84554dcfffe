"""Helpers of the trainer tests: a tiny, learnable image folder built in code."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # a subprocess that put only this folder on sys.path
    sys.path.insert(0, _TESTS)

from helpers import images  # noqa: E402

#: 16 images per class unless told otherwise
make_pattern_folder = functools.partial(images.make_pattern_folder, per_class=16)


def base_overrides(data: Path, out: Path, **kw) -> dict:
    """Tiny, fast sweep options (arc2 at 16x16, random weights, 2 epochs)."""
    d = {"data": str(data), "out": str(out), "backbones": "arc2", "trainable": "0,1",
         "weights": "none", "epochs": 2, "image_size": 16, "batch_size": 16, "patience": 0,
         "workers": 2, "lr": 3e-3}
    d.update(kw)
    return d
