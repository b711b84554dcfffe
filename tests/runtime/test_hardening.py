"""What a review of the runtime as a hostile user found: output paths, odd file names, bad
options caught before any work (locally and on the Ray driver), bench on bad images."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from transfer.cli import cli
from transfer.errors import BundleError, ConfigError, OutputError
from transfer.runtime.infer import infer


def _rows(path, **kw):
    with open(path, newline="", **kw) as fh:
        return list(csv.DictReader(fh))


def test_output_problems_are_refused_before_any_image_is_read(rt_bundle, rt_data, tmp_path):
    _, bundle = rt_bundle
    img = rt_data / "c0" / "000.png"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):  # a file where a folder must be
        infer(bundle, [img], out=tmp_path / "afile" / "p.csv")
    (tmp_path / "o2" / "predictions.csv").mkdir(parents=True)  # a folder under the output's name
    with pytest.raises(OutputError, match="is a folder"):
        infer(bundle, [img], out=str(tmp_path / "o2") + "/")
    victim = tmp_path / "victim.png"
    shutil.copy(img, victim)
    with pytest.raises(ConfigError, match=r"invalid out: .*victim\.png.*; accepted: a \.csv or \.jsonl file.*not an "
                                          "image"):  # would overwrite an input image
        infer(bundle, [victim], out=victim)
    assert victim.read_bytes() == img.read_bytes()
    with pytest.raises(ConfigError, match=r"invalid fmt: 'csv'; accepted: jsonl, the format the output"):
        infer(bundle, [img], out=tmp_path / "p.jsonl", fmt="csv")
    assert not list(tmp_path.rglob("*.incomplete")) and not list(tmp_path.rglob(".*partial"))
    # the suffix picks the format; '-' is stdout
    infer(bundle, [img], out=tmp_path / "p.jsonl")
    assert json.loads((tmp_path / "p.jsonl").read_text())["status"] == "ok"
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(img), "--out", "-", "-q"])
    assert r.exit_code == 0 and r.output.startswith("path,status") and not (tmp_path / "-").exists()


def test_file_names_that_are_not_utf8_round_trip(rt_bundle, rt_data, tmp_path):
    _, bundle = rt_bundle
    d = os.fsencode(tmp_path / "odd")
    os.mkdir(d)
    raw = os.path.join(d, b"x\xff.png")  # a Latin-1 name on a UTF-8 system
    shutil.copy(rt_data / "c0" / "000.png", os.fsdecode(raw))
    s = infer(bundle, [tmp_path / "odd"], out=tmp_path / "p.csv")
    assert s.ok == 1
    row = _rows(tmp_path / "p.csv", encoding="utf-8", errors="surrogateescape")[0]
    assert os.fsencode(row["path"]) == raw  # the exact bytes: the file can be found again
    infer(bundle, [tmp_path / "odd"], out=tmp_path / "p.jsonl")
    assert os.fsencode(json.loads((tmp_path / "p.jsonl").read_text())["path"]) == raw
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(tmp_path / "odd"), "-q"])  # stdout: escaped, no crash
    assert r.exit_code == 0 and "x\\xff.png,ok" in r.output


def test_paths_are_reported_as_given_and_unreadable_is_not_corrupt(rt_bundle, rt_data, tmp_path, monkeypatch):
    from transfer.data.image import ImageDecodeError, _decode_source

    _, bundle = rt_bundle
    monkeypatch.chdir(rt_data)
    s = infer(bundle, ["./c0", "./c1/000.png"], out=tmp_path / "p.csv")
    paths = [r["path"] for r in _rows(tmp_path / "p.csv")]
    assert paths[0] == "./c0/000.png" and paths[-1] == "./c1/000.png" and s.ok == 21
    with pytest.raises(ImageDecodeError, match="cannot read file"):  # gone between listing and decoding
        _decode_source(tmp_path / "gone.png", tmp_path / "gone.png", 10_000)


def test_ray_options_are_checked_on_the_driver_before_ray_starts(rt_bundle, rt_data, tmp_path, monkeypatch):
    import transfer._ray as tray
    from transfer.runtime.ray_infer import infer_ray

    _, bundle = rt_bundle
    monkeypatch.setattr(tray, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    for kw, err, match in [({"backend": "onnxruntime-fp16"}, BundleError, "no model 'onnx-fp16'"),
                           ({"backend": "tensorrt-int8"}, BundleError, "no TensorRT engine|no tensorrt-int8"),
                           ({"backend": "nope"}, ConfigError, "invalid backend: 'nope'; accepted: one of"),
                           ({"head": "svm"}, BundleError, "no head 'svm'"),
                           ({"providers": "cpu,,cuda"}, ConfigError, "empty name")]:
        with pytest.raises(err, match=match):
            infer_ray(bundle, [rt_data], out=tmp_path / "p.csv", **kw)
    with pytest.raises(ConfigError, match="Parquet"):  # the .parquet copy would overwrite the CSV
        infer_ray(bundle, [rt_data], out=tmp_path / "p.parquet")


def test_tensorrt_backend_errors_at_run_time(rt_bundle, rt_data):
    _, bundle = rt_bundle
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(rt_data / "c0"), "--backend", "tensorrt-int8"])
    assert r.exit_code == 1 and "no tensorrt-int8 engine" in r.output and "--backend onnxruntime" in r.output


def test_bench_skips_bad_images_and_fails_when_nothing_ran(rt_bundle, rt_data, tmp_path):
    from transfer.runtime.bench import bench

    _, bundle = rt_bundle
    d = tmp_path / "imgs"
    shutil.copytree(rt_data / "c0", d)
    (d / "-bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # sorted first: sampled
    (d / "-empty.jpg").write_bytes(b"")
    lines = []
    res = bench(bundle, backends=["onnxruntime"], batches=[2], images=[str(d)], seconds=0.02, min_iters=2,
                progress=lines.append)
    assert res["rows"] and res["decode_skipped"] == 2 and res["decode_files"] == 2  # of 2 x max batch sampled
    assert any("skipped an unreadable image" in s for s in lines)
    with pytest.raises(ConfigError, match="no image files found in"):
        bench(bundle, backends=["onnxruntime"], batches=[2], images=[str(tmp_path / "nope")], progress=None)
    for kw, match in [({"batches": [4, 4]}, r"invalid batches: \[4, 4\]; accepted: .* none twice"),
                      ({"seconds": -1}, "invalid seconds: -1; accepted: a number > 0"),
                      ({"backends": []}, "invalid backends: .*accepted: a comma list of one or more items, each one of "
                                         "onnxruntime, "),
                      ({"head": "svm"}, "no head 'svm'")]:
        with pytest.raises((ConfigError, BundleError), match=match):
            bench(bundle, **{"backends": ["onnxruntime"], "batches": [1], "progress": None, **kw})
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--backends", "tensorrt", "--batch", "1",
                                 "--out", str(tmp_path / "b"), "-q"])
    assert r.exit_code == 3 and "nothing was benchmarked" in r.output
    assert (tmp_path / "b" / "bench.json").is_file() and not (tmp_path / "b" / "bench.png").exists()


def test_outputs_never_destroy_inputs(rt_bundle, rt_data, tmp_path):
    """--out inside the bundle being read (before: infer --out BUNDLE/model.onnx overwrote the
    model), or on an input file, is refused before anything is written."""
    from transfer.runtime.bench import bench

    _, bundle = rt_bundle
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    for target in ("model.onnx", "manifest.json", "preds.csv"):
        r = CliRunner().invoke(cli, ["infer", str(b), str(rt_data / "c0"), "--out", str(b / target), "-q"])
        assert r.exit_code == 2 and "inside the bundle" in r.output, r.output
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    listed = tmp_path / "inputs.jsonl"
    listed.write_text("mine\n")
    with pytest.raises(ConfigError, match="is the input file"):
        infer(b, [rt_data / "c0", listed], out=listed)
    assert listed.read_text() == "mine\n"
    with pytest.raises(ConfigError, match="inside the bundle"):
        bench(b, backends=["onnxruntime"], batches=[1], out=str(b / "bench"), progress=None)
    assert not (b / "bench").exists()


def test_jsonl_keeps_names_that_are_not_utf8_recoverable_for_any_reader(rt_bundle, rt_data, tmp_path):
    import base64

    _, bundle = rt_bundle
    d = os.fsencode(tmp_path / "odd")
    os.mkdir(d)
    raw = os.path.join(d, b"x\xff.png")
    shutil.copy(rt_data / "c0" / "000.png", os.fsdecode(raw))
    shutil.copy(rt_data / "c0" / "001.png", tmp_path / "odd" / "plain.png")
    infer(bundle, [tmp_path / "odd"], out=tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8",
                                                                          errors="surrogateescape").splitlines()]
    assert base64.b64decode(rows[1]["path_b64"]) == raw  # a JSON reader that is not Python gets the bytes too
    assert "path_b64" not in rows[0] and rows[0]["path"].endswith("plain.png")
    assert (tmp_path / "p.jsonl").read_bytes().isascii()  # valid JSON text for every reader


def test_decompression_bombs_are_error_rows_not_a_memory_spike(rt_bundle, tmp_path):
    """Four 8 KB PNGs of 7990 x 7990 1-bit pixels (under the pixel limit) took 1.5 GB to decode;
    now each is an error row found from its header, and the process stays small."""
    import subprocess
    import sys
    import textwrap

    from PIL import Image

    _, bundle = rt_bundle
    d = tmp_path / "bombs"
    d.mkdir()
    Image.new("1", (7990, 7990), 0).save(d / "b0.png", optimize=True)
    for i in range(1, 4):
        shutil.copy(d / "b0.png", d / f"b{i}.png")
    assert (d / "b0.png").stat().st_size < 16_000
    code = textwrap.dedent(f"""
        from transfer.runtime.infer import infer
        s = infer({str(bundle)!r}, [{str(d)!r}], out={str(tmp_path / "p.csv")!r}, workers=4)
        hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
        print(s.errors, int(hwm) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    errors, peak_mb = map(int, r.stdout.split())
    rows = _rows(tmp_path / "p.csv")
    assert errors == 4 and all("too large to decode" in row["error"] for row in rows)
    assert peak_mb < 600, peak_mb  # ONNX Runtime and numpy themselves; one such decode alone is ~300 MB


def test_fifos_are_not_regular_files_and_never_opened(rt_bundle, rt_data, tmp_path):
    _, bundle = rt_bundle
    d = tmp_path / "imgs"
    shutil.copytree(rt_data / "c0", d)
    os.mkfifo(d / "pipe.png")  # opening it would block forever
    s = infer(bundle, [d], out=tmp_path / "p.csv")
    errs = {os.path.basename(r["path"]): r["error"] for r in _rows(tmp_path / "p.csv") if r["status"] == "error"}
    assert errs == {"pipe.png": "not a regular file (a FIFO (named pipe))"} and s.ok == 20
