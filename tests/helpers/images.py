"""Image folders built in code for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_pattern_folder(root: Path, *, classes: int = 3, per_class: int = 20, size: int = 16, seed: int = 0) -> Path:
    """One sub-folder per class; class k = a bright bar at a class-specific place + noise (easy to learn)."""
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
