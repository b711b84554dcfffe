"""Per-class evaluation: outputs exist and the numbers are scikit-learn's on the model's predictions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from helpers.runs import copy_run
from transfer.analysis.evaluate import classification_metrics, evaluate
from transfer.data.image import load_image
from transfer.errors import ConfigError
from transfer.models.build import load_model
from transfer.runfolder import RunFolder

OUTPUTS = ("metrics.json", "per_class.csv", "per_class.md", "confusion.csv", "confusion.png", "samples.png",
           "wrong.png")


def test_evaluate_outputs_and_metrics_equal_sklearn(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    run_folder = RunFolder(run)
    res = evaluate(run, "all", "test", samples=5)
    assert set(res) == {t.name for t in run_folder.finished_trials()}
    names = run_folder.class_names
    for tname, r in res.items():
        out = run / "evaluate" / tname
        for f in OUTPUTS:
            assert (out / f).is_file() and (out / f).stat().st_size > 0, f
        for png in ("confusion.png", "samples.png", "wrong.png"):
            with Image.open(out / png) as im:
                assert im.size[0] > 100
        # independent predictions: run the model on the split's pixels
        t = run_folder.trial(tname)
        files, y = run_folder.split_paths("test")
        x = np.stack([load_image(p, t.image_size) for p in files]).astype(np.float32)
        pred = load_model(t.model_path).predict_on_batch(x).argmax(1)
        m = json.loads((out / "metrics.json").read_text())
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        p, rc, f1, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
        for c, row in enumerate(m["per_class"]):
            assert row["class"] == names[c]
            assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[c], rc[c], f1[c], s[c]))
        assert m["macro"]["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
        assert m["weighted"]["f1"] == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0))
        assert m["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
        with open(out / "confusion.csv") as fh:
            rows = list(csv.reader(fh))
        assert rows[0][1:] == names and [list(map(int, r[1:])) for r in rows[1:]] == m["confusion"]
        with open(out / "per_class.csv") as fh:
            pc = list(csv.DictReader(fh))
        assert [r["class"] for r in pc] == names + ["macro avg", "weighted avg"]
        assert len(m["samples"]) == 5 and all(s["pred"] in (0, 1, 2) for s in m["samples"])
        assert len(m["wrong"]) == min(5, int((pred != np.asarray(y)).sum()))
        assert all(w["pred"] != w["true"] for w in m["wrong"])
        probs = [w["prob"] for w in m["wrong"]]
        assert probs == sorted(probs, reverse=True)  # most confident first


def test_metrics_with_mistakes_and_an_absent_class():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 0, 2, 2, 1])
    m = classification_metrics(y, pred, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["per_class"][0]["accuracy"] == pytest.approx(2 / 3)  # = recall of class a
    assert m["per_class"][3] == {"class": "d", "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                 "support": 0}
    assert m["macro"]["precision"] == pytest.approx(
        precision_recall_fscore_support(y, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0)[0])
    assert m["confusion"][0] == [2, 1, 0, 0] and m["confusion"][2] == [0, 1, 2, 0]


def test_evaluate_bad_arguments(tiny_run):
    with pytest.raises(ConfigError, match="unknown split"):
        evaluate(tiny_run, "best", "holdout")
    with pytest.raises(ConfigError, match="samples"):
        evaluate(tiny_run, "best", "test", samples=-1)
