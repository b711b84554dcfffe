"""Calibration as a stage of an export: the uncalibrated ``model.onnx`` run on the run's val, test
and training images (:class:`SplitOutputs`), the temperature decided on val and reported on test
(:func:`transfer.export.calibrate.temperature_record`), written into the graph when its check
passed and verified against the same formula in numpy (:func:`temperature_step`), and the
unknown-input scores fitted on train with thresholds on val, the default chosen against
synthetic outliers (:func:`transfer.export.calibrate.fit_unknown`). Test images never choose
anything; a val split that is missing, unreadable or too small skips both with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import calibration as cal
from .. import unknown_scores as unk
from ..data.stream import decode_batches
from ..errors import ExportError
from ..fsutil import atomic_path
from ..runtime.runner_base import Outputs
from ..runtime.unknown import UnknownDetector
from .calibrate import (
    OUTLIERS_PER_KIND,
    fit_unknown,
    synthetic_outliers,
    temperature_onnx,
    temperature_record,
)
from .step import ExportContext, Step, ort_runner, run_step

#: at most this many images of a split are run to fit the temperature and the unknown-input scores
CALIBRATION_IMAGES = 5000
#: fewer readable validation images than this cannot support a temperature, a 95 % threshold or a 15-bin ECE
MIN_CALIBRATION_IMAGES = 100
#: softmax(features @ kernel + bias) must equal the model's probs within this for the logits to be the head's
HEAD_FORMULA_ATOL = 1e-4


@dataclass
class SplitOutputs:
    """The uncalibrated ``model.onnx`` on the readable images of one split (at most
    :data:`CALIBRATION_IMAGES`, a seeded subset of a larger split)."""

    split: str
    features: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    listed: int = 0            # images the split lists
    unreadable: int = 0        # of the ones run, how many could not be decoded
    first_error: str | None = None

    @property
    def n(self) -> int:
        return int(len(self.labels))


def _subset(paths: list, labels: list, limit: int, seed: int = 0) -> tuple[list, list]:
    """At most about ``limit`` of ``(paths, labels)``: a seeded pick of the same share of every
    class (at least one image of each), in split order."""
    if len(paths) <= limit:
        return list(paths), list(labels)
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep += rng.choice(idx, max(1, int(round(len(idx) * limit / len(y)))), replace=False).tolist()
    keep = np.sort(keep)
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _split_outputs(ctx: ExportContext, split: str, limit: int = CALIBRATION_IMAGES) -> SplitOutputs:
    """:class:`SplitOutputs` of a split (unreadable files counted and skipped, never an error)."""
    all_paths, all_labels = ctx.run.split_paths(split, fold=ctx.t.fold)
    paths, labels = _subset(all_paths, all_labels, limit)
    c, d = ctx.extra["num_classes"], ctx.extra["feature_dim"]
    out = SplitOutputs(split, np.zeros((0, d), np.float32), np.zeros((0, c), np.float32), np.zeros(0, np.int64),
                       listed=len(all_paths))
    if not paths:
        return out
    fs, ps, ys, start = [], [], [], 0
    with ctx.progress.bar(len(paths), f"calibration: {split} images") as bar, \
            ort_runner(ctx, {"file": "model.onnx"}) as runner:
        for pb in decode_batches(paths, ctx.t.image_size, batch=64, recipe=ctx.run.recipe):
            for it in pb.items:
                if it.error is not None:
                    out.unreadable += 1
                    out.first_error = out.first_error or f"{it.path}: {it.error}"
            if len(pb.x):
                got = runner.infer(pb.x)
                fs.append(got.features)
                ps.append(got.probs)
                ys += [int(labels[start + i]) for i in pb.ok_index]
            start += len(pb.items)
            bar.update(len(pb.items))
    if ys:
        out.features, out.probs, out.labels = np.concatenate(fs), np.concatenate(ps), np.asarray(ys, np.int64)
    return out


def _why_not(val: SplitOutputs) -> str | None:
    """Why the val split cannot choose a temperature or thresholds (then nothing is fitted), or None."""
    if val.listed == 0:
        return ("the run has no val split (trained with --val 0): a temperature and unknown-input thresholds "
                "would have to be chosen on test images, which only report")
    if val.n == 0:
        return (f"none of the {val.listed} val image(s) can be read now (first: {val.first_error}); nothing is "
                "fitted on test instead")
    if val.n < MIN_CALIBRATION_IMAGES:
        return (f"{val.n} readable validation image(s); a temperature, unknown-input thresholds and a 15-bin ECE "
                f"need at least {MIN_CALIBRATION_IMAGES}")
    return None


def _head_logits(ctx: ExportContext):
    """``logits(features, probs)`` of the network: ``features @ kernel + bias`` of its ``probs``
    layer when that reproduces ``model.onnx``'s probabilities on the verification images (then
    ``head = (kernel, bias)``), else ``log p`` (the logits up to a per-row constant; energy and
    ViM are not offered). Returns ``(logits function, head or None, how)``."""
    kernel, bias = (np.asarray(a, np.float64) for a in ctx.extra["model"].get_layer("probs").get_weights())
    f, p = ctx.outputs["onnx-fp32"].features, ctx.outputs["onnx-fp32"].probs
    diff = float(np.max(np.abs(cal.softmax(cal.network_logits(f, kernel, bias)) - p)))
    if diff <= HEAD_FORMULA_ATOL:
        return (lambda feats, probs: cal.network_logits(feats, kernel, bias)), (kernel, bias), \
            f"features @ kernel + bias of the probs layer (max |softmax - probs| {diff:.1e} on {len(p)} images)"
    return (lambda feats, probs: cal.log_probs(probs)), None, \
        f"log probabilities (the probs layer does not reproduce the model's probs: max diff {diff:.1e})"


def run_calibration(ctx: ExportContext, accept: float, default: str = "auto") -> None:
    """The temperature (decided on val, reported on test) and the unknown-input scores (fitted on
    train, thresholds on val, default chosen on val vs synthetic outliers): records in
    ``ctx.extra``, the temperature written into ``model.onnx`` only when its check passed.

    Test images never choose anything. A val split that is missing, unreadable or too small
    skips both with the reason recorded (the bundle still exports, with the network's
    probabilities); so do a single-class val split (unknown scores) and training images
    that cannot be read.
    """
    logits, head, how = _head_logits(ctx)
    val, test = _split_outputs(ctx, "val"), _split_outputs(ctx, "test")
    why = _why_not(val)
    record = temperature_record((logits(val.features, val.probs), val.labels) if why is None else None,
                                (logits(test.features, test.probs), test.labels) if test.n else None,
                                skipped=why, images={"listed": val.listed, "unreadable": val.unreadable,
                                                     "test": test.n})
    record["logits"] = how
    _say_calibration(ctx.progress, record)
    ctx.extra["calibration"] = record
    ctx.models["onnx-fp32"]["calibrated"] = bool(record["applied"])
    unknown_why = why or ("the val split holds one class only: thresholds would be set on that class's images"
                          if len(np.unique(val.labels)) < 2 else None)
    if unknown_why is None:
        unknown_why = _fit_unknown(ctx, val, logits, head, record["temperature"], accept, default)
    if unknown_why is not None:
        ctx.extra["unknown"] = {"method": "none", "reason": unknown_why}
        ctx.progress.say("unknown inputs: no scores" + (" (the same reason)" if unknown_why == why
                                                        else f": {unknown_why}"))
    if record["applied"]:
        ctx.extra["raw_outputs"], ctx.extra["logits"] = ctx.outputs["onnx-fp32"], logits
        run_step(ctx, temperature_step())
        ctx.outputs["onnx-fp32"] = ctx.outputs["calibration"]  # what the other models are compared with


def _say_calibration(progress, record: dict) -> None:
    if record["applied"]:
        line = f"calibration: temperature {record['temperature']:.3f} applied ({record['reason']})"
    elif record.get("fitted_temperature") is not None:
        line = f"calibration: temperature not applied: {record['reason']}"
    else:
        line = f"calibration skipped (the bundle keeps the network's probabilities): {record['reason']}"
    test = record.get("test")
    if test and "after" in test:
        line += (f"; test (reported only) ECE {test['before']['ece']:.4f} -> {test['after']['ece']:.4f}, "
                 f"NLL {test['before']['nll']:.4f} -> {test['after']['nll']:.4f}")
    progress.say(line)


def _train_pixels(ctx: ExportContext, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and labels of up to ``n`` readable training images (a seeded random pick)."""
    paths, labels = _subset(*ctx.run.split_paths("train", fold=ctx.t.fold), n, seed=1)
    xs, ys, start = [], [], 0
    for pb in decode_batches(paths, ctx.t.image_size, batch=64, recipe=ctx.run.recipe):
        if len(pb.x):
            xs.append(pb.x)
            ys += [int(labels[start + i]) for i in pb.ok_index]
        start += len(pb.items)
    if not ys:
        return np.zeros((0,) + tuple(ctx.t.image_size) + (3,), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.asarray(ys, np.int64)


def _fit_unknown(ctx: ExportContext, val: SplitOutputs, logits, head, temperature: float, accept: float,
                 default: str) -> str | None:
    """Fit the unknown-input scores into ``ctx.extra`` and ``unknown.npz``; returns why they
    cannot be fitted (unreadable training images, a class without any), or None."""

    train = _split_outputs(ctx, "train")
    if train.n == 0:
        return (f"none of the {train.listed} training image(s) can be read now"
                + (f" (first: {train.first_error})" if train.first_error else ""))
    pixels, labels = _train_pixels(ctx, OUTLIERS_PER_KIND)
    if not len(labels):
        return "none of the training images picked to make synthetic outliers from can be read now"
    outliers = {}
    with ort_runner(ctx, {"file": "model.onnx"}) as runner:
        for kind, x in synthetic_outliers(pixels, labels, recipe=ctx.run.recipe).items():
            got = runner.infer(x)
            outliers[kind] = (got.features, cal.temperature_probs(logits(got.features, got.probs), temperature))
    val_probs = cal.temperature_probs(logits(val.features, val.probs), temperature)
    try:
        unknown, arrays = fit_unknown(train.features, train.labels, val.features, val_probs,
                                      ctx.extra["num_classes"], accept=accept, head=head, outliers=outliers,
                                      default=default)
    except ExportError as exc:
        if exc.option == "unknown_default":
            raise
        return exc.message
    if train.unreadable:
        unknown["images"]["train_unreadable"] = train.unreadable
    with atomic_path(ctx.folder / "unknown.npz", suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    ctx.extra["unknown"] = unknown
    name = unknown["default"]
    e = unknown["scores"][name]
    ctx.extra["detector"] = UnknownDetector(name, e["threshold"], unk.UnknownScorer.from_arrays(
        name, arrays, e, feature_dim=ctx.extra["feature_dim"], num_classes=ctx.extra["num_classes"]))
    syn = e.get("synthetic") or {}
    why = "rule: fewest synthetic outliers accepted" if default == "auto" else "your choice"
    ctx.progress.say(
        f"unknown inputs: default {name} ({why}), "
        f"threshold {e['threshold']:.4g} accepts {100 * e['val_acceptance']:.1f} % of val"
        + (f", {100 * syn['expected_false_accept']:.1f} % of synthetic outliers (AUROC {syn['mean_auroc']:.3f})"
           if syn else "")
        + "; the others: " + ", ".join(
            f"{k} {100 * v['synthetic']['expected_false_accept']:.1f} % (AUROC {v['synthetic']['mean_auroc']:.3f})"
            if v.get("synthetic") else k for k, v in unknown["scores"].items() if k != name))
    return None


def temperature_step() -> Step:
    """The temperature written into ``model.onnx`` (before its softmax), compared with the same
    formula in numpy on the uncalibrated model's outputs."""
    def convert(ctx):
        temp = ctx.extra["calibration"]["temperature"]
        info = temperature_onnx(ctx.folder / "model.onnx", ctx.folder / ".model.calibrated.onnx", temp)
        os.replace(ctx.folder / ".model.calibrated.onnx", ctx.folder / "model.onnx")
        ctx.extra["calibration"]["graph"] = info["method"]
        return ctx.models["onnx-fp32"]

    def numpy_formula(ctx):
        raw = ctx.extra["raw_outputs"]
        probs = cal.temperature_probs(ctx.extra["logits"](raw.features, raw.probs),
                                      ctx.extra["calibration"]["temperature"])
        return Outputs(raw.features, probs), "softmax(logits / T) of the uncalibrated model"

    return Step("calibration", convert, ort_runner, numpy_formula, atol=1e-5, name="onnx-fp32")
