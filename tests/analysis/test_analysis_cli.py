"""`transfer heads / evaluate / features` through click: tables printed, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from helpers.runs import copy_run
from transfer.cli import cli

COMMANDS = (["heads"], ["evaluate"], ["features", "--plot", "pca"])


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_happy_paths(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    r = _invoke("heads", run, "--head", "logreg,rf", "--rf-trees", "20", "-q")
    assert r.exit_code == 0, r.output
    assert "| network |" in r.output and "| logreg |" in r.output and "| rf |" in r.output
    t = json.loads((run / "best.json").read_text())["trial"]
    assert json.loads((run / "heads" / t / "rf.json").read_text())["params"]["n_estimators"] == 20
    r = _invoke("evaluate", run, "--trial", "all", "--samples", "4", "-q")
    assert r.exit_code == 0, r.output
    assert "macro avg" in r.output and "weighted avg" in r.output and r.output.count("accuracy ") >= 2
    r = _invoke("features", run, "--plot", "pca,tsne", "--split", "val")
    assert r.exit_code == 0, r.output
    assert "64-d features" in r.output
    assert (run / "plots" / t / "features_pca.png").is_file() and (run / "plots" / t / "features_tsne.png").is_file()


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c[0])
def test_missing_and_incomplete_run(cmd, tiny_run, tmp_path):
    r = _invoke(cmd[0], tmp_path / "nope", *cmd[1:])
    assert r.exit_code == 1 and "run folder not found" in r.output and "nope" in r.output
    run = copy_run(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "splits")
    (run / "dataset.json").unlink()
    r = _invoke(cmd[0], run, *cmd[1:])
    assert r.exit_code == 1 and "not a complete run folder: missing dataset.json, splits" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c[0])
def test_unknown_and_unfinished_trial(cmd, tiny_run, tmp_path):
    r = _invoke(cmd[0], tiny_run, "--trial", "resnet-t999", *cmd[1:])
    assert r.exit_code == 1 and "no trial named 'resnet-t999'" in r.output
    assert "available: arc2-t000, arc2-t100" in r.output
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "trials" / "arc2-t000" / "model.keras").unlink()
    r = _invoke(cmd[0], run, "--trial", "arc2-t000", *cmd[1:])
    assert r.exit_code == 1 and "trial 'arc2-t000' is not finished (missing model.keras)" in r.output


def test_bad_options(tiny_run):
    r = _invoke("heads", tiny_run, "--head", "rf,boost")
    assert r.exit_code == 2 and "--head: invalid value 'rf,boost'; accepted:" in r.output and "rf, svm, logreg, knn" in r.output
    r = _invoke("heads", tiny_run, "--svm-c", "0")
    assert r.exit_code == 2 and "--svm-c: invalid value 0.0; accepted: a number > 0" in r.output
    r = _invoke("features", tiny_run, "--plot", "umap")
    assert r.exit_code == 2 and "--plot: invalid value 'umap'; accepted:" in r.output and "pca, tsne" in r.output
    r = _invoke("evaluate", tiny_run, "--split", "dev")
    assert r.exit_code == 2 and "dev" in r.output


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c[0])
def test_moved_data_folder(cmd, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    ds = json.loads((run / "dataset.json").read_text())
    ds["root"] = str(tmp_path / "moved-away")
    (run / "dataset.json").write_text(json.dumps(ds))
    r = _invoke(cmd[0], run, *cmd[1:])
    assert r.exit_code == 1, r.output
    assert "the data folder of this run is missing" in r.output and "moved-away" in r.output
    assert not (run / "features").exists() or not any((run / "features").rglob("meta.json"))
