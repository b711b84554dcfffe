"""Calibration at export: temperature scaling inside the ONNX graph, and the unknown-input scores.

* :func:`temperature_onnx` rewrites ``model.onnx`` so its ``probs`` output is
  ``softmax(logits / T)``: every backend (ONNX Runtime fp32 / int8, TensorRT) and every
  consumer of the bundle gets calibrated probabilities, not only ``transfer infer``.
* :func:`fit_unknown` fits the unknown-input scores of :mod:`transfer.calibration` on a
  run's features (class means and covariance on train, thresholds on val) and returns the
  manifest record plus the arrays the bundle stores (``unknown.npz``).

Example::

    T = fit_temperature(val_probs, val_labels)
    temperature_onnx("model.onnx", "model.cal.onnx", T)
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .. import calibration as cal
from .._lazy import require
from ..errors import ExportError

#: unknown-input scores a bundle can carry, in the order the exporter fits them
SCORES = ("mahalanobis", "msp")
DEFAULT_SCORE = "mahalanobis"


def temperature_onnx(src: str | os.PathLike, dst: str | os.PathLike, temperature: float) -> dict:
    """Write a copy of ``src`` whose ``probs`` are divided by ``temperature`` before the softmax.

    The ``Softmax`` node that produces ``probs`` gets a ``Div`` by a constant in front of it;
    if ``probs`` is not produced by a Softmax, ``softmax(log(max(p, eps)) / T)`` is appended
    instead (the same function, computed from the probabilities).

    Returns:
        ``{"temperature": T, "method": "logits" | "log-probs"}``.

    Raises:
        ExportError: the graph has no ``probs`` output.
    """
    onnx = require("onnx", purpose="calibrating the ONNX model")
    from onnx import helper, numpy_helper

    if not np.isfinite(temperature) or temperature <= 0:
        raise ExportError(f"temperature must be a positive number, got {temperature!r}")
    m = onnx.load(str(src))
    g = m.graph
    if "probs" not in [o.name for o in g.output]:
        raise ExportError(f"{src} has no output named 'probs'; it does not follow the bundle's model contract")
    producer = next((n for n in g.node if "probs" in n.output), None)
    t_name = "transfer_temperature"
    g.initializer.append(numpy_helper.from_array(np.array(temperature, dtype=np.float32), t_name))
    if producer is not None and producer.op_type == "Softmax":
        logits = producer.input[0]
        scaled = logits + "_over_temperature"
        idx = list(g.node).index(producer)
        g.node.insert(idx, helper.make_node("Div", [logits, t_name], [scaled], name="transfer_temperature_div"))
        producer.input[0] = scaled
        method = "logits"
    else:
        raw = "probs_uncalibrated"
        for n in g.node:
            for i, name in enumerate(n.output):
                if name == "probs":
                    n.output[i] = raw
        eps = "transfer_eps"
        g.initializer.append(numpy_helper.from_array(np.array(cal.EPS, dtype=np.float32), eps))
        g.node.extend([
            helper.make_node("Max", [raw, eps], ["probs_clipped"], name="transfer_clip"),
            helper.make_node("Log", ["probs_clipped"], ["log_probs"], name="transfer_log"),
            helper.make_node("Div", ["log_probs", t_name], ["log_probs_over_temperature"], name="transfer_temperature_div"),
            helper.make_node("Softmax", ["log_probs_over_temperature"], ["probs"], axis=-1, name="transfer_softmax"),
        ])
        method = "log-probs"
    m.doc_string = (m.doc_string + f" | probs calibrated: temperature {temperature:.6g}").strip(" |")
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return {"temperature": float(temperature), "method": method}


def fit_unknown(train_features: np.ndarray, train_labels: Sequence[int], val_features: np.ndarray,
                val_probs: np.ndarray, num_classes: int, *, accept: float = 0.95) -> tuple[dict, dict]:
    """Fit the unknown-input scores of a bundle.

    Class means and the shared covariance come from the training features; each score's
    threshold keeps ``accept`` of the validation images (images the model did not train on).

    Returns:
        ``(record, arrays)``: the manifest's ``unknown`` record (scores, thresholds, target
        acceptance, the acceptance reached on val) and ``{"means", "whiten"}`` for
        ``unknown.npz``.

    Raises:
        ExportError: a class has no training image, or there are no validation images.
    """
    if len(val_features) == 0:
        raise ExportError("fitting unknown-input thresholds needs validation (or test) images")
    try:
        gauss = cal.fit_class_gaussian(train_features, train_labels, num_classes)
    except ValueError as exc:
        raise ExportError(f"cannot fit the feature-space score: {exc}") from None
    scores = {"mahalanobis": cal.mahalanobis_score(val_features, gauss), "msp": cal.msp_score(val_probs)}
    record = {"default": DEFAULT_SCORE, "accept": float(accept), "fitted_on": {"means": "train", "threshold": "val"},
              "images": {"train": int(len(train_labels)), "val": int(len(val_features))}, "scores": {}}
    for name in SCORES:
        thr = cal.threshold_for_acceptance(scores[name], accept)
        record["scores"][name] = {"threshold": thr, "val_acceptance": float(np.mean(scores[name] >= thr))}
    record["scores"]["mahalanobis"]["file"] = "unknown.npz"
    return record, gauss.to_arrays()
