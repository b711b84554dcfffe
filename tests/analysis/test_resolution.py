"""The resolution study (TOTV / TVTV) on a real tiny run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from transfer.cli import cli
from transfer.errors import ConfigError
from transfer.runfolder import RunFolder
from transfer.analysis.resolution import class_metrics, degrade, parse_sizes, resolution_study


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_totv_tables_and_consistency(run_copy):
    r = CliRunner().invoke(cli, ["resolution", str(run_copy), "--sizes", "16,8,4", "--mode", "totv", "-q"])
    assert r.exit_code == 0, r.output
    assert "| size | images | accuracy |" in r.output
    d = run_copy / "resolution"
    for f in ("totv.csv", "totv_per_class.csv", "totv.md", "totv.json", "totv.png"):
        assert (d / f).is_file(), f
    summary = _rows(d / "totv.csv")
    assert [s["size"] for s in summary] == ["16", "8", "4"]
    run = RunFolder(run_copy)
    best = run.trial("best")
    n_test = len(run.split("test"))
    for s in summary:
        assert int(s["images"]) == n_test
        for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
            assert 0.0 <= float(s[k]) <= 1.0
    # at the model's own size the degradation is the identity: same accuracy as the trainer's test metric
    assert float(summary[0]["accuracy"]) == pytest.approx(best.metrics["test"]["accuracy"], abs=1e-6)
    per = _rows(d / "totv_per_class.csv")
    assert len(per) == 3 * len(run.class_names)
    assert {p["class"] for p in per} == set(run.class_names)
    assert sum(int(p["support"]) for p in per if p["size"] == "16") == n_test
    md = (d / "totv.md").read_text()
    assert "| c0 |" in md and "16px P / R / F1" in md
    info = json.loads((d / "totv.json").read_text())
    assert info["trial"] == best.name and info["input_size"] == [16, 16]


def test_tvtv_trains_per_size_and_resumes(run_copy):
    lines: list[str] = []
    res = resolution_study(run_copy, sizes="16,8", mode="tvtv", trial="arc2-t100", progress=lines.append)
    assert [s["size"] for s in res.summary] == [16, 8]
    for k in (16, 8):
        sub = run_copy / "resolution" / "tvtv" / f"size{k}"
        trial = RunFolder(sub).trial("arc2-t100")
        assert trial.meta["image_size"] == [k, k]
        for s in ("train", "val", "test"):  # the very same split as the parent run
            assert (sub / "splits" / f"{s}.csv").read_text() == (run_copy / "splits" / f"{s}.csv").read_text()
    assert (run_copy / "resolution" / "tvtv.csv").is_file() and (run_copy / "resolution" / "tvtv.png").is_file()
    again: list[str] = []
    res2 = resolution_study(run_copy, sizes="16,8", mode="tvtv", trial="arc2-t100", progress=again.append)
    assert sum("already done" in ln for ln in again) == 2
    assert res2.summary == res.summary
    # with TOTV too: a side-by-side comparison; at the model's own size both test the same kind of model
    totv = resolution_study(run_copy, sizes="16,8,4", mode="totv", trial="arc2-t100", progress=lambda s: None)
    d = run_copy / "resolution"
    assert all((d / f).is_file() for f in ("compare.csv", "compare.md", "compare.png"))
    rows = _rows(d / "compare.csv")
    assert [r["size"] for r in rows] == ["16", "8", "4"] and rows[2]["tvtv_accuracy"] == ""
    assert float(rows[0]["totv_accuracy"]) == pytest.approx(totv.summary[0]["accuracy"], abs=1e-4)
    assert float(rows[1]["tvtv_accuracy"]) == pytest.approx(res.summary[1]["accuracy"], abs=1e-4)


def test_errors(run_copy, tmp_path):
    with pytest.raises(ConfigError, match="below its minimum"):
        resolution_study(run_copy, sizes="16,4", mode="tvtv", progress=lambda s: None)
    with pytest.raises(ConfigError, match="unknown resolution mode"):
        resolution_study(run_copy, mode="both")
    for bad in ("", "16,x", "0"):
        with pytest.raises(ConfigError):
            parse_sizes(bad)
    r = CliRunner().invoke(cli, ["resolution", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "run folder not found" in r.output
    r = CliRunner().invoke(cli, ["resolution", str(run_copy), "--sizes", "a"])
    assert r.exit_code == 2 and "--sizes" in r.output


def test_helpers():
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, 8:] = 255
    low = degrade(img, 2, (16, 16), recipe=None)
    assert low.shape == (16, 16, 3) and 0 < low[0, 7, 0] < 255  # the edge is blurred
    assert np.array_equal(degrade(img, 16, (16, 16), recipe=None), img)
    s, rows = class_metrics([0, 0, 1, 2], [0, 1, 1, 1], ["a", "b", "c"])
    assert s["accuracy"] == 0.5 and rows[2]["f1"] == 0.0 and rows[1]["precision"] == pytest.approx(1 / 3)
    assert s["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
