"""`transfer export`: a run's trial -> a verified deployment bundle (docs/design.md).

    export_bundle(run, *, trial="best", out=None, head=None, quantize=None, trt=None,
                  batch="1:8:32", calib_images=512, verify_images=256, atol=1e-4,
                  min_agreement=0.999, max_accuracy_drop=0.01, force=False, opset=17,
                  progress=print) -> ExportResult(bundle_dir, manifest, verification, ok)

The bundle is assembled in a hidden sibling folder and renamed into place only when
complete, so an interrupted export never leaves a half bundle that looks valid. A bundle
that fails verification is still written, with ``"valid": false``, and the call raises
:class:`~transfer.errors.VerificationError` afterwards (non-zero exit). TensorRT engines
are built after the ONNX bundle is in place: without a GPU the call raises
:class:`~transfer.errors.TensorRTUnavailableError` (exit code 3) and the verified ONNX
bundle stays.

Stable API (used by the runtime tests): ``export_bundle`` keyword names above; the
result's ``bundle_dir`` loads with :func:`transfer.bundle.load_bundle`. ``verify_images``
defaults to 256 (the issue asks for at least 64; the val split, then test, is used, all
of it when smaller). ``transfer verify BUNDLE`` is :func:`transfer.bundle.verify_bundle`.
--trt int8 builds from a symmetric QDQ model (explicit quantization, see export.tensorrt).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import finalize_manifest, read_manifest
from ..errors import ConfigError, ExportError, TensorRTUnavailableError, VerificationError
from ..fsutil import write_json_atomic

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict
    verification: dict
    ok: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _number(name: str, v, lo: float, hi: float) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = float("nan")
    if not lo <= f <= hi:
        raise ConfigError(f"invalid {name} {v!r}; accepted: a number in [{lo:g}, {hi:g}]")
    return f


def export_bundle(run, *, trial: str = "best", out=None, head: str | None = None, quantize: str | None = None,
                  trt: str | None = None, batch: str = "1:8:32", calib_images: int = 512, verify_images: int = 256,
                  atol: float = 1e-4, min_agreement: float = 0.999, max_accuracy_drop: float = 0.01,
                  force: bool = False, opset: int = 17, workspace_mb: int = 2048,
                  progress: Progress | None = print) -> ExportResult:
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
        force: replace an existing bundle at ``out``.

    Returns:
        :class:`ExportResult`.

    Raises:
        RunFolderError: missing run / unknown or unfinished trial.
        BundleError: ``out`` holds other files and ``force`` is off.
        VerificationError: the bundle was written but failed verification (marked invalid).
        TensorRTUnavailableError: ``trt`` requested without GPU (the ONNX bundle is kept).

    Example:
        >>> export_bundle("runs/digits", head="rf", quantize="int8").bundle_dir  # doctest: +SKIP
        PosixPath('runs/digits/bundle')
    """
    from ..runfolder import RunFolder
    from .bundle_writer import check_out, staged_bundle
    from .tensorrt import check_precision, parse_batch_profile

    say = progress or (lambda s: None)
    t0 = time.time()
    rf = run if isinstance(run, RunFolder) else RunFolder(run)
    t = rf.trial(trial).require_finished()
    # validate every option before any work
    if quantize not in (None, "int8"):
        raise ConfigError(f"invalid --quantize {quantize!r}; accepted: int8")
    trt_prec = check_precision(trt) if trt else None
    profile = parse_batch_profile(batch)
    atol = _number("--atol", atol, 0, 1)
    min_agreement = _number("--min-agreement", min_agreement, 0, 1)
    max_accuracy_drop = _number("--max-accuracy-drop", max_accuracy_drop, 0, 1)
    for name, v, least in (("--verify-images", verify_images, 64), ("--calib-images", calib_images, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ConfigError(f"invalid {name} {v!r}; accepted: an integer >= {least}"
                              + (" (a run with fewer val/test images is verified on all of them)" if least > 1 else ""))
    if head is not None:
        from ..analysis.heads import check_kinds

        head = check_kinds([head])[0]
    out = Path(out) if out is not None else rf.path / "bundle"
    check_out(out, force, rf.path)

    with staged_bundle(out) as tmp:
        manifest, verification = _assemble(rf, t, tmp, head=head, quantize=quantize, calib_images=calib_images,
                                           verify_images=verify_images, atol=atol, min_agreement=min_agreement,
                                           max_accuracy_drop=max_accuracy_drop, opset=opset, say=say)
    say(f"bundle written to {out} ({'valid' if manifest['valid'] else 'INVALID'})")
    res = ExportResult(out, manifest, verification, bool(manifest["valid"]), time.time() - t0)
    if not res.ok:
        failed = [k for k, v in verification.items() if isinstance(v, dict) and v.get("passed") is False]
        raise VerificationError(
            f"export verification failed for {', '.join(failed)}; the bundle at {out} is marked invalid",
            hint=f"see {out / 'verification.json'}; the limits are --atol, --min-agreement, --max-accuracy-drop",
        )
    if trt_prec:
        _add_engine(out, trt_prec, profile, rf, t, calib_images, workspace_mb, say, max_accuracy_drop, verify_images)
        res.manifest = read_manifest(out)
    return res


def _assemble(rf, t, tmp: Path, *, head, quantize, calib_images, verify_images, atol, min_agreement,
              max_accuracy_drop, opset, say):
    from .bundle_writer import tool_versions
    from .onnx import export_onnx
    from .verify import accuracy_check, ort_session, parity_check, run_ort, summary_line, verification_images

    size = t.image_size
    say(f"export {t.name}: loading the Keras model")
    model = t.load_model()
    feature_dim = int(model.get_layer("features").output.shape[-1])
    num_classes = int(model.output.shape[-1])
    if num_classes != len(rf.class_names):
        raise ExportError(f"model of {t.name} has {num_classes} outputs but the run has {len(rf.class_names)} classes")
    say(f"export {t.name}: converting to ONNX (opset {opset})")
    io = export_onnx(model, tmp / "model.onnx", opset=opset)
    x, y, used = verification_images(rf, size, verify_images, say, fold=t.fold)
    keras_probs = np.asarray(model.predict(x, batch_size=32, verbose=0))
    feats, probs = run_ort(ort_session(tmp / "model.onnx"), x)
    v32 = parity_check(keras_probs, probs, y, atol=atol, min_agreement=min_agreement, reference_name="Keras")
    verification: dict = {"onnx-fp32": v32}
    say(summary_line("onnx-fp32", v32))
    models = {"onnx-fp32": {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime", **io}}

    if quantize == "int8":
        from .quantize import calibration_batches, quantize_int8

        train_paths, _ = rf.split_paths("train", fold=t.fold)
        say(f"quantize int8: calibrating on {min(calib_images, len(train_paths))} training image(s)")
        info = quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx",
                             calibration_batches(train_paths, size, count=calib_images))
        _, p8 = run_ort(ort_session(tmp / "model.int8.onnx"), x)
        v8 = accuracy_check(probs, p8, y, max_accuracy_drop=max_accuracy_drop, reference_name="onnx-fp32")
        v8.update({"fp32_accuracy": v8["reference_accuracy"], "int8_accuracy": v8["candidate_accuracy"]})
        verification["onnx-int8"] = v8
        models["onnx-int8"] = {"file": "model.int8.onnx", "precision": "int8", "runtime": "onnxruntime",
                               "quantization": info, **io}
        say(summary_line("onnx-int8", v8))

    heads = {}
    if head is not None:
        from ..analysis.heads import ensure_head, load_head
        from .head_onnx import head_to_onnx

        pkl, meta = ensure_head(rf, t.name, head, progress=say)
        if int(meta.get("feature_dim", -1)) != feature_dim:
            raise ExportError(f"head {pkl} takes {meta.get('feature_dim')}-d features but {t.name} gives {feature_dim}-d",
                              hint=f"re-fit it: `transfer heads {rf.path} --trial {t.name} --head {head}`")
        est, meta = load_head(pkl)
        n_in = getattr(est, "n_features_in_", None)
        if n_in is not None and int(n_in) != feature_dim:
            raise ExportError(f"head {pkl} was fitted on {n_in}-d features but {t.name} gives {feature_dim}-d "
                              f"(its record says {meta.get('feature_dim')})",
                              hint=f"re-fit it: `transfer heads {rf.path} --trial {t.name} --head {head}`")
        classes = [int(c) for c in getattr(est, "classes_", meta.get("classes") or [])]
        if classes != list(range(num_classes)):
            raise ExportError(f"head {pkl} predicts classes {classes} but {t.name} has classes 0..{num_classes - 1}; "
                              "its probability columns would not line up with the class names",
                              hint=f"re-fit it on features of every class: `transfer heads {rf.path} --trial {t.name} "
                                   f"--head {head}`")
        (tmp / "heads").mkdir()
        shutil.copy2(pkl, tmp / "heads" / f"{head}.pkl")
        hio = head_to_onnx(est, feature_dim, tmp / "heads" / f"{head}.onnx", opset=opset)
        hs = ort_session(tmp / "heads" / f"{head}.onnx")
        p_onnx = hs.run([hio["output"]], {hio["input"]: feats.astype(np.float32)})[0]
        p_pkl = est.predict_proba(feats.astype(np.float32))
        vh = parity_check(p_pkl, p_onnx, y, atol=1e-3, min_agreement=min_agreement,
                          reference_name=f"heads/{head}.pkl")
        verification[f"head-{head}"] = vh
        say(summary_line(f"head-{head}", vh) + f" (head accuracy {vh['reference_accuracy']:.4f})")
        heads[head] = {"kind": head, "estimator": meta.get("estimator"), "pickle": f"heads/{head}.pkl",
                       "onnx": f"heads/{head}.onnx", "input": hio["input"], "output": hio["output"],
                       "sklearn": meta.get("sklearn"), "feature_dim": feature_dim,
                       "classes": meta.get("classes"), "sha256": meta.get("sha256")}

    h, w = size
    manifest = {
        "format": "transfer-bundle", "format_version": 1,
        "valid": all(v.get("passed", True) for v in verification.values()),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tools": tool_versions(),
        "source": {"run": str(rf.path.resolve()), "trial": t.name},
        "class_names": list(rf.class_names),
        "input": {"name": "image", "height": h, "width": w, "channels": 3, "color": "RGB", "dtype": "float32",
                  "range": [0, 255], "layout": "NHWC"},
        "preprocessing": rf.dataset.get("preprocessing") or _preprocessing(),
        "backbone": t.meta.get("backbone"), "feature_dim": feature_dim, "num_classes": num_classes,
        "opset": opset, "models": models, "heads": heads,
        "default_head": "network",
        "verification": {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)} for k, v in verification.items()},
    }
    # the class names again as a hashed file: an edited manifest cannot relabel predictions
    write_json_atomic(tmp / "labels.json", list(rf.class_names))
    manifest["labels"] = "labels.json"
    write_json_atomic(tmp / "verification.json", {"images": used, **verification})
    manifest = finalize_manifest(tmp, manifest)
    return manifest, verification


def _preprocessing() -> dict:
    from ..data.image import PREPROCESSING

    return dict(PREPROCESSING)


def _add_engine(out: Path, precision: str, profile, rf, t, calib_images: int, workspace_mb: int, say,
                max_accuracy_drop: float = 0.01, verify_images: int = 256) -> None:
    from .quantize import calibration_batches
    from .tensorrt import build_engine, device_info, engine_entry, require_tensorrt

    try:
        require_tensorrt()  # exit 3; the ONNX bundle stays valid
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(
            exc.message, hint=f"the verified ONNX bundle is in {out}; to add the engine, run on the GPU machine "
                              f"`transfer export {rf.path} --trt {precision} --force` (re-exports and replaces it)"
        ) from None
    manifest = read_manifest(out)
    dev = device_info()
    name = f"model.{precision}.engine"
    tmp_engine = out / f".{name}.partial"
    src, qinfo = out / "model.onnx", None
    work = out.parent / f".{out.name}.trt-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        if precision == "int8":
            # explicit quantization (TensorRT >= 10.1 deprecates the implicit calibrators): a
            # symmetric QDQ model calibrated on training images; TensorRT reads its scales
            from .tensorrt import prepare_int8_onnx

            train_paths, _ = rf.split_paths("train", fold=t.fold)
            say(f"TensorRT int8: calibrating a symmetric QDQ model on {min(calib_images, len(train_paths))} "
                "training image(s)")
            src = work / "model.trt-int8.onnx"
            qinfo = prepare_int8_onnx(out / "model.onnx", src,
                                      calibration_batches(train_paths, t.image_size, count=calib_images))
        say(f"TensorRT {precision}: building on {dev['gpu']} (compute {dev['compute_capability']}, "
            f"TensorRT {dev['tensorrt']})")
        build_engine(src, tmp_engine, precision=precision, profile=profile, input_hw=t.image_size,
                     workspace_mb=workspace_mb, timing_cache=out.parent / ".transfer-trt-timing.cache")
    except BaseException:
        if tmp_engine.exists():
            tmp_engine.unlink()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.replace(tmp_engine, out / name)
    key = f"trt-{precision}"
    manifest["models"][key] = engine_entry(name, precision, profile, dev)
    if qinfo is not None:
        manifest["models"][key]["quantization"] = {**qinfo, "mode": "explicit (QDQ)"}
    manifest = finalize_manifest(out, manifest)
    # verify the engine like the ONNX models: agreement with ONNX fp32 and the accuracy drop
    from ..bundle import Bundle
    from ..runtime.runners import OrtRunner, TrtRunner
    from .verify import accuracy_check, parity_check, summary_line, verification_images

    x, y, _ = verification_images(rf, t.image_size, verify_images, say, fold=t.fold)
    b = Bundle(out, manifest)
    ref = OrtRunner(b, "onnx-fp32", "cpu").run(x)[1]
    got = TrtRunner(b, key).run(x)[1]
    if precision == "fp32":
        v = parity_check(ref, got, y, atol=1e-3, min_agreement=0.999, reference_name="onnx-fp32")
    else:
        v = accuracy_check(ref, got, y, max_accuracy_drop=max_accuracy_drop, reference_name="onnx-fp32")
    manifest["verification"][key] = {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
    say(summary_line(key, v))
    if not v["passed"]:
        manifest["valid"] = False
    finalize_manifest(out, manifest)
    if not v["passed"]:
        raise VerificationError(f"TensorRT {precision} engine failed verification; bundle {out} is marked invalid",
                                hint="try --trt fp16 or more --calib-images")
