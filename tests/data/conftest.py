"""Image folders built in code for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


def write_png(path: Path, value: int = 128, size=(6, 5), mode="RGB") -> Path:
    """A small solid image (width, height) = size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = (value, (value * 3) % 256, 255 - value)
    Image.new(mode, size, rgb if mode == "RGB" else value).save(path)
    return path


def make_folder(root: Path, per_class: dict[str, int], ext: str = ".png") -> Path:
    for c, n in per_class.items():
        for i in range(n):
            write_png(root / c / f"img{i:03d}{ext}", value=(i * 37 + len(c) * 11) % 256)
    return root


@pytest.fixture
def three_class(tmp_path) -> Path:
    return make_folder(tmp_path / "ds", {"cat": 10, "dog": 12, "eel": 8})


@pytest.fixture(name="make_folder")
def _make_folder_fixture():
    return make_folder


@pytest.fixture(name="write_png")
def _write_png_fixture():
    return write_png
