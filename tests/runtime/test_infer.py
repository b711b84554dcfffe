"""`transfer infer` end to end on real files: parity with Keras, bad files, heads, exit codes."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers.inference import forward
from transfer.cli import cli
from transfer.errors import ConfigError, TamperedBundleError


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_infer_matches_the_trained_keras_model_on_image_files(rt_bundle, rt_data, tmp_path):
    from transfer.data.image import load_image
    from transfer.runfolder import RunFolder
    from transfer.runtime.infer import infer

    run, bundle = rt_bundle
    t = RunFolder(run).trial("best")
    out = tmp_path / "p.jsonl"
    s = infer(bundle, [rt_data], out=out, fmt="jsonl", recursive=True, topk=3, batch=7)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert s.ok == len(rows) == 60 and s.errors == 0
    files = [r["path"] for r in rows]
    x = np.stack([load_image(p, t.image_size) for p in files]).astype(np.float32)
    ref = forward(t.load_model(), x)
    names = RunFolder(run).class_names
    for r, p in zip(rows, ref):
        assert r["top"][0]["class"] == names[int(p.argmax())]
        for e in r["top"]:
            assert abs(e["prob"] - float(p[names.index(e["class"])])) <= 1e-4 + 1e-6  # 6-digit rounding


def test_bad_files_get_error_rows_and_the_run_goes_on(rt_bundle, rt_data, tmp_path):
    from transfer.runtime.infer import exit_code, infer

    _, bundle = rt_bundle
    d = tmp_path / "imgs"
    shutil.copytree(rt_data / "c0", d / "good")
    bad = d / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("hello")
    good_png = (d / "good" / "000.png").read_bytes()
    (bad / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (bad / "dir.jpg").mkdir()
    os.symlink(d, bad / "loop")  # symlink loop in a recursive walk
    Image.new("L", (20, 10), 128).save(bad / "gray16.tiff")  # odd mode, but readable
    out = tmp_path / "p.csv"
    s = infer(bundle, [d, tmp_path / "missing.png"], out=out, recursive=True)
    rows = _rows(out)
    errs = {os.path.basename(r["path"]): r["error"] for r in rows if r["status"] == "error"}
    assert set(errs) == {"empty.jpg", "text.png", "truncated.png", "missing.png"}, errs
    assert "empty" in errs["empty.jpg"] and "no such file" in errs["missing.png"]
    assert s.ok == 21 and s.errors == 4 and len(rows) == 25  # 20 good + gray16, loop visited once
    assert exit_code(s, strict=False) == 0 and exit_code(s, strict=True) == 1
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(bad / "dir.jpg"), str(bad / "empty.jpg"), "-q"])
    assert r.exit_code == 1 and "is a directory" in r.output  # nothing succeeded


def test_heads_network_onnx_and_pickle(rt_bundle, rt_data, tmp_path):
    from transfer.runtime.infer import infer

    _, bundle = rt_bundle
    outs = {}
    for head, fmt in (("network", "onnx"), ("rf", "onnx"), ("rf", "pickle")):
        out = tmp_path / f"{head}-{fmt}.csv"
        infer(bundle, [rt_data], out=out, recursive=True, head=head, head_format=fmt, trust_pickle=fmt == "pickle")
        outs[(head, fmt)] = _rows(out)
    a, b = outs[("rf", "onnx")], outs[("rf", "pickle")]
    assert [r["class1"] for r in a] == [r["class1"] for r in b]
    assert max(abs(float(x["prob1"]) - float(y["prob1"])) for x, y in zip(a, b)) <= 1e-5
    with pytest.raises(Exception, match="no head 'svm'"):
        infer(bundle, [rt_data], out=tmp_path / "x.csv", recursive=True, head="svm")


def test_tampered_pickle_is_never_unpickled(rt_bundle, rt_data, tmp_path):
    from transfer.runtime.infer import infer

    _, bundle = rt_bundle
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    data = bytearray((b / "heads" / "rf.pkl").read_bytes())
    data[-3] ^= 0x01
    (b / "heads" / "rf.pkl").write_bytes(bytes(data))
    with pytest.raises(TamperedBundleError, match="heads/rf.pkl"):
        infer(b, [rt_data], out=tmp_path / "x.csv", recursive=True, head="rf", head_format="pickle")
    assert not (tmp_path / "x.csv").exists()


def test_int8_backend_and_option_errors(rt_bundle, rt_data, tmp_path):
    from transfer.runtime.infer import infer

    _, bundle = rt_bundle
    s = infer(bundle, [rt_data], out=tmp_path / "q.csv", recursive=True, backend="onnxruntime-int8")
    assert s.backend == "onnxruntime-int8" and s.ok == 60
    with pytest.raises(ConfigError, match="not available"):
        infer(bundle, [rt_data], providers="cuda", recursive=True)
    with pytest.raises(ConfigError):
        infer(bundle, [rt_data], batch=0)
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(rt_data), "-r", "--backend", "tensorrt"])
    assert r.exit_code == 1 and "no TensorRT engine" in r.output


def test_cli_writes_csv_and_summary(rt_bundle, rt_data, tmp_path):
    _, bundle = rt_bundle
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(rt_data), "--recursive", "--out", str(out), "--topk", "2"])
    assert r.exit_code == 0, r.output
    assert "60 file(s): 60 predicted, 0 error(s)" in r.output and "CPUExecutionProvider" in r.output
    rows = _rows(out)
    assert len(rows) == 60 and {"class1", "prob1", "class2", "prob2"} <= set(rows[0])
    assert not list(tmp_path.glob(".*partial"))


def test_out_folder_gets_predictions_file_and_providers_are_reported(rt_bundle, rt_data, tmp_path):
    _, bundle = rt_bundle
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(rt_data / "c0"), "--out", str(tmp_path / "preds") + "/"])
    assert r.exit_code == 0, r.output
    assert len(_rows(tmp_path / "preds" / "predictions.csv")) == 20
    assert "providers found: " in r.output and "CPU)" in r.output and "preds/predictions.csv" in r.output
    (tmp_path / "existing").mkdir()  # an existing folder, no trailing slash, JSON lines
    r = CliRunner().invoke(cli, ["infer", str(bundle), str(rt_data / "c0"), "--out", str(tmp_path / "existing"),
                                 "--format", "jsonl", "-q"])
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "existing" / "predictions.jsonl").read_text().splitlines()) == 20
    assert not list(tmp_path.glob("**/*.partial"))
