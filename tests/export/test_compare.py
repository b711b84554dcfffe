"""compare_outputs: the numbers every verification step records."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.export.compare import compare_outputs


def test_identical_outputs_agree_fully():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    v = compare_outputs(p, p.copy(), [0, 1, 1])
    assert v["images"] == 3 and v["max_abs_diff"] == 0.0 and v["top1_agreement"] == 1.0
    assert v["reference_accuracy"] == pytest.approx(2 / 3) and v["accuracy_drop"] == 0.0


def test_differences_flips_and_accuracy_drop():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    cand = np.array([[0.8, 0.2], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    v = compare_outputs(ref, cand, np.array([0, 1, 0, 1]))
    assert v["max_abs_diff"] == pytest.approx(0.2) and v["mean_abs_diff"] == pytest.approx(0.6 / 8)
    assert v["top1_agreement"] == 0.75
    assert v["reference_accuracy"] == 1.0 and v["candidate_accuracy"] == 0.75
    assert v["accuracy_drop"] == pytest.approx(0.25)
    assert "reference_accuracy" not in compare_outputs(ref, cand)


def test_nan_candidate_never_passes_a_limit():
    ref = np.array([[0.9, 0.1]])
    v = compare_outputs(ref, np.array([[np.nan, 0.1]]))
    assert not v["max_abs_diff"] <= 1e-4  # a NaN must fail the fp32 check


@pytest.mark.parametrize("ref,cand,labels", [
    (np.zeros((2, 3)), np.zeros((2, 4)), None),
    (np.zeros((0, 3)), np.zeros((0, 3)), None),
    (np.zeros(3), np.zeros(3), None),
    (np.zeros((2, 3)), np.zeros((2, 3)), [0]),
])
def test_bad_shapes_are_refused(ref, cand, labels):
    with pytest.raises(ValueError):
        compare_outputs(ref, cand, labels)
