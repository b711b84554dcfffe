"""`transfer export`: a run's trial -> a verified deployment bundle (docs/design.md).

    export_bundle(run, config=ExportConfig(...), *, progress=None, **options)
        -> ExportResult(bundle_dir, manifest, verification, ok)

Every model of a bundle goes through the same four moves, one :class:`Step` each: convert
(write the file and its manifest entry), run it and its reference on the verification images
(runners: :class:`~transfer.runtime.runners.OrtRunner`,
:class:`~transfer.runtime.trt_runner.TrtRunner`, :class:`~transfer.export.keras_runner.KerasRunner`;
:func:`transfer.export.verify.run_all`), then compare them
(:func:`transfer.export.verify.parity_check` for the same precision,
:func:`~transfer.export.verify.accuracy_check` for int8 / fp16), record the check. The
steps are the fp32 ONNX model (reference: Keras), the int8 ONNX model and TensorRT engines
(reference: the ONNX fp32 model) and a classical head's ONNX graph (reference: its pickle).

The bundle is assembled in a hidden sibling folder and renamed into place only when
complete, so an interrupted export never leaves a half bundle that looks valid. A bundle
that fails verification is still written, with ``"valid": false``, and the call raises
:class:`~transfer.errors.VerificationError` afterwards (non-zero exit). TensorRT engines
are built after the ONNX bundle is in place: without a GPU the call raises
:class:`~transfer.errors.TensorRTUnavailableError` (exit code 3) and the verified ONNX
bundle stays.

Stable API (used by the runtime tests): ``export_bundle``'s options are the fields of
:class:`~transfer.export.export_config.ExportConfig`, given as a config or by name; the
result's ``bundle_dir`` loads with :func:`transfer.bundle.load_bundle`. ``verify_images``
defaults to 256 (at least 64; the val split, then test, is used, all of it when smaller).
``transfer verify BUNDLE`` is :func:`transfer.bundle.verify_bundle`. ``trt="int8"`` builds
from a symmetric QDQ model (explicit quantization, see :mod:`transfer.export.tensorrt`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field, replace as with_fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import calibration as cal
from .. import unknown_scores as unk
from ..analysis.head_study import ensure_head
from ..bundle import Bundle, read_manifest
from ..bundle_write import new_manifest, read_checks, write_bundle
from ..classical_heads import head_to_onnx, load_head
from ..data.stream import decode_batches
from ..errors import ExportError, TensorRTUnavailableError, VerificationError
from ..fsutil import atomic_path
from ..locks import locked
from ..models.onnx_convert import export_onnx, stamp_onnx
from ..options import replace
from ..progress import ProgressLike, as_progress
from ..runfolder import RunFolder
from ..runtime.cam import BundleCam
from ..runtime.heads import OnnxHead
from ..runtime.runner_base import Outputs, Runner
from ..runtime.runners import OrtRunner
from ..runtime.trt_runner import TrtRunner
from ..runtime.unknown import UnknownDetector, make_detector
from ..signing import load_signing_key
from .bundle_writer import check_out, remove_stale_staging, staged_bundle, tool_versions
from .cam_export import FEATURE_MAP, cam_record, map_agreement, plan_cam, write_cam_weights
from .calibrate import OUTLIERS_PER_KIND, fit_unknown, synthetic_outliers, temperature_onnx, temperature_record
from .export_config import ExportConfig
from .fp16 import convert_fp16
from .keras_runner import KerasRunner
from .quantize import calibration_batches, quantize_int8
from .tensorrt import (
    build_engine,
    device_info,
    engine_entry,
    prepare_int8_onnx,
    require_tensorrt,
)
from .verify import accuracy_check, parity_check, run_all, summary_line, verification_images


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict
    verification: dict
    ok: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    """Pass/fail limits: fp32 parity (``atol``, ``min_agreement``), reduced precision (accuracy drop)."""

    atol: float = 1e-4
    min_agreement: float = 0.999
    max_accuracy_drop: float = 0.01


@dataclass
class ExportContext:
    """What every step reads (the trial, the verification images) and what the steps made."""

    run: Any                      # RunFolder
    t: Any                       # TrialInfo
    folder: Path                 # where the files are written
    x: np.ndarray                # verification images, float32 (n, H, W, 3)
    y: np.ndarray                # their labels
    limits: Limits
    progress: Any                # transfer.progress.Progress
    opset: int = 17
    calib_images: int = 512
    outputs: dict[str, Outputs] = field(default_factory=dict)  # step key -> its outputs on x
    models: dict[str, dict] = field(default_factory=dict)
    heads: dict[str, dict] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)     # what a step hands to its reference (a head's estimator)
    choosing: np.ndarray | None = None  # which of x may make a choice (the val images; test chooses nothing)

    def rows(self, mask: np.ndarray) -> "ExportContext":
        """The same context on the verification images ``mask`` selects (their outputs too)."""
        outs = {k: Outputs(**{n: a[mask] for n, a in o.arrays().items()}) for k, o in self.outputs.items()}
        return with_fields(self, x=self.x[mask], y=self.y[mask], outputs=outs, choosing=None)


@dataclass(frozen=True)
class Step:
    """One model of the bundle: convert -> run it and its reference -> compare -> record.

    Args:
        key: the verification key (``onnx-fp32``, ``onnx-int8``, ``head-rf``, ``trt-fp16``).
        convert: writes the file(s) under ``ctx.folder`` and returns the manifest entry.
        candidate: the runner of the converted model (or, for a head, its outputs on the fp32
            features).
        reference: ``(runner or outputs, name)`` the candidate is compared with (outputs: a
            reference already run, e.g. ONNX fp32 for int8).
        check: ``"parity"`` (same precision: max |dp| and top-1 agreement) or ``"accuracy"``
            (reduced precision: the accuracy drop).
        atol: the parity tolerance (``None``: the export's ``atol``).
        group / name: where the entry goes in the manifest (``models`` or ``heads``) and its key.
        accuracy_names: also record the reference and candidate accuracy under these names
            (``fp32_accuracy``, ``int8_accuracy``).
    """

    key: str
    convert: Callable[[ExportContext], dict]
    candidate: Callable[[ExportContext, dict], Runner | Outputs]
    reference: Callable[[ExportContext], tuple[Runner | Outputs, str]]
    check: str = "parity"
    atol: float | None = None
    group: str = "models"
    name: str = ""
    accuracy_names: tuple[str, str] | None = None


def judge(ctx: ExportContext, step: Step, ref: np.ndarray, ref_name: str) -> dict:
    """The check of a step whose outputs are in ``ctx.outputs[step.key]``: parity or accuracy
    against its reference's probabilities ``ref``, plus, for a reduced-precision model of a
    calibrated bundle, the same calibration and unknown decisions as fp32."""
    got = ctx.outputs[step.key].probs
    if step.check == "parity":
        v = parity_check(ref, got, ctx.y, atol=ctx.limits.atol if step.atol is None else step.atol,
                         min_agreement=ctx.limits.min_agreement, reference_name=ref_name)
    else:
        v = accuracy_check(ref, got, ctx.y, max_accuracy_drop=ctx.limits.max_accuracy_drop, reference_name=ref_name)
    if step.accuracy_names:
        v.update(zip(step.accuracy_names, (v["reference_accuracy"], v["candidate_accuracy"])))
    if step.group == "models" and step.key not in ("onnx-fp32", "calibration") and "detector" in ctx.extra:
        _calibration_agreement(ctx, step.key, v)
    if step.group == "models" and step.key not in ("onnx-fp32", "calibration"):
        _map_agreement(ctx, step.key, v)
    return v


def _map_agreement(ctx: ExportContext, key: str, v: dict) -> None:
    """Does reduced precision move the maps? fp32's and this model's CAMs of fp32's predicted class,
    compared cell by cell (:func:`transfer.export.cam_export.map_agreement`); a finding recorded in
    the check (``cam``), not a reason to fail it."""
    plan, ref, got = ctx.extra.get("cam_plan"), ctx.outputs["onnx-fp32"], ctx.outputs[key]
    if plan is None or not plan.available or ref.feature_map is None or got.feature_map is None:
        return
    cam = BundleCam(plan.kernel, plan.shape, tuple(ctx.t.image_size), plan.geometry, plan.layer)
    cls = ref.probs.argmax(axis=1)
    v["cam"] = map_agreement(cam.raw(ref.feature_map, cls), cam.raw(got.feature_map, cls))


def run_step(ctx: ExportContext, step: Step) -> dict:
    """Convert, run, compare and record one step; returns its check."""
    entry = step.convert(ctx)
    source, ref_name = step.reference(ctx)
    ctx.outputs[step.key], ref = run_all([step.candidate(ctx, entry), source], ctx.x)  # run everything,
    v = judge(ctx, step, ref.probs, ref_name)                                             # then compare
    getattr(ctx, step.group)[step.name or step.key] = entry
    ctx.checks[step.key] = v
    line = summary_line(step.key, v)
    if step.group == "heads":
        line += f" (head accuracy {v['reference_accuracy']:.4f})"
    ctx.progress.say(line)
    return v


#: limits of every reduced-precision model against calibrated fp32 (ECE difference, same unknown decisions)
MAX_ECE_DIFF = 0.01
MIN_UNKNOWN_AGREEMENT = 0.99


def _calibration_agreement(ctx: ExportContext, key: str, v: dict) -> None:
    """A reduced-precision model must keep fp32's calibration and unknown decisions: its ECE
    within ``MAX_ECE_DIFF`` of fp32's and its accept/reject decisions the same on at least
    ``MIN_UNKNOWN_AGREEMENT`` of the verification images."""
    f32, p32 = ctx.outputs["onnx-fp32"].features, ctx.outputs["onnx-fp32"].probs
    f, p = ctx.outputs[key].features, ctx.outputs[key].probs
    det = ctx.extra["detector"]
    ece32, ece = cal.ece(p32, ctx.y), cal.ece(p, ctx.y)
    same = float(np.mean(det(f32, p32)[1] == det(f, p)[1]))
    v["calibration"] = {"ece_fp32": ece32, "ece": ece, "ece_diff": abs(ece - ece32), "max_ece_diff": MAX_ECE_DIFF,
                        "unknown_score": det.score, "unknown_agreement": same,
                        "min_unknown_agreement": MIN_UNKNOWN_AGREEMENT}
    v["passed"] = bool(v["passed"] and abs(ece - ece32) <= MAX_ECE_DIFF and same >= MIN_UNKNOWN_AGREEMENT)


def export_bundle(run, config: ExportConfig | None = None, *, progress: ProgressLike = None,
                  **options) -> ExportResult:
    """Export one trial of a run folder as a verified bundle.

    Args:
        run: run folder (path or RunFolder).
        config: the options (:class:`~transfer.export.export_config.ExportConfig`: the trial,
            ``out`` (default ``RUN/bundle``), a classical ``head`` to ship, ``quantize``
            (``int8`` / ``fp16``), a ``trt`` engine and its ``batch`` profile, the verification
            limits, ``calibrate`` (decide a temperature on the val split, applied into the graph
            only when it holds on val folds it was not fitted on, and fit the unknown-input
            scores; test images are only reported on), ``sign`` (a private key: the bundle is
            signed), ``force``); ``options`` are laid over it (``export_bundle(run, head="rf")``).
        progress: status lines of every step (a :class:`transfer.progress.Progress`).

    ``out`` is locked while the export runs (a second export to it exits with
    :class:`transfer.locks.LockedError`), and so is the run folder when a head may be fitted
    into it; staging folders of killed exports beside ``out`` are cleared first.

    Returns:
        :class:`ExportResult`.

    Raises:
        RunFolderError: missing run / unknown or unfinished trial.
        BundleError: ``out`` holds other files, or a bundle and ``force`` is off.
        LockedError: another process exports to ``out`` (or writes the run).
        VerificationError: the bundle was written but failed verification (marked invalid).
        TensorRTUnavailableError: ``trt`` requested without GPU (the ONNX bundle is kept).

    Example::

        export_bundle("runs/digits", head="rf", quantize="int8").bundle_dir   # runs/digits/bundle
    """
    cfg = replace(config or ExportConfig(), **options)
    p = as_progress(progress)
    t0 = time.time()
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    t = run.trial(cfg.trial).require_finished()
    key = load_signing_key(cfg.sign) if cfg.sign is not None else None
    out = Path(cfg.out) if cfg.out is not None else run.bundle_dir
    with locked(out, purpose="export"), \
            (locked(run.path, purpose="export") if cfg.head is not None else contextlib.nullcontext()):
        return _export(run, t, out, cfg, key=key, progress=p, t0=t0)


def _limits(cfg: ExportConfig) -> Limits:
    return Limits(atol=cfg.atol, min_agreement=cfg.min_agreement, max_accuracy_drop=cfg.max_accuracy_drop)


def _export(run, t, out: Path, cfg: ExportConfig, *, key, progress, t0) -> ExportResult:
    """The export, holding the locks: check ``out``, assemble and swap in the ONNX bundle, add an engine."""

    p = progress
    remove_stale_staging(out, p)
    check_out(out, cfg.force, run.path)
    with staged_bundle(out) as tmp:
        manifest, checks = _assemble(run, t, tmp, cfg, progress=p, key=key)
    p.say(f"bundle written to {out} ({'valid' if manifest['valid'] else 'INVALID'})"
          + (f", signed by {key.key_id}" if key is not None else ""))
    res = ExportResult(out, manifest, checks, bool(manifest["valid"]), time.time() - t0)
    if not res.ok:
        failed = [k for k, v in checks.items() if v.get("passed") is False]
        raise VerificationError(
            f"export verification failed for {', '.join(failed)}; the bundle at {out} is marked invalid",
            hint=f"see {out / 'verification.json'}; the limits are the probability tolerance, the minimum "
                 "top-1 agreement and the maximum accuracy drop of `transfer export`")
    if cfg.trt:
        _add_engine(out, cfg, run, t, progress=p, key=key)
        res.manifest = read_manifest(out)
    return res


def _assemble(run, t, tmp: Path, cfg: ExportConfig, *, progress, key=None):
    """The ONNX bundle in ``tmp``: fp32 model, its calibration, then int8 / fp16 and a head when
    asked, then the manifest (signed with ``key``)."""

    progress.say(f"export {t.name}: loading the Keras model")
    model = t.load_model()
    feature_dim = int(model.get_layer("features").output.shape[-1])
    num_classes = int(model.output.shape[-1])
    if num_classes != len(run.class_names):
        raise ExportError(f"model of {t.name} has {num_classes} outputs but the run has {len(run.class_names)} classes")
    x, y, used = verification_images(run, t.image_size, cfg.verify_images, progress, fold=t.fold)
    val = {str(p) for p in run.split_paths("val", fold=t.fold)[0]}
    ctx = ExportContext(run, t, tmp, x, y, _limits(cfg), progress, opset=cfg.opset, calib_images=cfg.calib_images,
                        extra={"model": model, "feature_dim": feature_dim, "num_classes": num_classes,
                               "cam_plan": _plan_cam(model, progress)},
                        choosing=np.array([str(u) in val for u in used], dtype=bool))
    run_step(ctx, _fp32_step())
    if cfg.calibrate:
        _calibrate(ctx, cfg.unknown_accept, cfg.unknown_default)
    steps = ([_int8_step()] if "int8" in cfg.reduced else []) + ([_fp16_step()] if "fp16" in cfg.reduced else [])
    if cfg.head is not None:
        steps.append(_head_step(cfg.head))
    for step in steps:
        run_step(ctx, step)
    calibration = {k: ctx.extra[k] for k in ("calibration", "unknown") if k in ctx.extra}
    calibration["cam"] = _cam_record(ctx)
    manifest = new_manifest(
        class_names=run.class_names, input_size=t.image_size, feature_dim=feature_dim, models=ctx.models,
        heads=ctx.heads, preprocessing=run.dataset.get("preprocessing"), tools=tool_versions(),
        source={"run": str(run.path.resolve()), "trial": t.name}, backbone=t.meta.get("backbone"), opset=cfg.opset,
        **calibration)
    return write_bundle(tmp, manifest, ctx.checks, images=used, sign_key=key), ctx.checks


# ---- the steps -------------------------------------------------------------------------

def _ort_runner(ctx: ExportContext, entry: dict) -> OrtRunner:
    """ONNX Runtime on the CPU on a model file of the bundle being made (sessions as the runtime makes them;
    the feature map too when the bundle has maps, for :func:`_map_agreement`)."""
    runner = OrtRunner(ctx.folder / entry["file"], "cpu", name=f"onnxruntime-{entry.get('precision', 'fp32')}")
    return runner.request("feature_map") if getattr(ctx.extra.get("cam_plan"), "available", False) else runner


def _plan_cam(model, progress):
    plan = plan_cam(model)
    progress.say(f"maps: class activation maps at layer {plan.layer} ({'x'.join(map(str, plan.shape))})"
                 if plan.available else f"maps: none in this bundle: {plan.reason}")
    return plan


def _cam_record(ctx: ExportContext) -> dict:
    """The manifest's ``cam`` record: the models whose graph has the feature map."""
    models = [k for k, e in ctx.models.items() if FEATURE_MAP in (e.get("outputs") or {})]
    return cam_record(ctx.extra["cam_plan"], models)


def _fp32_outputs(ctx: ExportContext) -> tuple[Outputs, str]:
    return ctx.outputs["onnx-fp32"], "onnx-fp32"


def _fp32_step() -> Step:
    """Keras -> ONNX fp32 (tf2onnx), compared with Keras itself."""
    def convert(ctx):
        ctx.progress.say(f"export {ctx.t.name}: converting to ONNX (opset {ctx.opset})")
        plan = ctx.extra["cam_plan"]
        io = export_onnx(ctx.extra["model"], ctx.folder / "model.onnx", opset=ctx.opset, extra=plan.extra_outputs)
        if plan.available:
            write_cam_weights(ctx.folder, plan)
        return {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime", **io}

    def keras(ctx):
        return KerasRunner(ctx.extra["model"], batch_size=32), "Keras"

    return Step("onnx-fp32", convert, _ort_runner, keras)


#: accuracy-aware int8: how many of the first compute layers (Conv / MatMul / Gemm) stay in float
#: on each attempt, until the int8 model passes its checks
FLOAT_LAYER_LADDER = (0, 1, 2, 4, 8)


def _int8_step() -> Step:
    """ONNX fp32 -> static int8 (calibrated on training images), compared with fp32 by accuracy.

    Accuracy-aware: when the fully quantized model fails its checks (accuracy drop, calibration,
    unknown decisions), the first compute layers -- the most sensitive to quantization -- are
    kept in float, one more step of :data:`FLOAT_LAYER_LADDER` at a time; the manifest records
    which layers stayed in float and why."""
    def convert(ctx):
        train_paths, _ = ctx.run.split_paths("train", fold=ctx.t.fold)

        calib = [b.astype(np.uint8) for b in calibration_batches(train_paths, ctx.t.image_size,
                                                                 count=ctx.calib_images, progress=ctx.progress,
                                                                 recipe=ctx.run.recipe)]
        entry, tried = None, []
        for k in FLOAT_LAYER_LADDER:
            info = quantize_int8(ctx.folder / "model.onnx", ctx.folder / "model.int8.onnx",
                                 (b.astype(np.float32) for b in calib), float_layers=k)
            stamp_onnx(ctx.folder / "model.int8.onnx", role="model", precision="int8")
            entry = {"file": "model.int8.onnx", "precision": "int8", "runtime": "onnxruntime", "quantization": info,
                     **{kk: ctx.models["onnx-fp32"][kk] for kk in ("inputs", "outputs", "opset")}}
            ctx.outputs[step.key] = run_all([_ort_runner(ctx, entry)], ctx.x)[0]
            ref, ref_name = _fp32_outputs(ctx)
            d, chosen_on = _ladder_judgement(ctx, step, ref.probs, ref_name)
            if d is None or d["passed"] or k == FLOAT_LAYER_LADDER[-1] or len(info.get("float_nodes", [])) < k:
                break
            tried.append({"float_layers": k, "why": _failure(d)})
            ctx.progress.say(f"int8 with {k} first layer(s) in float fails on {chosen_on} ({tried[-1]['why']}); "
                             "keeping one more in float")
        entry["quantization"]["attempts"] = tried
        entry["quantization"]["chosen_on"] = chosen_on
        return entry

    step = Step("onnx-int8", convert, _ort_runner, _fp32_outputs, check="accuracy",
                accuracy_names=("fp32_accuracy", "int8_accuracy"))
    return step


def _ladder_judgement(ctx: ExportContext, step: Step, ref: np.ndarray, ref_name: str) -> tuple[dict | None, str]:
    """The check that decides whether int8 keeps one more layer in float, and the images it read:
    the val images among the verification images (the test images only report: test chooses
    nothing). ``None`` when there is no val image: the ladder is not climbed, and says so."""
    m = ctx.choosing
    if m is None:
        return judge(ctx, step, ref, ref_name), f"the {len(ctx.y)} verification images"
    if not m.any():
        return None, "no val image (the run has no readable val split): the float-layer ladder is not climbed"
    return judge(ctx.rows(m), step, ref[m], ref_name), f"the {int(m.sum())} val images of the verification set"


def _failure(v: dict) -> str:
    """What made a reduced-precision check fail, in words."""
    why = []
    if v.get("accuracy_drop", 0) > v.get("limits", {}).get("max_accuracy_drop", 1):
        why.append(f"accuracy drop {100 * v['accuracy_drop']:.2f} points")
    c = v.get("calibration") or {}
    if c and c["ece_diff"] > c["max_ece_diff"]:
        why.append(f"ECE {c['ece']:.4f} vs fp32 {c['ece_fp32']:.4f}")
    if c and c["unknown_agreement"] < c["min_unknown_agreement"]:
        why.append(f"unknown decisions agree on {100 * c['unknown_agreement']:.1f} %")
    return ", ".join(why) or "not finite"


def _fp16_step() -> Step:
    """ONNX fp32 -> fp16 (onnxconverter-common, float32 input/outputs kept), compared with fp32 by
    accuracy; TensorRT fp16 engines are built from it."""
    def convert(ctx):
        ctx.progress.say("fp16: converting the ONNX model (float32 input and outputs kept)")

        info = convert_fp16(ctx.folder / "model.onnx", ctx.folder / "model.fp16.onnx")
        stamp_onnx(ctx.folder / "model.fp16.onnx", role="model", precision="fp16")
        return {"file": "model.fp16.onnx", "precision": "fp16", "runtime": "onnxruntime", "conversion": info,
                **{k: ctx.models["onnx-fp32"][k] for k in ("inputs", "outputs", "opset")}}

    return Step("onnx-fp16", convert, _ort_runner, _fp32_outputs, check="accuracy",
                accuracy_names=("fp32_accuracy", "fp16_accuracy"))


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
            _ort_runner(ctx, {"file": "model.onnx"}) as runner:
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


def _calibrate(ctx: ExportContext, accept: float, default: str = "auto") -> None:
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
        run_step(ctx, _temperature_step())
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
    with _ort_runner(ctx, {"file": "model.onnx"}) as runner:
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


def _temperature_step() -> Step:
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

    return Step("calibration", convert, _ort_runner, numpy_formula, atol=1e-5, name="onnx-fp32")


def _head_step(kind: str) -> Step:
    """A fitted classical head: its pickle shipped, its ONNX graph (skl2onnx) compared with the pickle."""
    def convert(ctx):

        run, t, d = ctx.run, ctx.t, ctx.extra["feature_dim"]
        pkl, meta = ensure_head(run, t.name, kind, progress=ctx.progress)
        refit = f"re-fit it: `transfer heads {run.path} --trial {t.name} --head {kind}`"
        if int(meta.get("feature_dim", -1)) != d:
            raise ExportError(f"head {pkl} takes {meta.get('feature_dim')}-d features but {t.name} gives {d}-d",
                              hint=refit)
        est, meta = load_head(pkl)
        n_in = getattr(est, "n_features_in_", None)
        if n_in is not None and int(n_in) != d:
            raise ExportError(f"head {pkl} was fitted on {n_in}-d features but {t.name} gives {d}-d "
                              f"(its record says {meta.get('feature_dim')})", hint=refit)
        classes = [int(c) for c in getattr(est, "classes_", meta.get("classes") or [])]
        n = ctx.extra["num_classes"]
        if classes != list(range(n)):
            raise ExportError(f"head {pkl} predicts classes {classes} but {t.name} has classes 0..{n - 1}; "
                              "its probability columns would not line up with the class names",
                              hint=refit.replace("re-fit it", "re-fit it on features of every class"))
        (ctx.folder / "heads").mkdir(exist_ok=True)
        shutil.copy2(pkl, ctx.folder / "heads" / f"{kind}.pkl")
        hio = head_to_onnx(est, d, ctx.folder / "heads" / f"{kind}.onnx", opset=ctx.opset)
        ctx.extra["estimator"] = est
        return {"kind": kind, "estimator": meta.get("estimator"), "pickle": f"heads/{kind}.pkl",
                "onnx": f"heads/{kind}.onnx", "input": hio["input"], "output": hio["output"],
                "sklearn": meta.get("sklearn"), "feature_dim": d, "classes": meta.get("classes"),
                "sha256": meta.get("sha256")}

    def onnx_head(ctx, entry):
        feats = ctx.outputs["onnx-fp32"].features.astype(np.float32)
        head = OnnxHead(ctx.folder / entry["onnx"], kind, input=entry["input"], output=entry["output"])
        return Outputs(feats, head(feats, None))

    def pickle_probs(ctx):
        feats = ctx.outputs["onnx-fp32"].features.astype(np.float32)
        return Outputs(feats, ctx.extra["estimator"].predict_proba(feats)), f"heads/{kind}.pkl"

    return Step(f"head-{kind}", convert, onnx_head, pickle_probs, atol=1e-3, group="heads", name=kind)


# ---- TensorRT engines (after the ONNX bundle is in place) -----------------------------

def _engine_step(precision: str, profile, workspace_mb: int, work: Path) -> Step:
    """An engine built from the bundle's ONNX model (int8: from a symmetric QDQ copy calibrated on
    training images), compared with ONNX fp32: parity for fp32, accuracy drop for fp16 / int8."""
    name = f"model.{precision}.engine"

    def convert(ctx):

        dev = device_info()
        # strongly typed networks take their precision from the graph: fp16 from the fp16 ONNX model
        src, qinfo = ctx.folder / ("model.fp16.onnx" if precision == "fp16" else "model.onnx"), None
        if precision == "int8":
            # explicit quantization (TensorRT >= 10.1 deprecates the implicit calibrators): a
            # symmetric QDQ model calibrated on training images; TensorRT reads its scales
            train_paths, _ = ctx.run.split_paths("train", fold=ctx.t.fold)
            src = work / "model.trt-int8.onnx"
            qinfo = prepare_int8_onnx(ctx.folder / "model.onnx", src,
                                      calibration_batches(train_paths, ctx.t.image_size, count=ctx.calib_images,
                                                          recipe=ctx.run.recipe,
                                                          progress=ctx.progress))
        ctx.progress.say(f"TensorRT {precision}: building on {dev['gpu']} (compute {dev['compute_capability']}, "
                         f"TensorRT {dev['tensorrt']})")
        info = build_engine(src, ctx.folder / name, precision=precision, profile=profile, input_hw=ctx.t.image_size,
                            workspace_mb=workspace_mb, timing_cache=ctx.folder.parent / ".transfer-trt-timing.cache")
        entry = engine_entry(name, precision, profile, dev)
        entry.update({k: info[k] for k in ("strongly_typed", "tf32") if k in info})
        if qinfo is not None:
            entry["quantization"] = {**qinfo, "mode": "explicit (QDQ)"}
        return entry

    def engine(ctx, entry):

        # the engine runs before the manifest lists it: a kill here leaves the verified ONNX bundle as it was
        manifest = dict(ctx.extra["manifest"], models={**ctx.extra["manifest"]["models"], f"trt-{precision}": entry},
                        files={**ctx.extra["manifest"]["files"], name: {}})
        return TrtRunner(Bundle(ctx.folder, manifest), f"trt-{precision}")

    def onnx_fp32(ctx):
        if "onnx-fp32" in ctx.outputs:  # run already (a calibrated bundle's engine keeps its unknown decisions)
            return ctx.outputs["onnx-fp32"], "onnx-fp32"
        return _ort_runner(ctx, {"file": "model.onnx"}), "onnx-fp32"

    return Step(f"trt-{precision}", convert, engine, onnx_fp32, check="parity" if precision == "fp32" else "accuracy",
                atol=1e-3, name=f"trt-{precision}")


def _add_engine(out: Path, cfg: ExportConfig, run, t, *, progress, key=None) -> None:
    """A TensorRT engine added to the verified ONNX bundle at ``out`` (verified against ONNX fp32)."""
    precision, profile, workspace_mb = cfg.trt, cfg.profile, cfg.workspace_mb
    try:
        require_tensorrt()  # exit 3; the ONNX bundle stays valid
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(
            exc.message, hint=f"the verified ONNX bundle is in {out}; to add the engine, run on the GPU machine "
                              f"`transfer export {run.path} --trt {precision} --force` (re-exports and replaces it)"
        ) from None
    manifest = read_manifest(out)
    checks, images = read_checks(out)
    x, y, _ = verification_images(run, t.image_size, cfg.verify_images, progress, fold=t.fold)
    ctx = ExportContext(run, t, out, x, y, Limits(atol=1e-3, min_agreement=0.999,
                                                 max_accuracy_drop=cfg.max_accuracy_drop),
                        progress, calib_images=cfg.calib_images, models=dict(manifest["models"]), checks=checks,
                        extra={"manifest": manifest})
    if (manifest.get("unknown") or {}).get("scores"):  # the engine must keep fp32's unknown decisions too

        ctx.extra["detector"] = make_detector(Bundle(out, manifest))
        ctx.outputs["onnx-fp32"] = run_all([_ort_runner(ctx, {"file": "model.onnx"})], ctx.x)[0]
    work = out.parent / f".{out.name}.trt-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        v = run_step(ctx, _engine_step(precision, profile, workspace_mb, work))
    except BaseException:
        (out / f"model.{precision}.engine").unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_bundle(out, dict(manifest, models=ctx.models), ctx.checks, images=images, sign_key=key)
    if not v["passed"]:
        raise VerificationError(f"TensorRT {precision} engine failed verification; bundle {out} is marked invalid",
                                hint="try a TensorRT fp16 engine or more calibration images")
