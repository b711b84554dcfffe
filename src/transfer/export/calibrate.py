"""Calibration at export: temperature scaling inside the ONNX graph, and the unknown-input scores.

* :func:`temperature_record` decides the temperature (:func:`transfer.calibration.check_temperature`:
  fitted on folds of the val split and applied only when it holds on the fold it did not
  see) and writes the bundle's ``calibration`` record: what was done, on which images, the
  check that allowed or refused it, and each split's numbers labelled with the part the
  split played (val chose the temperature; test only reports).
* :func:`temperature_onnx` rewrites ``model.onnx`` so its ``probs`` output is
  ``softmax(logits / T)``: every backend (ONNX Runtime fp32 / int8, TensorRT) and every
  consumer of the bundle gets calibrated probabilities, not only ``transfer infer``.
* :func:`synthetic_outliers` makes images of no class from training images (noise, heavy
  blur, shuffled patches, mixes of two classes); :func:`fit_unknown` fits every
  unknown-input score of :mod:`transfer.unknown_scores` (parameters on train, thresholds on
  val) and chooses the bundle's default score by :data:`DEFAULT_RULE`, which reads no
  test image.

Example::

    rec = temperature_record(val_logits, val_labels)
    if rec["applied"]:
        temperature_onnx("model.onnx", "model.cal.onnx", rec["temperature"])
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .. import calibration as cal
from .. import unknown_scores as unk
from .._lazy import require
from ..data.image import resize_image
from ..errors import ExportError
from ..options import replace
from .export_config import BANK_ROWS, UnknownFitOptions  # noqa: F401  (BANK_ROWS re-exported)

#: the unknown-input scores a bundle can carry (every one the runtime computes)
SCORES = unk.SCORES
#: k of the kNN score is chosen among these by the same rule as the default score
KNN_KS = (1, 5, 10, 20, 50)
#: synthetic outlier images per kind
OUTLIERS_PER_KIND = 100
OUTLIER_KINDS = {
    "noise": "uniform noise drawn at a random resolution between 2 px and the input size, resized",
    "blur": "training images blurred with a Gaussian of sigma = input size / 10",
    "shuffle": "training images cut into a 4 x 4 grid (2 x 2 below 16 px) and the tiles shuffled",
    "mix": "pixel averages of two training images of different classes",
}
DEFAULT_RULE = ("the score that accepts the fewest synthetic outliers (made from training images; the mean over "
                "their kinds) at its own threshold, the one that keeps the target share of val images; ties within "
                "0.5 points by the higher mean AUROC of val against them; no test image is read")
#: false-accept rates closer than this count as a tie (the next criterion decides)
FALSE_ACCEPT_TIE = 0.005


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


#: the part each split played in the calibration record (nothing is reported on the split that chose it
#: without saying so)
SPLIT_ROLES = {"val": "chose the temperature (and, in training, the model): its numbers are optimistic",
               "test": "reported only: chose nothing"}


def temperature_record(val: tuple[np.ndarray, np.ndarray] | None = None,
                       test: tuple[np.ndarray, np.ndarray] | None = None, *, skipped: str | None = None,
                       images: dict | None = None) -> dict:
    """The bundle's ``calibration`` record: decide the temperature on ``val`` and report both splits.

    Args:
        val: ``(logits, labels)`` of the val split (chooses), or None.
        test: ``(logits, labels)`` of the test split (reports before / after only), or None.
        skipped: why val cannot be used at all (no split, unreadable, too few images): then
            nothing is fitted, the temperature is 1 and the reason is recorded.
        images: extra counts to record (``listed``, ``unreadable``).

    Returns:
        ``{"method": "temperature (logits)" | "none", "applied", "temperature" (1.0 unless
        applied), "reason", "fitted_on": "val", "images", "fitted_temperature", "check",
        "val": {"role", "before", "after"}, "test": {...}}`` (``after`` only when applied).

    Raises:
        ValueError: neither ``val`` nor ``skipped`` given.
    """
    if skipped is None and val is None:
        raise ValueError("temperature_record needs the val split's logits or the reason it has none")
    chk = None if skipped is not None else cal.check_temperature(*val)
    applied = bool(chk is not None and chk.applied)
    temp = float(chk.temperature) if chk is not None else 1.0
    rec: dict = {"method": "temperature (logits)" if applied else "none", "applied": applied, "temperature": temp,
                 "reason": skipped if chk is None else chk.reason, "fitted_on": "val",
                 "images": {"val": int(len(val[1])) if val is not None else 0, **(images or {})}}
    if chk is not None:
        rec["fitted_temperature"] = chk.fitted
        rec["check"] = chk.record()
    for split, data in (("val", val), ("test", test)):
        if data is None:
            continue
        z, y = data
        entry = {"role": SPLIT_ROLES[split], "before": cal.calibration_metrics(cal.softmax(z), y)}
        if applied:
            entry["after"] = cal.calibration_metrics(cal.temperature_probs(z, temp), y)
        rec[split] = entry
    return rec


def synthetic_outliers(pixels: np.ndarray, labels: Sequence[int], *, per_kind: int = OUTLIERS_PER_KIND,
                       seed: int = 0, recipe: dict | None = None) -> dict[str, np.ndarray]:
    """Images of none of the classes, made from training images (:data:`OUTLIER_KINDS`).

    Args:
        pixels: training images, uint8 or float (n, H, W, 3) in 0..255.
        labels: their classes (a mix takes two images of different classes).
        recipe: the run's pixel recipe (noise drawn small is resized as the run resizes).

    Returns:
        ``{kind: float32 (k, H, W, 3)}`` with ``k <= per_kind`` (fewer when there are fewer
        images; no ``mix`` with one class).
    """
    from scipy.ndimage import gaussian_filter

    x = np.asarray(pixels, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y) or not len(x):
        raise ValueError(f"pixels must be (n, H, W, 3) with n >= 1 labels, got {x.shape} and {y.shape}")
    rng = np.random.default_rng(seed)
    n, h, w = len(x), x.shape[1], x.shape[2]
    pick = rng.choice(n, size=min(per_kind, n), replace=False)
    out = {}
    noise = []
    for _ in range(per_kind):
        side = int(np.exp(rng.uniform(np.log(2), np.log(max(h, w) + 1))))
        small = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        noise.append(resize_image(small, (h, w), recipe=recipe))
    out["noise"] = np.stack(noise).astype(np.float32)
    sigma = max(h, w) / 10.0
    out["blur"] = np.stack([gaussian_filter(x[i], sigma=(sigma, sigma, 0), mode="reflect") for i in pick])
    g = 4 if min(h, w) >= 16 else 2
    th, tw = h // g, w // g
    shuffled = []
    for i in pick:
        img = x[i].copy()
        tiles = [img[r * th:(r + 1) * th, c * tw:(c + 1) * tw].copy() for r in range(g) for c in range(g)]
        order = rng.permutation(len(tiles))
        while (order == np.arange(len(tiles))).all():
            order = rng.permutation(len(tiles))
        for k, j in enumerate(order):
            r, c = divmod(k, g)
            img[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[j]
        shuffled.append(img)
    out["shuffle"] = np.stack(shuffled)
    if len(np.unique(y)) > 1:
        mixes = []
        for i in pick:
            others = np.flatnonzero(y != y[i])
            mixes.append(0.5 * x[i] + 0.5 * x[rng.choice(others)])
        out["mix"] = np.stack(mixes).astype(np.float32)
    return out


def _stored(arrays: dict) -> dict:
    """The arrays as ``unknown.npz`` stores them (bank float16, the rest float32): the exporter
    scores with exactly what the runtime will read."""
    return {k: np.asarray(v, dtype=np.float16 if k == "bank" else np.float32) for k, v in arrays.items()}


def _by_rule(candidates: dict) -> str:
    """The key of :data:`DEFAULT_RULE`'s choice among ``{key: score entry with "synthetic"}``: the
    lowest expected false-accept rate, false-accept rates within :data:`FALSE_ACCEPT_TIE` of it
    decided by the higher mean AUROC (then by order)."""
    fa = {k: e["synthetic"]["expected_false_accept"] for k, e in candidates.items()}
    low = min(fa.values())
    near = [k for k in candidates if fa[k] <= low + FALSE_ACCEPT_TIE]
    return max(near, key=lambda k: candidates[k]["synthetic"]["mean_auroc"])


def fit_unknown(train_features: np.ndarray, train_labels: Sequence[int], val_features: np.ndarray,
                val_probs: np.ndarray, num_classes: int, options: UnknownFitOptions | None = None, *,
                head: tuple[np.ndarray, np.ndarray] | None = None,
                outliers: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, **overlay) -> tuple[dict, dict]:
    """Fit the unknown-input scores of a bundle and choose its default.

    Parameters come from the training features (class means and shrunk covariance, the kNN
    bank, ViM's principal subspace) and the network head (``head = (kernel, bias)``: energy
    and ViM; without it they are not offered). Each score's threshold keeps ``accept`` of the
    val images. With ``outliers`` (``{kind: (features, probs)}`` of
    :func:`synthetic_outliers`), every score's AUROC of val against each kind and its false
    accepts at its threshold are measured; ``default="auto"`` then takes the score of
    :data:`DEFAULT_RULE` (and kNN's k among :data:`KNN_KS` by the same rule): the bundle
    answers "unknown" at one threshold, so the rule judges each score there. ``accept``,
    ``default``, ``bank_rows`` (the kNN bank's most rows) and ``seed`` are the fields of
    ``options`` (:class:`~transfer.export.export_config.UnknownFitOptions`), ``overlay`` sets
    them by name.

    Returns:
        ``(record, arrays)``: the manifest's ``unknown`` record and the arrays of
        ``unknown.npz`` (float32; the kNN bank float16).

    Raises:
        ExportError: no val images, a class without training images, ``default="auto"``
            without outliers, or a default that is not offered.
    """
    o = replace(options or UnknownFitOptions(), **overlay)
    accept, default, bank_rows, seed = o.accept, o.default, o.bank_rows, o.seed
    vf, vp = np.asarray(val_features), np.asarray(val_probs)
    if len(vf) == 0:
        raise ExportError("fitting unknown-input thresholds needs validation images")
    if default == "auto" and not outliers:
        raise ExportError("choosing the default unknown-input score needs outlier images to choose by")
    tf, ty = np.asarray(train_features, dtype=np.float64), np.asarray(train_labels, dtype=np.int64)
    try:
        gauss = unk.fit_class_gaussian(tf, ty, num_classes)
    except ValueError as exc:
        raise ExportError(f"cannot fit the feature-space scores: {exc}") from None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(tf), bank_rows, replace=False)) if len(tf) > bank_rows else np.arange(len(tf))
    arrays = {**gauss.to_arrays(), "bank": unk.normalize_rows(tf[rows])}
    params: dict[str, dict] = {"msp": {}, "mahalanobis": {}, "knn": {}}
    notes = {}
    if head is not None:
        kernel, bias = (np.asarray(a, dtype=np.float64) for a in head)
        arrays.update(kernel=kernel, bias=bias)
        params["energy"] = {}
        try:
            vim = unk.fit_vim(tf, kernel, bias)
            arrays.update(vim_origin=vim.origin, vim_basis=vim.basis)
            params["vim"] = {"alpha": vim.alpha}
        except ValueError as exc:
            notes["vim"] = f"not offered: {exc}"
    else:
        notes.update(energy="not offered: no network head given", vim="not offered: no network head given")
    arrays = _stored(arrays)
    dims = dict(feature_dim=tf.shape[1], num_classes=num_classes)
    ks = [k for k in KNN_KS if k <= len(rows)] or [1]

    def judge(name, extra=None):
        scorer = unk.UnknownScorer.from_arrays(name, arrays, {**params[name], **(extra or {})}, **dims)
        sv = scorer(vf, vp)
        thr = unk.threshold_for_acceptance(sv, accept)
        entry = {"threshold": thr, "val_acceptance": float(np.mean(sv >= thr)), **params[name], **(extra or {})}
        if outliers:
            au = {k: unk.auroc(sv, scorer(*o)) for k, o in outliers.items()}
            fa = {k: float(np.mean(scorer(*o) >= thr)) for k, o in outliers.items()}
            entry["synthetic"] = {"auroc": au, "mean_auroc": float(np.mean(list(au.values()))), "false_accept": fa,
                                  "expected_false_accept": float(np.mean(list(fa.values())))}
        return entry

    scores = {}
    for name in SCORES:
        if name not in params:
            continue
        if name == "knn":
            tried = {k: judge("knn", {"k": k}) for k in ks}
            # without outliers to choose by: the largest k up to 10
            best_k = (_by_rule({k: tried[k] for k in ks}) if outliers else max(k for k in ks if k <= 10))
            scores["knn"] = dict(tried[best_k])
            if outliers:
                scores["knn"]["k_candidates"] = {str(k): tried[k]["synthetic"]["mean_auroc"] for k in ks}
        else:
            scores[name] = judge(name)
        if unk.SCORE_ARRAYS[name]:
            scores[name]["file"] = "unknown.npz"
    if default == "auto":
        chosen = _by_rule(scores)
    elif default in scores:
        chosen = default
    else:
        raise ExportError(f"unknown-input score {default!r} is not offered by this bundle; offered: "
                          f"{', '.join(scores)}" + (f" ({'; '.join(f'{k} {v}' for k, v in notes.items())})"
                                                     if notes else ""), option="unknown_default")
    record = {"default": chosen, "rule": DEFAULT_RULE if default == "auto" else "chosen by the user (--unknown-default)",
              "accept": float(accept),
              "fitted_on": {"parameters": "train", "thresholds": "val",
                            "default": "val vs synthetic outliers from train images" if default == "auto" else "user"},
              "images": {"train": int(len(ty)), "val": int(len(vf)), "bank": int(len(rows)),
                         **({"outliers": {k: int(len(o[0])) for k, o in outliers.items()}} if outliers else {})},
              "scores": scores}
    if outliers:
        record["outliers"] = {"kinds": {k: OUTLIER_KINDS.get(k, k) for k in outliers},
                              "note": "the default score and kNN's k were chosen on these outliers: their "
                                      "false-accept rates there are estimates (optimistic for the chosen score), "
                                      "not test numbers"}
    if notes:
        record["not_offered"] = notes
    return record, arrays
