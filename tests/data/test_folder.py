"""Indexing folders: layouts, bad files of every kind, file links across classes, files the index
ignores, split-like class folders, errors, cache."""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib

import pytest
from click.testing import CliRunner
from PIL import Image

from transfer.cli import cli
from transfer.data.folder import FileCheck, Sample, index_folder, write_bad_files_csv
from transfer.errors import DataError



def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _jpeg_bytes(size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_basic_index_sorted(three_class):
    idx = index_folder(three_class, workers=3)
    assert idx.class_names == ["cat", "dog", "eel"]
    assert len(idx.samples) == 30 and idx.bad == [] and idx.given_splits is None
    assert [s.path for s in idx.samples] == sorted(s.path for s in idx.samples)
    assert Sample("dog/img000.png", 1) in idx.samples
    assert idx.counts == {"cat": 10, "dog": 12, "eel": 8}


def test_extensions_hidden_nested_and_other_files(tmp_path, make_folder, write_png):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    write_png(root / "a" / "UPPER.PNG")
    Image.new("RGB", (4, 4)).save(root / "a" / "x.JPEG")
    Image.new("RGB", (4, 4)).save(root / "b" / "t.TIFF")
    Image.new("RGB", (4, 4)).save(root / "b" / "w.webp")
    Image.new("RGB", (4, 4)).save(root / "b" / "m.Bmp")
    write_png(root / "a" / "deep" / "er" / "n.png")
    (root / "a" / "notes.txt").write_text("hello")
    Image.new("RGB", (4, 4)).save(root / "a" / "anim.gif")
    write_png(root / "a" / ".hidden.png")
    write_png(root / ".hiddenclass" / "z.png")
    idx = index_folder(root, allow_nested=True)  # a/deep/er/ is accepted as part of class a
    paths = {s.path for s in idx.samples}
    assert {"a/UPPER.PNG", "a/x.JPEG", "b/t.TIFF", "b/w.webp", "b/m.Bmp", "a/deep/er/n.png"} <= paths
    assert not any("hidden" in p or p.endswith((".txt", ".gif")) for p in paths)
    assert idx.class_names == ["a", "b"] and len(idx.samples) == 10


def test_every_bad_kind_listed_and_excluded(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "trunc.jpg").write_bytes(_jpeg_bytes((64, 64))[:300])
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    (root / "b" / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "text.jpg").write_text("this is not an image")
    (root / "b" / "huge.png").write_bytes(_png_header(100000, 100000))
    (root / "a" / "dir.jpg").mkdir()
    os.symlink(root / "a", root / "a" / "loop")  # symlink loop must not hang
    os.symlink(root / "b", root / "a" / "to_b")  # b's files are counted once, in b
    os.symlink("self.png", root / "b" / "self.png")  # a link to itself
    idx = index_folder(root, workers=2)
    bad = {b.path: b.reason for b in idx.bad}
    assert set(bad) == {"a/empty.jpg", "a/trunc.jpg", "b/trunc.png", "b/text.jpg", "b/huge.png", "a/dir.jpg",
                        "b/self.png"}
    assert "cannot read" in bad["b/self.png"]
    assert "empty" in bad["a/empty.jpg"]
    assert "truncated" in bad["a/trunc.jpg"] or "corrupt" in bad["a/trunc.jpg"]
    assert "truncated" in bad["b/trunc.png"] or "corrupt" in bad["b/trunc.png"]
    assert "not an image" in bad["b/text.jpg"]
    assert "absurd" in bad["b/huge.png"]
    assert "directory" in bad["a/dir.jpg"]
    assert len(idx.samples) == 6
    assert not any(s.path in bad for s in idx.samples)
    out = tmp_path / "bad.csv"
    write_bad_files_csv(out, idx.bad)
    rows = list(csv.DictReader(open(out)))
    assert {r["path"] for r in rows} == set(bad)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, make_folder, write_png):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    p = write_png(root / "a" / "secret.png")
    p.chmod(0)
    try:
        idx = index_folder(root)
    finally:
        p.chmod(0o644)
    assert [b.path for b in idx.bad] == ["a/secret.png"]
    assert "cannot read" in idx.bad[0].reason or "denied" in idx.bad[0].reason.lower()


@pytest.mark.parametrize("spelled", [("train", "val", "test"), ("Train", "Val", "TEST")])
def test_given_splits(tmp_path, make_folder, spelled):
    """train/ val/ test/ in any case (downloaded datasets often have Train/ Test/); paths
    keep the folder's own spelling."""
    root = tmp_path / "g"
    tr, va, te = spelled
    make_folder(root / tr, {"x": 4, "y": 3})
    make_folder(root / va, {"x": 1, "y": 2})
    make_folder(root / te, {"y": 1})
    idx = index_folder(root)
    assert idx.class_names == ["x", "y"]
    gs = idx.given_splits
    assert [len(gs[s]) for s in ("train", "val", "test")] == [7, 3, 1]
    assert gs["test"][0] == Sample(f"{te}/y/img000.png", 1)
    assert len(idx.samples) == 11
    if tr != "train":  # two spellings of one split are refused
        make_folder(root / "train", {"x": 1})
        with pytest.raises(DataError, match="both Train/ and train/"):
            index_folder(root)


def test_given_split_class_not_in_train(tmp_path, make_folder):
    root = tmp_path / "g"
    make_folder(root / "train", {"x": 2, "y": 2})
    make_folder(root / "val", {"x": 1, "z": 1})
    with pytest.raises(DataError, match="missing from train.*z"):
        index_folder(root)


def test_errors(tmp_path, make_folder):
    with pytest.raises(DataError, match="does not exist"):
        index_folder(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        index_folder(f)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        index_folder(tmp_path / "empty")
    one = make_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="at least two"):
        index_folder(one)
    nouse = make_folder(tmp_path / "nouse", {"a": 2, "b": 0})
    (nouse / "b").mkdir(exist_ok=True)
    (nouse / "b" / "x.jpg").write_text("text")
    (nouse / "b" / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"nouse/b has no usable image: all 2 image file\(s\) in it are bad"):
        index_folder(nouse)


def test_cache_skips_unchanged_files(tmp_path, monkeypatch, make_folder, write_png):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "bad.png").write_text("nope")
    cache = tmp_path / "cache.json"
    first = index_folder(root, check=FileCheck(cache=cache))
    assert cache.is_file()
    import transfer.data.folder as folder

    calls = []
    real = folder._check_file
    monkeypatch.setattr(folder, "_check_file", lambda p, m: calls.append(p) or real(p, m))
    second = index_folder(root, check=FileCheck(cache=cache))
    assert calls == [] and second.samples == first.samples and second.bad == first.bad
    # a changed file is decoded again
    (root / "a" / "bad.png").unlink()
    write_png(root / "a" / "bad.png", size=(3, 3))
    third = index_folder(root, check=FileCheck(cache=cache))
    assert [p.name for p in calls] == ["bad.png"] and third.bad == []


def test_progress_reports_total(three_class):
    seen = []
    index_folder(three_class, progress=seen.append)  # a line callable: the bar's lines, the last one at the end
    assert seen[-1].startswith("decoding images: 30/30 img")


def test_dimensions_over_max_pixels_named(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / "big.png").write_bytes(_png_header(12000, 9000))
    idx = index_folder(root)
    assert len(idx.bad) == 1 and "12000x9000" in idx.bad[0].reason
    with pytest.raises(DataError, match="no usable image"):
        index_folder(root, check=FileCheck(max_pixels=20))  # 6x5 = 30 pixels > 20: every file refused


def test_split_like_class_folders_warned(tmp_path, make_folder):
    root = tmp_path / "k"
    make_folder(root / "Training", {"cat": 2, "dog": 2})
    make_folder(root / "Testing", {"cat": 1, "dog": 1})
    idx = index_folder(root, allow_nested=True)
    assert idx.class_names == ["Testing", "Training"]
    assert len(idx.warnings) == 1 and "cat, dog" in idx.warnings[0]
    res = CliRunner().invoke(cli, ["data", "check", str(root)])
    assert "warning: class folders Testing, Training" in res.output
    assert index_folder(make_folder(tmp_path / "plain", {"a": 2, "b": 2})).warnings == []


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


def test_nested_sub_folders_are_refused_before_decoding_unless_allowed(tmp_path, make_folder, write_png):
    """Images in sub-folders of a class were silently merged into it."""
    root = make_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    write_png(root / "cat" / "kittens" / "k1.png")
    write_png(root / "cat" / "kittens" / "k2.png")
    write_png(root / "dog" / "2019" / "old" / "d.png")
    with pytest.raises(DataError, match=r"sub-folders.*cat/kittens/ \(2 images\), dog/2019/ \(1 image\)") as e:
        index_folder(root)
    assert "allow-nested" in e.value.hint
    idx = index_folder(root, allow_nested=True)
    assert idx.counts == {"cat": 4, "dog": 3} and "accepted" in idx.warnings[0]
    res = CliRunner().invoke(cli, ["data", "check", str(root), "-q"])
    assert res.exit_code == 1 and "cat/kittens/" in res.output and "cannot be trained as is" in res.output
    assert CliRunner().invoke(cli, ["data", "check", str(root), "--allow-nested", "-q"]).exit_code == 0


def test_class_names_that_differ_only_in_case_are_refused_unless_allowed(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", {"Cat": 2, "cat": 2, "dog": 2})
    with pytest.raises(DataError, match="differ only in case: Cat/ and cat/"):
        index_folder(root)
    idx = index_folder(root, allow_case_clash=True)
    assert idx.class_names == ["Cat", "cat", "dog"] and "accepted" in idx.warnings[0]
    res = CliRunner().invoke(cli, ["data", "check", str(root), "-q"])
    assert res.exit_code == 1 and "Cat/ and cat/" in res.output


def test_fifos_and_devices_are_not_regular_files(tmp_path, make_folder):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    os.mkfifo(root / "a" / "pipe.png")  # opening it would block the index forever
    idx = index_folder(root)
    assert [(b.path, b.reason) for b in idx.bad] == [("a/pipe.png", "not a regular file (a FIFO (named pipe))")]
    if os.path.exists("/dev/null"):
        os.symlink("/dev/null", root / "b" / "null.jpg")
        idx = index_folder(root)
        assert ("b/null.jpg", "not a regular file (a device)") in [(b.path, b.reason) for b in idx.bad]
