"""Compare two models' outputs on the same images (numpy only, no TensorFlow)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, labels: Sequence[int] | None = None) -> dict:
    """Agreement of ``candidate`` probabilities with ``reference`` ones, row by row.

    Args:
        reference: (N, C) probabilities of the reference (e.g. Keras fp32).
        candidate: (N, C) probabilities of the model under test (ONNX, int8, a head...).
        labels: optional true class indices (N,); adds each side's accuracy.

    Returns:
        ``{"images", "max_abs_diff", "mean_abs_diff", "top1_agreement",
        "reference_accuracy", "candidate_accuracy", "accuracy_drop"}`` (accuracies only
        with ``labels``), plain floats ready for JSON.

    Raises:
        ValueError: the two arrays differ in shape or are empty.

    Example::

        compare_outputs(np.eye(3), np.eye(3))["top1_agreement"]
        # 1.0
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"cannot compare outputs of shapes {ref.shape} and {cand.shape}")
    diff = np.abs(ref - cand)
    out = {
        "images": int(ref.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
    }
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if y.shape[0] != ref.shape[0]:
            raise ValueError(f"{y.shape[0]} labels for {ref.shape[0]} rows")
        out["reference_accuracy"] = float(np.mean(ref.argmax(1) == y))
        out["candidate_accuracy"] = float(np.mean(cand.argmax(1) == y))
        out["accuracy_drop"] = out["reference_accuracy"] - out["candidate_accuracy"]
    return out
