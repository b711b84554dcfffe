"""Classical heads on cached features: the comparison table, saved records, tamper refusal."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
import sklearn

from helpers.runs import copy_run
from transfer.analysis.features import load_split
from transfer.analysis.head_study import ensure_head, fit_heads
from transfer.classical_heads import HeadIntegrityError, load_head, make_estimator
from transfer.errors import ConfigError
from transfer.fsutil import sha256_file
from transfer.runfolder import RunFolder


@pytest.fixture(scope="module")
def headed_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with rf / svm / logreg fitted on both trials (fewer trees: fast)."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("heads") / "run")
    rows = fit_heads(run, "all", ("rf", "svm", "logreg"), {"rf": {"n_estimators": 50}})
    return run, rows


def test_table_has_network_and_three_heads(headed_run):
    run, rows = headed_run
    run_folder = RunFolder(run)
    trials = [t.name for t in run_folder.finished_trials()]
    assert [r["trial"] for r in rows] == [t for t in trials for _ in range(4)]
    for t in trials:
        mine = [r for r in rows if r["trial"] == t]
        assert [r["head"] for r in mine] == ["network", "rf", "svm", "logreg"]
        for r in mine:
            for s in ("train", "val", "test"):
                assert 0.0 <= r[f"{s}_accuracy"] <= 1.0
            assert r["predict_ms_per_image"] > 0
        assert all(r["fit_seconds"] > 0 for r in mine)
        # the network row is the model's own softmax on the same images
        d = load_split(run, t, "test")
        net = mine[0]
        assert net["test_accuracy"] == pytest.approx(float(np.mean(np.argmax(d["probs"], 1) == d["y"])))
        # the classical heads learn the (easy) patterns
        assert all(r["train_accuracy"] >= 0.9 for r in mine[1:])
        with open(run / "heads" / t / "heads.csv") as f:
            table = list(csv.DictReader(f))
        assert [r["head"] for r in table] == ["network", "rf", "svm", "logreg"]
        md = (run / "heads" / t / "heads.md").read_text()
        assert "| head | estimator | train acc | val acc | test acc | fit s | predict ms/img |" in md
        for h in ("network", "rf", "svm", "logreg"):
            assert f"| {h} |" in md


def test_saved_records_and_load_head(headed_run):
    run, rows = headed_run
    run_folder = RunFolder(run)
    t = run_folder.best_trial_name
    X, y = (load_split(run, t, "test")[k] for k in ("X", "y"))
    for kind, cls in (("rf", "RandomForestClassifier"), ("svm", "Pipeline"), ("logreg", "Pipeline")):
        pkl = run / "heads" / t / f"{kind}.pkl"
        meta = json.loads(pkl.with_suffix(".json").read_text())
        assert meta["kind"] == kind and meta["estimator"] == cls
        assert meta["sha256"] == sha256_file(pkl)
        assert meta["sklearn"] == sklearn.__version__
        assert meta["feature_dim"] == 64 and meta["classes"] == [0, 1, 2]
        assert meta["class_names"] == run_folder.class_names and meta["trial"] == t
        assert meta["created"] and isinstance(meta["params"], dict)
        est, meta2 = load_head(pkl)
        assert meta2 == meta
        acc = float(np.mean(est.predict(np.asarray(X)) == y))
        row = next(r for r in rows if r["trial"] == t and r["head"] == kind)
        assert acc == pytest.approx(row["test_accuracy"])
        assert est.predict_proba(np.asarray(X)).shape == (len(y), 3)
    assert json.loads((run / "heads" / t / "rf.json").read_text())["params"]["n_estimators"] == 50


def test_tampered_head_is_refused(headed_run, tmp_path):
    run = copy_run(headed_run[0], tmp_path / "run")
    t = RunFolder(run).best_trial_name
    pkl = run / "heads" / t / "logreg.pkl"
    # ensure_head returns the existing, verified head without refitting
    before = pkl.stat().st_mtime_ns
    path, meta = ensure_head(run, "best", "logreg")
    assert path == pkl and pkl.stat().st_mtime_ns == before
    # replace the pickle by another object: refused before unpickling, by ensure_head and load_head
    pkl.write_bytes(pickle.dumps({"evil": True}))
    for call in (lambda: load_head(pkl), lambda: ensure_head(run, "best", "logreg")):
        with pytest.raises(HeadIntegrityError) as ei:
            call()
        assert "logreg.pkl has been modified" in ei.value.message and "SHA-256" in ei.value.message
    # a pickle without its record is not loaded either
    (run / "heads" / t / "svm.json").unlink()
    with pytest.raises(HeadIntegrityError, match="has no record"):
        load_head(run / "heads" / t / "svm.pkl")


def test_ensure_head_fits_missing_and_stale(headed_run, tmp_path):
    run = copy_run(headed_run[0], tmp_path / "run")
    t = RunFolder(run).best_trial_name
    path, meta = ensure_head(run, t, "knn")
    assert path == run / "heads" / t / "knn.pkl" and meta["kind"] == "knn"
    assert meta["sha256"] == sha256_file(path)
    assert "| knn |" in (run / "heads" / t / "heads.md").read_text()
    # a stale record (fitted on another model's features) is re-fitted
    js = run / "heads" / t / "rf.json"
    rec = json.loads(js.read_text())
    rec["model_sha256"] = "0" * 64
    js.write_text(json.dumps(rec))
    lines: list[str] = []
    path, meta = ensure_head(run, t, "rf", progress=lines.append)
    assert meta["model_sha256"] != "0" * 64 and any("stale" in ln for ln in lines)
    load_head(path)


def test_make_estimator_defaults_and_errors():
    run = make_estimator("rf")
    assert run.n_estimators == 200 and run.n_jobs == -1
    svm = make_estimator("svm", C=3.0)
    assert [n for n, _ in svm.steps] == ["scale", "svm"] and svm.steps[1][1].estimator.C == 3.0
    assert make_estimator("logreg").steps[1][1].max_iter == 1000
    with pytest.raises(ConfigError, match="unknown head 'xgb'; accepted: rf, svm, logreg, knn"):
        make_estimator("xgb")
    with pytest.raises(ConfigError, match="unknown parameter.*'trees'.*accepted: n_estimators"):
        make_estimator("rf", trees=3)
    with pytest.raises(ConfigError, match="svm head: invalid C: -1; accepted: a number > 0"):
        make_estimator("svm", C=-1)
    with pytest.raises(ConfigError, match="kernel"):
        make_estimator("svm", kernel="cubic")
    with pytest.raises(ConfigError, match="unknown head"):
        fit_heads("/nonexistent", "best", ("rf", "boost"))
