"""`transfer data digits | idx | check` through click's CliRunner; check lists what makes a folder unusable."""

from __future__ import annotations

import csv
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from transfer.cli import cli
from transfer.data.folder import index_folder
from transfer.errors import DataError


def test_digits_and_check(tmp_path):
    r = CliRunner()
    out = tmp_path / "d"
    res = r.invoke(cli, ["data", "digits", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote 1797 images in 10 classes" in res.output
    res = r.invoke(cli, ["data", "digits", str(out)])
    assert res.exit_code == 1 and "not empty" in res.output and "--force" in res.output
    assert r.invoke(cli, ["data", "digits", str(out), "--force"]).exit_code == 0
    (out / "3" / "broken.jpg").write_text("not a jpeg")
    res = r.invoke(cli, ["data", "check", str(out), "--bad-csv", str(tmp_path / "bad.csv")])
    assert res.exit_code == 0, res.output
    assert "3/broken.jpg: not an image" in res.output
    assert "warning: 1 bad file(s) excluded" in res.output
    assert "1797 images in 10 classes" in res.output
    lines = {l.split()[0]: l.split()[1] for l in res.output.splitlines() if l[:1].isdigit() and len(l.split()) == 2}
    assert lines["0"] == "178" and sum(map(int, lines.values())) == 1797
    assert "3/broken.jpg" in (tmp_path / "bad.csv").read_text()


def test_idx_cli_and_errors(tmp_path):
    n = 20
    x = np.full((n, 3, 3), 9, dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    (tmp_path / "i").write_bytes(struct.pack(">IIII", 2051, n, 3, 3) + x.tobytes())
    (tmp_path / "l").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())
    r = CliRunner()
    res = r.invoke(cli, ["data", "idx", str(tmp_path / "i"), str(tmp_path / "l"), str(tmp_path / "o"),
                         "--classes", "fashion-mnist", "--limit", "15"])
    assert res.exit_code == 0, res.output
    assert "wrote 15 images in 10 classes" in res.output and (tmp_path / "o" / "Ankle_boot").is_dir()
    res = r.invoke(cli, ["data", "idx", str(tmp_path / "l"), str(tmp_path / "i"), str(tmp_path / "o2")])
    assert res.exit_code == 1 and "error:" in res.output and "magic number 2049" in res.output
    res = r.invoke(cli, ["data", "idx", str(tmp_path / "i"), str(tmp_path / "l"), str(tmp_path / "o3"),
                         "--classes", "onlyone"])
    assert res.exit_code == 2 and "--classes" in res.output
    res = r.invoke(cli, ["data", "check", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output


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
