"""runfolder.py: clear errors naming what is missing; trial selection."""

from __future__ import annotations

import json

import pytest

from transfer.errors import RunFolderError
from transfer.runfolder import RunFolder


def _run(tmp_path):
    r = tmp_path / "run"
    (r / "splits").mkdir(parents=True)
    (r / "run.json").write_text(json.dumps({"format": "transfer-run", "version": 1}))
    (r / "config.yaml").write_text("seed: 0\n")
    (r / "dataset.json").write_text(json.dumps({"root": str(tmp_path / "data"), "class_names": ["a", "b"]}))
    (r / "splits" / "val.csv").write_text("path,label\na/1.png,0\nb/2.png,1\n")
    return r


def _trial(run, name, state="done", acc=0.5, files=True):
    t = run / "trials" / name
    t.mkdir(parents=True)
    (t / "trial.json").write_text(json.dumps({"name": name, "image_size": [8, 8]}))
    (t / "status.json").write_text(json.dumps({"state": state}))
    if files:
        (t / "model.keras").write_bytes(b"x")
        (t / "metrics.json").write_text(json.dumps({"val": {"accuracy": acc}}))
    return t


def test_missing_and_incomplete(tmp_path):
    with pytest.raises(RunFolderError, match="not found"):
        RunFolder(tmp_path / "nope")
    r = _run(tmp_path)
    (r / "dataset.json").unlink()
    with pytest.raises(RunFolderError, match="missing dataset.json"):
        RunFolder(r)


def test_trials_best_and_errors(tmp_path):
    r = _run(tmp_path)
    _trial(r, "a-t000", acc=0.6)
    _trial(r, "a-t100", acc=0.9)
    _trial(r, "b-random", state="running", files=False)
    run = RunFolder(r)
    assert run.best_trial_name == "a-t100"
    assert run.trial("best").name == "a-t100"
    assert [t.name for t in run.select("all")] == ["a-t000", "a-t100"]
    with pytest.raises(RunFolderError, match="not finished"):
        run.trial("b-random")
    with pytest.raises(RunFolderError, match="no trial named 'zzz'"):
        run.trial("zzz")
    paths, labels = run.split_paths("val")
    assert labels == [0, 1] and paths[0].name == "1.png"
    with pytest.raises(RunFolderError, match="split file missing"):
        run.split("test")


def test_no_finished_trial(tmp_path):
    r = _run(tmp_path)
    _trial(r, "x", state="running", files=False)
    with pytest.raises(RunFolderError, match="no finished trial"):
        RunFolder(r).trial("best")
