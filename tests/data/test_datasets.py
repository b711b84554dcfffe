"""Digits and idx conversion (plain and .gz), with clear errors for wrong files; what --force may
replace (only an image-folder dataset, never the current folder); idx class names the indexer
would skip or read as splits."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from transfer.cli import cli
from transfer.data.datasets import FASHION_MNIST_CLASSES, read_idx, write_digits, write_idx
from transfer.data.folder import index_folder
from transfer.errors import ConfigError, DataError

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


def test_force_refuses_folder_that_is_not_a_dataset(tmp_path):
    i, l, _, _ = write_idx_pair(tmp_path, n=6, h=3, w=3)
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "a.py").write_text("x = 1\n")
    (proj / "runs" / "r1").mkdir(parents=True)
    (proj / "runs" / "r1" / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match=r"holds more than an image-folder dataset \(runs/r1/, src/a.py\)") as e:
        write_idx(i, l, proj, overwrite=True)
    assert "--force only replaces" in e.value.hint
    assert (proj / "src" / "a.py").read_text() == "x = 1\n" and (proj / "runs" / "r1" / "metrics.json").is_file()
    res = CliRunner().invoke(cli, ["data", "idx", str(i), str(l), str(proj), "--force"])
    assert res.exit_code == 1 and "src/a.py" in res.output and (proj / "src" / "a.py").is_file()


def test_force_replaces_a_dataset_with_hidden_files_only(tmp_path, make_folder):
    i, l, _, _ = write_idx_pair(tmp_path, n=6, h=3, w=3)
    out = make_folder(tmp_path / "out", {"old": 2})
    (out / ".DS_Store").write_bytes(b"x")
    (out / "old" / ".thumbs").write_bytes(b"x")
    old = os.umask(0o022)
    try:
        assert write_idx(i, l, out, overwrite=True)["images"] == 6
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2"]
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0700
    (out / "0" / "nested").mkdir()
    with pytest.raises(DataError, match="0/nested/"):
        write_idx(i, l, out, overwrite=True)
    (out / "0" / "nested").rmdir()
    (out / ".git").mkdir()
    with pytest.raises(DataError, match=r"\.git/"):
        write_idx(i, l, out, overwrite=True)


def test_current_folder_is_never_replaced(tmp_path, monkeypatch, make_folder):
    i, l, _, _ = write_idx_pair(tmp_path, n=6, h=3, w=3)
    ds = make_folder(tmp_path / "ds", {"0": 1})
    monkeypatch.chdir(ds)
    with pytest.raises(DataError, match="current folder"):
        write_idx(i, l, ".", overwrite=True)
    with pytest.raises(DataError, match="current folder or holds it"):
        write_idx(i, l, "..", overwrite=True)
    res = CliRunner().invoke(cli, ["data", "digits", ".", "--force"])
    assert res.exit_code == 1 and "current folder" in res.output and "Traceback" not in res.output
    assert (ds / "0" / "img000.png").is_file()


@pytest.mark.parametrize("names, wrong", [(".a,b,c", ".a"), ("a,Train,c", "Train"), ("a,b,val", "val"),
                                         ("TEST,b,c", "TEST")])
def test_idx_refuses_hidden_and_split_class_names(tmp_path, names, wrong):
    i, l, _, _ = write_idx_pair(tmp_path, n=6, h=3, w=3)
    with pytest.raises(ConfigError, match=wrong):
        write_idx(i, l, tmp_path / "o", class_names=names.split(","))
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(cli, ["data", "idx", str(i), str(l), str(tmp_path / "o"), "--classes", names])
    assert res.exit_code == 2 and wrong in res.output and not (tmp_path / "o").exists()


def test_shapes_folder_is_balanced_indexable_and_says_where_each_shape_is(tmp_path):
    from transfer.data.datasets import SHAPE_CLASSES, read_shape_boxes, shape_images

    r = CliRunner().invoke(cli, ["data", "shapes", str(tmp_path / "shapes"), "--images", "40", "--size", "32"])
    assert r.exit_code == 0, r.output
    idx = index_folder(tmp_path / "shapes")
    assert idx.class_names == sorted(SHAPE_CLASSES) and len(idx.samples) == 40
    boxes = read_shape_boxes(tmp_path / "shapes")
    assert len(boxes) == 40 and all((tmp_path / "shapes" / p).is_file() for p in boxes)
    # the shape is where the box says: its pixels differ from the background around it
    x, y, b = shape_images(40, 32, seed=0)
    for img, (y0, x0, y1, x1) in zip(x, b):
        assert 8 <= y1 - y0 <= 16 and 0 <= y0 and y1 <= 32 and 0 <= x0 and x1 <= 32
        inside = img[y0:y1, x0:x1].astype(float)
        mask = np.zeros(img.shape[:2], bool)
        mask[y0:y1, x0:x1] = True
        assert np.abs(inside.mean((0, 1)) - img[~mask].mean(0)).max() > 30
    assert np.bincount(y).tolist() == [10] * 4
    saved = np.asarray(Image.open(tmp_path / "shapes" / next(iter(boxes))))
    assert saved.shape == (32, 32, 3)
    with pytest.raises(DataError, match="boxes"):
        read_shape_boxes(tmp_path)
