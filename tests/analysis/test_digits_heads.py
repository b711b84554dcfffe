"""RF on the features of a fine-tuned digits model is within
2 points of the network's own head (slow: trains a small model on scikit-learn's digits)."""

from __future__ import annotations

import pytest

from helpers.runs import build_run
from transfer.analysis.head_study import fit_heads
from transfer.data.datasets import write_digits


@pytest.mark.slow
def test_rf_on_fine_tuned_digits_features_is_close_to_the_network(tmp_path):
    data = tmp_path / "digits"
    write_digits(data)
    run = build_run(data, tmp_path / "run", trainable="1", epochs=6, image_size=16, batch_size=32,
                    test=0.2, lr=2e-3)
    rows = {r["head"]: r for r in fit_heads(run, "best", ("rf", "svm", "logreg"))}
    net, run = rows["network"], rows["rf"]
    print({h: (round(r["val_accuracy"], 4), round(r["test_accuracy"], 4)) for h, r in rows.items()})
    assert net["test_accuracy"] > 0.85  # the model did learn
    assert run["test_accuracy"] >= net["test_accuracy"] - 0.02
    assert min(r["test_accuracy"] for r in rows.values()) > 0.8
