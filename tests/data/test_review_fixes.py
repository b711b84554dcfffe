"""What --force may replace, check on unusable folders, split-name case, idx class names,
file links across classes, and files the index ignores."""

from __future__ import annotations

import csv
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from transfer.cli import cli
from transfer.data.datasets import write_idx
from transfer.data.folder import index_folder
from transfer.errors import ConfigError, DataError


def idx_pair(tmp: Path, n: int = 6) -> tuple[Path, Path]:
    x = np.arange(n * 9, dtype=np.uint8).reshape(n, 3, 3)
    y = (np.arange(n) % 3).astype(np.uint8)
    (tmp / "i").write_bytes(struct.pack(">IIII", 2051, n, 3, 3) + x.tobytes())
    (tmp / "l").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())
    return tmp / "i", tmp / "l"


# 1. --force replaces only an image-folder dataset, never the current folder


def test_force_refuses_folder_that_is_not_a_dataset(tmp_path):
    i, l = idx_pair(tmp_path)
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
    i, l = idx_pair(tmp_path)
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
    i, l = idx_pair(tmp_path)
    ds = make_folder(tmp_path / "ds", {"0": 1})
    monkeypatch.chdir(ds)
    with pytest.raises(DataError, match="current folder"):
        write_idx(i, l, ".", overwrite=True)
    with pytest.raises(DataError, match="current folder or holds it"):
        write_idx(i, l, "..", overwrite=True)
    res = CliRunner().invoke(cli, ["data", "digits", ".", "--force"])
    assert res.exit_code == 1 and "current folder" in res.output and "Traceback" not in res.output
    assert (ds / "0" / "img000.png").is_file()


# 2. check reports an unusable folder instead of failing on it; training still refuses it


def test_check_lists_bad_files_of_a_class_without_usable_image(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "c").mkdir()
    (root / "c" / "x.jpg").write_text("text")
    (root / "c" / "y.png").write_bytes(b"")
    (root / "empty").mkdir()
    res = CliRunner().invoke(cli, ["data", "check", str(root), "--bad-csv", str(tmp_path / "bad.csv")])
    assert res.exit_code == 1, res.output
    assert "c/x.jpg: not an image" in res.output and "c/y.png: empty" in res.output
    rows = [l.split() for l in res.output.splitlines()]
    assert ["c", "0"] in rows and ["empty", "0"] in rows and ["a", "2"] in rows
    assert "cannot be trained as is" in res.output and "d/empty has no usable image" in res.output
    assert {r["path"] for r in csv.DictReader(open(tmp_path / "bad.csv"))} == {"c/x.jpg", "c/y.png"}
    with pytest.raises(DataError, match=r"d/c has no usable image: all 2 .*c/x.jpg: not an image") as e:
        index_folder(root)
    assert "--bad-csv" in e.value.hint


def test_check_on_folder_with_images_only_in_the_root(tmp_path, write_png):
    root = tmp_path / "d"
    write_png(root / "a.png")
    (root / "cls").mkdir()
    res = CliRunner().invoke(cli, ["data", "check", str(root)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "holds no image files" in res.output and "1 image file(s) lie directly in it" in res.output


# 3. split folder names in any case (tests/data/test_folder.py::test_given_splits); a warning for
#    split-like class folders


def test_split_like_class_folders_warned(tmp_path, make_folder):
    root = tmp_path / "k"
    make_folder(root / "Training", {"cat": 2, "dog": 2})
    make_folder(root / "Testing", {"cat": 1, "dog": 1})
    idx = index_folder(root)
    assert idx.class_names == ["Testing", "Training"]
    assert len(idx.warnings) == 1 and "cat, dog" in idx.warnings[0]
    res = CliRunner().invoke(cli, ["data", "check", str(root)])
    assert "warning: class folders Testing, Training" in res.output
    assert index_folder(make_folder(tmp_path / "plain", {"a": 2, "b": 2})).warnings == []


# 4. idx class names the indexer would skip or read as splits


@pytest.mark.parametrize("names, wrong", [(".a,b,c", ".a"), ("a,Train,c", "Train"), ("a,b,val", "val"),
                                         ("TEST,b,c", "TEST")])
def test_idx_refuses_hidden_and_split_class_names(tmp_path, names, wrong):
    i, l = idx_pair(tmp_path)
    with pytest.raises(ConfigError, match=wrong):
        write_idx(i, l, tmp_path / "o", class_names=names.split(","))
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(cli, ["data", "idx", str(i), str(l), str(tmp_path / "o"), "--classes", names])
    assert res.exit_code == 2 and wrong in res.output and not (tmp_path / "o").exists()


# 5. a file link into another class folder is bad, not a second label


def test_file_link_into_another_class_is_bad(tmp_path, make_folder, write_png):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    os.symlink(root / "b" / "img000.png", root / "a" / "stolen.png")
    os.symlink("img001.png", root / "a" / "same_class.png")
    outside = write_png(tmp_path / "shared" / "o.png")
    os.symlink(outside, root / "b" / "outside.png")
    idx = index_folder(root)
    assert [b.path for b in idx.bad] == ["a/stolen.png"] and "b/img000.png" in idx.bad[0].reason
    paths = {s.path for s in idx.samples}
    assert "a/stolen.png" not in paths and {"a/same_class.png", "b/outside.png", "b/img000.png"} <= paths
    assert idx.counts == {"a": 3, "b": 3}


def test_file_link_across_given_splits_is_bad(tmp_path, make_folder):
    root = tmp_path / "g"
    make_folder(root / "train", {"x": 2, "y": 2})
    make_folder(root / "test", {"x": 1, "y": 1})
    os.symlink(root / "test" / "x" / "img000.png", root / "train" / "x" / "leak.png")
    idx = index_folder(root)
    assert [b.path for b in idx.bad] == ["train/x/leak.png"]
    assert len(idx.given_splits["train"]) == 4


# 6. files the index does not read are counted, not silently dropped


def test_ignored_files_reported(tmp_path, make_folder, write_png):
    from PIL import Image

    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    write_png(root / "loose1.png")
    write_png(root / "loose2.jpg")
    Image.new("RGB", (4, 4)).save(root / "a" / "anim.gif")
    (root / "b" / "notes").write_text("x")
    (root / ".hidden").write_text("x")
    idx = index_folder(root)
    assert {b.path: b.reason for b in idx.ignored} == {
        "a/anim.gif": ".gif is not an image type transfer reads",
        "b/notes": "no extension: not an image type transfer reads",
        "loose1.png": "not in a class folder",
        "loose2.jpg": "not in a class folder",
    }
    res = CliRunner().invoke(cli, ["data", "check", str(root)])
    assert res.exit_code == 0, res.output
    assert "2 file(s) in the data root ignored (not in a class folder): loose1.png, loose2.jpg" in res.output
    assert "1 file(s) ignored (.gif is not an image type transfer reads): a/anim.gif" in res.output
    assert "4 images in 2 classes (one folder per class), 0 bad, 4 ignored" in res.output
