from __future__ import annotations

import hashlib

import pytest

from transfer.fsutil import atomic_path, read_json, sha256_file, write_json_atomic


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert read_json(p) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_sha256(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_atomic_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from transfer.fsutil import write_text_atomic

    target = tmp_path / "report.md"
    write_text_atomic(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_json_depth_is_bounded_before_parsing(tmp_path):
    from transfer.fsutil import JSONLimitError, json_depth

    assert json_depth('{"a": "[[[\\"]]", "b": [1, {"c": []}]}') == 4  # brackets in strings do not count
    p = tmp_path / "deep.json"
    p.write_text("[" * 200_000 + "]" * 200_000)  # json.load alone raises RecursionError
    with pytest.raises(JSONLimitError, match="nested 200000 levels deep"):
        read_json(p, max_depth=16)
    p.write_text('{"a": 1}' + " " * 100)
    with pytest.raises(JSONLimitError, match="larger than"):
        read_json(p, max_bytes=50)
    assert read_json(p, max_depth=1, max_bytes=1000) == {"a": 1}


def test_atomic_open_renames_when_complete_and_leaves_nothing_when_not(tmp_path):
    from transfer.fsutil import atomic_open

    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    with atomic_open(target) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # a reader sees the old file until the block ends
    assert target.read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
