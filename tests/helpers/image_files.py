"""Small image files built in code, shared by the runtime and export tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def solid_pngs(folder: Path, values, shape=(5, 7), name="{i:02d}.png") -> list[Path]:
    """One PNG of ``shape`` (height, width) per value, every pixel that value; ``name`` formats ``i``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(values):
        p = folder / name.format(i=i)
        Image.fromarray(np.full((*shape, 3), v, np.uint8)).save(p)
        paths.append(p)
    return paths
