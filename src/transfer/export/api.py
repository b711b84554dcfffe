"""`transfer export`: a run's trial -> a verified deployment bundle (docs/design.md).

    export_bundle(run, *, trial="best", out=None, head=None, quantize=None, trt=None,
                  batch="1:8:32", calib_images=512, verify_images=256, atol=1e-4,
                  min_agreement=0.999, max_accuracy_drop=0.01, force=False, opset=17,
                  progress=None) -> ExportResult(bundle_dir, manifest, verification, ok)

Every model of a bundle goes through the same four moves, one :class:`Step` each: convert
(write the file and its manifest entry), run it on the verification images, compare with
its reference (:func:`transfer.export.verify.parity_check` for the same precision,
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

Stable API (used by the runtime tests): ``export_bundle`` keyword names above; the
result's ``bundle_dir`` loads with :func:`transfer.bundle.load_bundle`. ``verify_images``
defaults to 256 (at least 64; the val split, then test, is used, all of it when smaller).
``transfer verify BUNDLE`` is :func:`transfer.bundle.verify_bundle`. ``trt="int8"`` builds
from a symmetric QDQ model (explicit quantization, see :mod:`transfer.export.tensorrt`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, ExportError, TensorRTUnavailableError, VerificationError
from ..progress import ProgressLike, as_progress


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

    rf: Any                      # RunFolder
    t: Any                       # TrialInfo
    folder: Path                 # where the files are written
    x: np.ndarray                # verification images, float32 (n, H, W, 3)
    y: np.ndarray                # their labels
    limits: Limits
    progress: Any                # transfer.progress.Progress
    opset: int = 17
    calib_images: int = 512
    outputs: dict[str, tuple] = field(default_factory=dict)  # step key -> (features, probs) on x
    models: dict[str, dict] = field(default_factory=dict)
    heads: dict[str, dict] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)     # what a step hands to its reference (a head's estimator)


@dataclass(frozen=True)
class Step:
    """One model of the bundle: convert -> run -> compare -> record.

    Args:
        key: the verification key (``onnx-fp32``, ``onnx-int8``, ``head-rf``, ``trt-fp16``).
        convert: writes the file(s) under ``ctx.folder`` and returns the manifest entry.
        run: ``(features or None, probs)`` of the converted model on ``ctx.x``.
        reference: ``(probs, name)`` the candidate is compared with.
        check: ``"parity"`` (same precision: max |dp| and top-1 agreement) or ``"accuracy"``
            (reduced precision: the accuracy drop).
        atol: the parity tolerance (``None``: the export's ``atol``).
        group / name: where the entry goes in the manifest (``models`` or ``heads``) and its key.
        accuracy_names: also record the reference and candidate accuracy under these names
            (``fp32_accuracy``, ``int8_accuracy``).
    """

    key: str
    convert: Callable[[ExportContext], dict]
    run: Callable[[ExportContext, dict], tuple]
    reference: Callable[[ExportContext], tuple[np.ndarray, str]]
    check: str = "parity"
    atol: float | None = None
    group: str = "models"
    name: str = ""
    accuracy_names: tuple[str, str] | None = None


def run_step(ctx: ExportContext, step: Step) -> dict:
    """Convert, run, compare and record one step; returns its check."""
    from .verify import accuracy_check, parity_check, summary_line

    entry = step.convert(ctx)
    ctx.outputs[step.key] = step.run(ctx, entry)
    got = ctx.outputs[step.key][1]
    ref, ref_name = step.reference(ctx)
    if step.check == "parity":
        v = parity_check(ref, got, ctx.y, atol=ctx.limits.atol if step.atol is None else step.atol,
                         min_agreement=ctx.limits.min_agreement, reference_name=ref_name)
    else:
        v = accuracy_check(ref, got, ctx.y, max_accuracy_drop=ctx.limits.max_accuracy_drop, reference_name=ref_name)
    if step.accuracy_names:
        v.update(zip(step.accuracy_names, (v["reference_accuracy"], v["candidate_accuracy"])))
    getattr(ctx, step.group)[step.name or step.key] = entry
    ctx.checks[step.key] = v
    line = summary_line(step.key, v)
    if step.group == "heads":
        line += f" (head accuracy {v['reference_accuracy']:.4f})"
    ctx.progress.say(line)
    return v


def _number(name: str, what: str, v, lo: float, hi: float) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = float("nan")
    if not lo <= f <= hi:
        raise ConfigError(f"invalid {what} {v!r}; accepted: a number in [{lo:g}, {hi:g}]", option=name)
    return f


def _check_options(*, quantize, trt, batch, atol, min_agreement, max_accuracy_drop, verify_images, calib_images,
                   head):
    """Every option, before any work: returns ``(limits, TensorRT precision, batch profile, head kind)``."""
    from .tensorrt import check_precision, parse_batch_profile

    if quantize not in (None, "int8"):
        raise ConfigError(f"invalid quantization {quantize!r}; accepted: int8", option="quantize")
    trt_prec = check_precision(trt) if trt else None
    profile = parse_batch_profile(batch)
    limits = Limits(atol=_number("atol", "probability tolerance", atol, 0, 1),
                    min_agreement=_number("min_agreement", "minimum top-1 agreement", min_agreement, 0, 1),
                    max_accuracy_drop=_number("max_accuracy_drop", "maximum accuracy drop", max_accuracy_drop, 0, 1))
    for name, what, v, least in (("verify_images", "verification image count", verify_images, 64),
                                 ("calib_images", "calibration image count", calib_images, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ConfigError(f"invalid {what} {v!r}; accepted: an integer >= {least}"
                              + (" (a run with fewer val/test images is verified on all of them)" if least > 1 else ""),
                              option=name)
    if head is not None:
        from ..analysis.heads import check_kinds

        head = check_kinds([head])[0]
    return limits, trt_prec, profile, head


def export_bundle(run, *, trial: str = "best", out=None, head: str | None = None, quantize: str | None = None,
                  trt: str | None = None, batch: str = "1:8:32", calib_images: int = 512, verify_images: int = 256,
                  atol: float = 1e-4, min_agreement: float = 0.999, max_accuracy_drop: float = 0.01,
                  force: bool = False, opset: int = 17, workspace_mb: int = 2048,
                  progress: ProgressLike = None, sign: str | os.PathLike | None = None) -> ExportResult:
    """Export one trial of a run folder as a verified bundle.

    Args:
        run: run folder (path or RunFolder).
        trial: ``best`` or a trial name.
        out: bundle folder (default ``RUN/bundle``).
        head: also ship a classical head (``rf``, ``svm``, ``logreg``, ``knn``): the saved
            one of ``transfer heads`` or one fitted now from cached features.
        quantize: ``int8`` adds ``model.int8.onnx`` (static, calibrated on training images).
        trt: ``fp32|fp16|int8`` TensorRT engine (needs an NVIDIA GPU).
        batch: TensorRT optimization profile ``MIN:OPT:MAX``.
        calib_images: training images used to calibrate int8.
        verify_images: validation images Keras and ONNX Runtime are compared on.
        atol / min_agreement: fp32 limits (max |dp|, top-1 agreement).
        max_accuracy_drop: int8/fp16 accuracy drop limit (fraction, 0.01 = 1 point).
        force: replace an existing bundle at ``out`` (its hidden files are kept).
        progress: status lines of every step (a :class:`transfer.progress.Progress`).
        sign: a private key (``transfer keygen``): the bundle is signed with it
            (``signature.json``), so machines that trust its public key load it.

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
    import contextlib

    from ..locks import locked
    from ..runfolder import RunFolder

    p = as_progress(progress)
    t0 = time.time()
    rf = run if isinstance(run, RunFolder) else RunFolder(run)
    t = rf.trial(trial).require_finished()
    limits, trt_prec, profile, head = _check_options(
        quantize=quantize, trt=trt, batch=batch, atol=atol, min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop, verify_images=verify_images, calib_images=calib_images, head=head)
    key = None
    if sign is not None:
        from ..signing import load_signing_key

        key = load_signing_key(sign)
    out = Path(out) if out is not None else rf.bundle_dir
    with locked(out, purpose="export"), \
            (locked(rf.path, purpose="export") if head is not None else contextlib.nullcontext()):
        return _export(rf, t, out, force=force, head=head, quantize=quantize, trt_prec=trt_prec, profile=profile,
                       calib_images=calib_images, verify_images=verify_images, limits=limits, opset=opset,
                       workspace_mb=workspace_mb, key=key, progress=p, t0=t0)


def _export(rf, t, out: Path, *, force, head, quantize, trt_prec, profile, calib_images, verify_images, limits,
            opset, workspace_mb, key, progress, t0) -> ExportResult:
    """The export, holding the locks: check ``out``, assemble and swap in the ONNX bundle, add an engine."""
    from ..bundle import read_manifest
    from .bundle_writer import check_out, remove_stale_staging, staged_bundle

    p = progress
    remove_stale_staging(out, p)
    check_out(out, force, rf.path)
    with staged_bundle(out) as tmp:
        manifest, checks = _assemble(rf, t, tmp, head=head, quantize=quantize, calib_images=calib_images,
                                     verify_images=verify_images, limits=limits, opset=opset, progress=p, key=key)
    p.say(f"bundle written to {out} ({'valid' if manifest['valid'] else 'INVALID'})"
          + (f", signed by {key.key_id}" if key is not None else ""))
    res = ExportResult(out, manifest, checks, bool(manifest["valid"]), time.time() - t0)
    if not res.ok:
        failed = [k for k, v in checks.items() if v.get("passed") is False]
        raise VerificationError(
            f"export verification failed for {', '.join(failed)}; the bundle at {out} is marked invalid",
            hint=f"see {out / 'verification.json'}; the limits are the probability tolerance, the minimum "
                 "top-1 agreement and the maximum accuracy drop of `transfer export`")
    if trt_prec:
        _add_engine(out, trt_prec, profile, rf, t, calib_images, workspace_mb, p, limits, verify_images, key)
        res.manifest = read_manifest(out)
    return res


def _assemble(rf, t, tmp: Path, *, head, quantize, calib_images, verify_images, limits: Limits, opset, progress,
              key=None):
    """The ONNX bundle in ``tmp``: fp32 model, then int8 and a head when asked, then the manifest."""
    from ..bundle import new_manifest, write_bundle
    from .bundle_writer import tool_versions
    from .verify import verification_images

    progress.say(f"export {t.name}: loading the Keras model")
    model = t.load_model()
    feature_dim = int(model.get_layer("features").output.shape[-1])
    num_classes = int(model.output.shape[-1])
    if num_classes != len(rf.class_names):
        raise ExportError(f"model of {t.name} has {num_classes} outputs but the run has {len(rf.class_names)} classes")
    x, y, used = verification_images(rf, t.image_size, verify_images, progress, fold=t.fold)
    ctx = ExportContext(rf, t, tmp, x, y, limits, progress, opset=opset, calib_images=calib_images,
                        extra={"model": model, "feature_dim": feature_dim, "num_classes": num_classes})
    steps = [_fp32_step()]
    if quantize == "int8":
        steps.append(_int8_step())
    if head is not None:
        steps.append(_head_step(head))
    for step in steps:
        run_step(ctx, step)
    manifest = new_manifest(
        class_names=rf.class_names, input_size=t.image_size, feature_dim=feature_dim, models=ctx.models,
        heads=ctx.heads, preprocessing=rf.dataset.get("preprocessing"), tools=tool_versions(),
        source={"run": str(rf.path.resolve()), "trial": t.name}, backbone=t.meta.get("backbone"), opset=opset)
    return write_bundle(tmp, manifest, ctx.checks, images=used, sign_key=key), ctx.checks


# ---- the steps -------------------------------------------------------------------------

def _ort_outputs(ctx: ExportContext, entry: dict) -> tuple:
    from .verify import ort_session, run_ort

    return run_ort(ort_session(ctx.folder / entry["file"]), ctx.x)


def _fp32_outputs(ctx: ExportContext) -> tuple[np.ndarray, str]:
    return ctx.outputs["onnx-fp32"][1], "onnx-fp32"


def _fp32_step() -> Step:
    """Keras -> ONNX fp32 (tf2onnx), compared with Keras itself."""
    def convert(ctx):
        from .onnx import export_onnx

        ctx.progress.say(f"export {ctx.t.name}: converting to ONNX (opset {ctx.opset})")
        io = export_onnx(ctx.extra["model"], ctx.folder / "model.onnx", opset=ctx.opset)
        return {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime", **io}

    def keras(ctx):
        return np.asarray(ctx.extra["model"].predict(ctx.x, batch_size=32, verbose=0)), "Keras"

    return Step("onnx-fp32", convert, _ort_outputs, keras)


def _int8_step() -> Step:
    """ONNX fp32 -> static int8 (calibrated on training images), compared with fp32 by accuracy."""
    def convert(ctx):
        from .quantize import calibration_batches, quantize_int8

        train_paths, _ = ctx.rf.split_paths("train", fold=ctx.t.fold)
        from .onnx import stamp_onnx

        info = quantize_int8(ctx.folder / "model.onnx", ctx.folder / "model.int8.onnx",
                             calibration_batches(train_paths, ctx.t.image_size, count=ctx.calib_images,
                                                 progress=ctx.progress))
        stamp_onnx(ctx.folder / "model.int8.onnx", role="model", precision="int8")
        return {"file": "model.int8.onnx", "precision": "int8", "runtime": "onnxruntime", "quantization": info,
                **{k: ctx.models["onnx-fp32"][k] for k in ("inputs", "outputs", "opset")}}

    return Step("onnx-int8", convert, _ort_outputs, _fp32_outputs, check="accuracy",
                accuracy_names=("fp32_accuracy", "int8_accuracy"))


def _head_step(kind: str) -> Step:
    """A fitted classical head: its pickle shipped, its ONNX graph (skl2onnx) compared with the pickle."""
    def convert(ctx):
        from ..analysis.heads import ensure_head, load_head
        from .head_onnx import head_to_onnx

        rf, t, d = ctx.rf, ctx.t, ctx.extra["feature_dim"]
        pkl, meta = ensure_head(rf, t.name, kind, progress=ctx.progress)
        refit = f"re-fit it: `transfer heads {rf.path} --trial {t.name} --head {kind}`"
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

    def run(ctx, entry):
        from .verify import ort_session

        feats = ctx.outputs["onnx-fp32"][0].astype(np.float32)
        sess = ort_session(ctx.folder / entry["onnx"])
        return None, sess.run([entry["output"]], {entry["input"]: feats})[0]

    def pickle_probs(ctx):
        feats = ctx.outputs["onnx-fp32"][0].astype(np.float32)
        return ctx.extra["estimator"].predict_proba(feats), f"heads/{kind}.pkl"

    return Step(f"head-{kind}", convert, run, pickle_probs, atol=1e-3, group="heads", name=kind)


# ---- TensorRT engines (after the ONNX bundle is in place) -----------------------------

def _engine_step(precision: str, profile, workspace_mb: int, work: Path) -> Step:
    """An engine built from the bundle's ONNX model (int8: from a symmetric QDQ copy calibrated on
    training images), compared with ONNX fp32: parity for fp32, accuracy drop for fp16 / int8."""
    name = f"model.{precision}.engine"

    def convert(ctx):
        from .tensorrt import build_engine, device_info, engine_entry, prepare_int8_onnx
        from .quantize import calibration_batches

        dev = device_info()
        src, qinfo = ctx.folder / "model.onnx", None
        if precision == "int8":
            # explicit quantization (TensorRT >= 10.1 deprecates the implicit calibrators): a
            # symmetric QDQ model calibrated on training images; TensorRT reads its scales
            train_paths, _ = ctx.rf.split_paths("train", fold=ctx.t.fold)
            src = work / "model.trt-int8.onnx"
            qinfo = prepare_int8_onnx(ctx.folder / "model.onnx", src,
                                      calibration_batches(train_paths, ctx.t.image_size, count=ctx.calib_images,
                                                          progress=ctx.progress))
        ctx.progress.say(f"TensorRT {precision}: building on {dev['gpu']} (compute {dev['compute_capability']}, "
                         f"TensorRT {dev['tensorrt']})")
        build_engine(src, ctx.folder / name, precision=precision, profile=profile, input_hw=ctx.t.image_size,
                     workspace_mb=workspace_mb, timing_cache=ctx.folder.parent / ".transfer-trt-timing.cache")
        entry = engine_entry(name, precision, profile, dev)
        if qinfo is not None:
            entry["quantization"] = {**qinfo, "mode": "explicit (QDQ)"}
        return entry

    def run(ctx, entry):
        from ..bundle import Bundle
        from ..runtime.runners import TrtRunner

        # the engine runs before the manifest lists it: a kill here leaves the verified ONNX bundle as it was
        manifest = dict(ctx.extra["manifest"], models={**ctx.extra["manifest"]["models"], f"trt-{precision}": entry},
                        files={**ctx.extra["manifest"]["files"], name: {}})
        return TrtRunner(Bundle(ctx.folder, manifest), f"trt-{precision}").run(ctx.x)

    def onnx_fp32(ctx):
        return _ort_outputs(ctx, {"file": "model.onnx"})[1], "onnx-fp32"

    return Step(f"trt-{precision}", convert, run, onnx_fp32, check="parity" if precision == "fp32" else "accuracy",
                atol=1e-3, name=f"trt-{precision}")


def _add_engine(out: Path, precision: str, profile, rf, t, calib_images: int, workspace_mb: int, progress,
                limits: Limits, verify_images: int = 256, key=None) -> None:
    from ..bundle import read_checks, read_manifest, write_bundle
    from .tensorrt import require_tensorrt
    from .verify import verification_images

    try:
        require_tensorrt()  # exit 3; the ONNX bundle stays valid
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(
            exc.message, hint=f"the verified ONNX bundle is in {out}; to add the engine, run on the GPU machine "
                              f"`transfer export {rf.path} --trt {precision} --force` (re-exports and replaces it)"
        ) from None
    manifest = read_manifest(out)
    checks, images = read_checks(out)
    x, y, _ = verification_images(rf, t.image_size, verify_images, progress, fold=t.fold)
    ctx = ExportContext(rf, t, out, x, y, Limits(atol=1e-3, min_agreement=0.999,
                                                 max_accuracy_drop=limits.max_accuracy_drop),
                        progress, calib_images=calib_images, models=dict(manifest["models"]), checks=checks,
                        extra={"manifest": manifest})
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
