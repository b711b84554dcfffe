"""Digits and idx conversion (plain and .gz), with clear errors for wrong files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.data.datasets import FASHION_MNIST_CLASSES, read_idx, write_digits, write_idx
from transfer.data.folder import index_folder
from transfer.errors import DataError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx_pair(tmp: Path, n=12, h=5, w=4, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    y = (np.arange(n) % 3).astype(np.uint8)
    img = struct.pack(">IIII", 2051, n, h, w) + x.tobytes()
    lab = struct.pack(">II", 2049, n) + y.tobytes()
    op = gzip.open if gz else open
    ip, lp = tmp / ("img.idx" + (".gz" if gz else "")), tmp / ("lab.idx" + (".gz" if gz else ""))
    with op(ip, "wb") as f:
        f.write(img)
    with op(lp, "wb") as f:
        f.write(lab)
    return ip, lp, x, y


def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    info = write_digits(tmp_path / "digits")
    assert info["classes"] == 10 and info["images"] == 1797
    idx = index_folder(tmp_path / "digits")
    assert idx.class_names == [str(i) for i in range(10)] and len(idx.samples) == 1797 and not idx.bad
    d = load_digits()
    first = np.asarray(Image.open(tmp_path / "digits" / str(d.target[0]) / "0000.png"))
    assert first.shape == (8, 8)
    np.testing.assert_array_equal(first, np.rint(d.images[0] * 255 / 16).astype(np.uint8))
    with pytest.raises(DataError, match="not empty"):
        write_digits(tmp_path / "digits")
    assert write_digits(tmp_path / "digits", overwrite=True)["images"] == 1797
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    ip, lp, x, y = write_idx_pair(tmp_path, gz=gz)
    info = write_idx(ip, lp, tmp_path / "out", class_names=["a", "b", "c"])
    assert info == {"out": str(tmp_path / "out"), "classes": 3, "images": 12, "counts": {"a": 4, "b": 4, "c": 4}}
    got = np.asarray(Image.open(tmp_path / "out" / "b" / "0004.png"))
    np.testing.assert_array_equal(got, x[4])
    idx = index_folder(tmp_path / "out")
    assert idx.class_names == ["a", "b", "c"] and len(idx.samples) == 12
    lim = write_idx(ip, lp, tmp_path / "lim", limit=5)
    assert lim["images"] == 5 and sorted(p.name for p in (tmp_path / "lim").iterdir()) == ["0", "1", "2"]


def test_idx_errors(tmp_path):
    ip, lp, x, y = write_idx_pair(tmp_path)
    with pytest.raises(DataError, match="magic number 2049 .*labels file.*expected 2051"):
        write_idx(lp, ip, tmp_path / "o1")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x00\x00\x07abcdefgh")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(junk, kind="images")
    trunc = tmp_path / "trunc"
    trunc.write_bytes(ip.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        write_idx(trunc, lp, tmp_path / "o2")
    (tmp_path / "seven").mkdir()
    ip2, lp2, _, _ = write_idx_pair(tmp_path / "seven", n=7)
    with pytest.raises(DataError, match="12 images but labels file .* holds 7 labels"):
        write_idx(ip, lp2, tmp_path / "o3")
    with pytest.raises(DataError, match="label 2 but only 2 class names"):
        write_idx(ip, lp, tmp_path / "o4", class_names=["a", "b"])
    with pytest.raises(DataError, match="does not exist"):
        write_idx(tmp_path / "nope", lp, tmp_path / "o5")
    badgz = tmp_path / "bad.gz"
    badgz.write_bytes(gzip.compress(ip.read_bytes())[:-20])
    with pytest.raises(DataError, match="cannot read"):
        write_idx(badgz, lp, tmp_path / "o6")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path):
    imgs = sorted(FMNIST.glob("t10k-images*"))[0]
    labs = sorted(FMNIST.glob("t10k-labels*"))[0]
    info = write_idx(imgs, labs, tmp_path / "f", class_names=FASHION_MNIST_CLASSES, limit=200)
    assert info["images"] == 200 and set(info["counts"]) <= set(FASHION_MNIST_CLASSES)
