"""`transfer export`: a run's trial -> a verified deployment bundle (docs/design.md).

    export_bundle(run, config=ExportConfig(...), *, progress=None, **options)
        -> ExportResult(bundle_dir, manifest, verification, ok)

Every model of a bundle goes through the same four moves, one :class:`~transfer.export.step.Step` each: convert
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle, read_manifest
from ..bundle_write import new_manifest, read_checks, write_bundle
from ..errors import (
    ConfigError,
    ExportError,
    ModelError,
    TensorRTUnavailableError,
    VerificationError,
)
from ..locks import locked
from ..options import replace
from ..progress import ProgressLike, as_progress
from ..runfolder import RunFolder
from ..runtime.unknown import make_detector
from ..signing import load_signing_key
from .bundle_writer import check_out, remove_stale_staging, staged_bundle, tool_versions
from .calibration_stage import run_calibration
from .cam_export import FEATURE_MAP, cam_record, cam_with_model, graph_plan, plan_cam
from .export_config import ExportConfig
from .model_steps import engine_step, fp16_step, fp32_step, head_step, int8_step
from .step import ExportContext, Limits, ort_runner, run_step
from .tensorrt import require_tensorrt
from .verify import run_all, verification_images


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict
    verification: dict
    ok: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


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
    cam_plan = _plan_cam(model, t.meta.get("gradcam_layer"), cfg.cam_layer, progress)  # a bad --cam-layer fails here
    x, y, used = verification_images(run, t.image_size, cfg.verify_images, progress, fold=t.fold)
    val = {str(p) for p in run.split_paths("val", fold=t.fold)[0]}
    ctx = ExportContext(run, t, tmp, x, y, _limits(cfg), progress, opset=cfg.opset, calib_images=cfg.calib_images,
                        extra={"model": model, "feature_dim": feature_dim, "num_classes": num_classes,
                               "cam_plan": cam_plan},
                        choosing=np.array([str(u) in val for u in used], dtype=bool))
    run_step(ctx, fp32_step())
    if cfg.calibrate:
        run_calibration(ctx, cfg.unknown_accept, cfg.unknown_default)
    steps = ([int8_step()] if "int8" in cfg.reduced else []) + ([fp16_step()] if "fp16" in cfg.reduced else [])
    if cfg.head is not None:
        steps.append(head_step(cfg.head))
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


def _plan_cam(model, default_layer, cam_layer, progress):
    try:  # a --cam-layer the model does not have, or not a spatial one: said before the images are read
        plan = (plan_cam(model, default_layer) if cam_layer is None else
                graph_plan(model, f"--cam-layer {cam_layer} asked for Grad-CAM at that layer", layer=cam_layer))
    except ModelError as exc:
        raise ConfigError(f"invalid cam_layer: {cam_layer!r}: {exc.message}", hint=exc.hint,
                          option="cam_layer") from None
    if plan.available and plan.via_graph:
        progress.say(f"maps: Grad-CAM graph at layer {plan.layer} ({'x'.join(map(str, plan.shape))}): {plan.why_graph}")
    elif plan.available:
        progress.say(f"maps: class activation maps at layer {plan.layer} ({'x'.join(map(str, plan.shape))})")
    else:
        progress.say(f"maps: none in this bundle: {plan.reason}")
    return plan


def _cam_record(ctx: ExportContext) -> dict:
    """The manifest's ``cam`` record: the models whose graph has the feature map (with a Grad-CAM
    graph, every ONNX model: the graph explains the class each predicts)."""
    plan = ctx.extra["cam_plan"]
    models = [k for k, e in ctx.models.items() if (FEATURE_MAP in (e.get("outputs") or {}) if not plan.via_graph
                                                   else e.get("runtime", "onnxruntime") == "onnxruntime")]
    return cam_record(ctx.extra["cam_plan"], models)


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
        ctx.outputs["onnx-fp32"] = run_all([ort_runner(ctx, {"file": "model.onnx"})], ctx.x)[0]
    work = out.parent / f".{out.name}.trt-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        v = run_step(ctx, engine_step(precision, profile, workspace_mb, work))
    except BaseException:
        (out / f"model.{precision}.engine").unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    engine_key = f"trt-{precision}"
    if engine_key in ctx.models and "cam" in manifest:  # an engine built from a model with maps explains too
        manifest = dict(manifest, cam=cam_with_model(manifest["cam"], engine_key, ctx.models[engine_key]))
    write_bundle(out, dict(manifest, models=ctx.models), ctx.checks, images=images, sign_key=key)
    if not v["passed"]:
        raise VerificationError(f"TensorRT {precision} engine failed verification; bundle {out} is marked invalid",
                                hint="try a TensorRT fp16 engine or more calibration images")
