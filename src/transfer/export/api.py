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
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..bundle import MANIFEST, finalize_manifest, read_manifest
from ..errors import BundleError, ConfigError, DataError, ExportError, ImageDecodeError, VerificationError
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


def _versions() -> dict:
    out = {"transfer": __version__}
    for dist in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "scikit-learn", "skl2onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "another bundle" if (out / MANIFEST).is_file() else "files"
        raise BundleError(f"output folder {out} already holds {what}",
                          hint="pass --force to replace it, or choose another --out")


def _verification_images(run, size, n: int, progress: Progress):
    """Up to ``n`` readable images of the val split (then test), with labels."""
    from ..data.image import load_image

    xs, ys, used = [], [], []
    for split in ("val", "test"):
        paths, labels = run.split_paths(split)
        for p, y in zip(paths, labels):
            if len(xs) >= n:
                break
            try:
                xs.append(load_image(p, size))
            except ImageDecodeError:
                continue
            ys.append(int(y))
            used.append(str(p))
        if len(xs) >= n:
            break
    if not xs:
        raise DataError(f"no readable validation or test image in {run.path} to verify the export with",
                        hint="check the data folder named in dataset.json is still there")
    progress(f"verification set: {len(xs)} image(s) from the val/test splits")
    return np.stack(xs).astype(np.float32), np.asarray(ys), used


def _ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_ort(sess, x: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    feats, probs = [], []
    for i in range(0, len(x), batch):
        f, p = sess.run(["features", "probs"], {"image": x[i:i + batch]})
        feats.append(f)
        probs.append(p)
    return np.concatenate(feats), np.concatenate(probs)


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
    from ..runtime.compare import compare_outputs
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
    for name, v, lo, hi in (("--atol", atol, 0, 1), ("--min-agreement", min_agreement, 0, 1),
                            ("--max-accuracy-drop", max_accuracy_drop, 0, 1)):
        if not lo <= float(v) <= hi:
            raise ConfigError(f"invalid {name} {v!r}; accepted: a number in [{lo}, {hi}]")
    if verify_images < 1 or calib_images < 1:
        raise ConfigError("--verify-images and --calib-images must be positive")
    if head is not None:
        from ..trainer.heads import check_kinds

        head = check_kinds([head])[0]
    out = Path(out) if out is not None else rf.path / "bundle"
    _check_out(out, force)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        result = _assemble(rf, t, tmp, head=head, quantize=quantize, calib_images=calib_images,
                           verify_images=verify_images, atol=atol, min_agreement=min_agreement,
                           max_accuracy_drop=max_accuracy_drop, opset=opset, say=say,
                           compare_outputs=compare_outputs)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest, verification = result
    say(f"bundle written to {out} ({'valid' if manifest['valid'] else 'INVALID'})")
    res = ExportResult(out, manifest, verification, bool(manifest["valid"]), time.time() - t0)
    if not res.ok:
        failed = [k for k, v in verification.items() if isinstance(v, dict) and v.get("passed") is False]
        raise VerificationError(
            f"export verification failed for {', '.join(failed)}; the bundle at {out} is marked invalid",
            hint=f"see {out / 'verification.json'}; the limits are --atol, --min-agreement, --max-accuracy-drop",
        )
    if trt_prec:
        _add_engine(out, trt_prec, profile, rf, t, calib_images, workspace_mb, say, max_accuracy_drop)
        res.manifest = read_manifest(out)
    return res


def _assemble(rf, t, tmp: Path, *, head, quantize, calib_images, verify_images, atol, min_agreement,
              max_accuracy_drop, opset, say, compare_outputs):
    from .onnx import export_onnx

    size = t.image_size
    say(f"export {t.name}: loading the Keras model")
    model = t.load_model()
    feature_dim = int(model.get_layer("features").output.shape[-1])
    num_classes = int(model.output.shape[-1])
    if num_classes != len(rf.class_names):
        raise ExportError(f"model of {t.name} has {num_classes} outputs but the run has {len(rf.class_names)} classes")
    say(f"export {t.name}: converting to ONNX (opset {opset})")
    io = export_onnx(model, tmp / "model.onnx", opset=opset)
    x, y, used = _verification_images(rf, size, verify_images, say)
    keras_probs = np.asarray(model.predict(x, batch_size=32, verbose=0))
    sess = _ort_session(tmp / "model.onnx")
    feats, probs = _run_ort(sess, x)
    v32 = compare_outputs(keras_probs, probs, y)
    v32.update({"passed": v32["top1_agreement"] >= min_agreement and v32["max_abs_diff"] <= atol,
                "limits": {"atol": atol, "min_agreement": min_agreement}, "reference": "keras"})
    verification: dict = {"onnx-fp32": v32}
    say(f"verify onnx-fp32 vs Keras on {len(x)} images: max |dp| {v32['max_abs_diff']:.2e}, "
        f"mean {v32['mean_abs_diff']:.2e}, top-1 agreement {v32['top1_agreement']:.4f} "
        f"-> {'PASS' if v32['passed'] else 'FAIL'}")
    models = {"onnx-fp32": {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime", **io}}

    if quantize == "int8":
        from .quantize import calibration_batches, quantize_int8

        train_paths, _ = rf.split_paths("train")
        say(f"quantize int8: calibrating on {min(calib_images, len(train_paths))} training image(s)")
        info = quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx",
                             calibration_batches(train_paths, size, count=calib_images))
        _, p8 = _run_ort(_ort_session(tmp / "model.int8.onnx"), x)
        v8 = compare_outputs(probs, p8, y)
        v8.update({"passed": v8["accuracy_drop"] <= max_accuracy_drop, "reference": "onnx-fp32",
                   "limits": {"max_accuracy_drop": max_accuracy_drop}, "fp32_accuracy": v8["reference_accuracy"],
                   "int8_accuracy": v8["candidate_accuracy"]})
        verification["onnx-int8"] = v8
        models["onnx-int8"] = {"file": "model.int8.onnx", "precision": "int8", "runtime": "onnxruntime",
                               "quantization": info, **io}
        say(f"verify onnx-int8: accuracy {v8['int8_accuracy']:.4f} vs fp32 {v8['fp32_accuracy']:.4f} "
            f"(drop {100 * v8['accuracy_drop']:.2f} points, limit {100 * max_accuracy_drop:.2f}), "
            f"top-1 agreement {v8['top1_agreement']:.4f} -> {'PASS' if v8['passed'] else 'FAIL'}")

    heads = {}
    if head is not None:
        from ..trainer.heads import ensure_head, load_head
        from .heads import head_to_onnx

        pkl, meta = ensure_head(rf, t.name, head, progress=say)
        if int(meta.get("feature_dim", -1)) != feature_dim:
            raise ExportError(f"head {pkl} takes {meta.get('feature_dim')}-d features but {t.name} gives {feature_dim}-d",
                              hint=f"re-fit it: `transfer heads {rf.path} --trial {t.name} --head {head}`")
        est, meta = load_head(pkl)
        (tmp / "heads").mkdir()
        shutil.copy2(pkl, tmp / "heads" / f"{head}.pkl")
        hio = head_to_onnx(est, feature_dim, tmp / "heads" / f"{head}.onnx", opset=opset)
        import onnxruntime as ort

        hs = ort.InferenceSession(str(tmp / "heads" / f"{head}.onnx"), providers=["CPUExecutionProvider"])
        p_onnx = hs.run([hio["output"]], {hio["input"]: feats.astype(np.float32)})[0]
        p_pkl = est.predict_proba(feats.astype(np.float32))
        vh = compare_outputs(p_pkl, p_onnx, y)
        vh.update({"passed": vh["top1_agreement"] >= min_agreement and vh["max_abs_diff"] <= 1e-3,
                   "reference": f"heads/{head}.pkl", "limits": {"atol": 1e-3, "min_agreement": min_agreement}})
        verification[f"head-{head}"] = vh
        say(f"verify head {head}: pickle vs ONNX max |dp| {vh['max_abs_diff']:.2e}, top-1 agreement "
            f"{vh['top1_agreement']:.4f}; accuracy {vh['reference_accuracy']:.4f} -> {'PASS' if vh['passed'] else 'FAIL'}")
        heads[head] = {"kind": head, "estimator": meta.get("estimator"), "pickle": f"heads/{head}.pkl",
                       "onnx": f"heads/{head}.onnx", "input": hio["input"], "output": hio["output"],
                       "sklearn": meta.get("sklearn"), "feature_dim": feature_dim,
                       "classes": meta.get("classes"), "sha256": meta.get("sha256")}

    h, w = size
    manifest = {
        "format": "transfer-bundle", "format_version": 1,
        "valid": all(v.get("passed", True) for v in verification.values()),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tools": _versions(),
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
    write_json_atomic(tmp / "verification.json", {"images": used, **verification})
    manifest = finalize_manifest(tmp, manifest)
    return manifest, verification


def _preprocessing() -> dict:
    from ..data.image import PREPROCESSING

    return dict(PREPROCESSING)


def _add_engine(out: Path, precision: str, profile, rf, t, calib_images: int, workspace_mb: int, say,
                max_accuracy_drop: float = 0.01) -> None:
    from .quantize import calibration_batches
    from .tensorrt import build_engine, device_info, engine_entry, require_tensorrt

    require_tensorrt()  # TensorRTUnavailableError (exit 3) here; the ONNX bundle stays valid
    manifest = read_manifest(out)
    dev = device_info()
    name = f"model.{precision}.engine"
    tmp_engine = out / f".{name}.partial"
    calib = None
    if precision == "int8":
        train_paths, _ = rf.split_paths("train")
        calib = calibration_batches(train_paths, t.image_size, count=calib_images, batch=profile.opt)
    say(f"TensorRT {precision}: building on {dev['gpu']} (compute {dev['compute_capability']}, TensorRT {dev['tensorrt']})")
    build_engine(out / "model.onnx", tmp_engine, precision=precision, profile=profile, input_hw=t.image_size,
                 workspace_mb=workspace_mb, calib_batches=calib, timing_cache=out.parent / ".transfer-trt-timing.cache")
    os.replace(tmp_engine, out / name)
    key = f"trt-{precision}"
    manifest["models"][key] = engine_entry(name, precision, profile, dev)
    manifest = finalize_manifest(out, manifest)
    # verify the engine like the ONNX models: agreement with ONNX fp32 and the accuracy drop
    from ..bundle import Bundle
    from ..runtime.compare import compare_outputs
    from ..runtime.runners import OrtRunner, TrtRunner

    x, y, _ = _verification_images(rf, t.image_size, 256, say)
    b = Bundle(out, manifest)
    ref = OrtRunner(b, "onnx-fp32", "cpu").run(x)[1]
    got = TrtRunner(b, key).run(x)[1]
    v = compare_outputs(ref, got, y)
    limit = max_accuracy_drop
    v["passed"] = (v["top1_agreement"] >= 0.999 and v["max_abs_diff"] <= 1e-3) if precision == "fp32" \
        else v["accuracy_drop"] <= limit
    manifest["verification"][key] = v
    say(f"verify {key}: accuracy {v['candidate_accuracy']:.4f} vs fp32 {v['reference_accuracy']:.4f}, "
        f"top-1 agreement {v['top1_agreement']:.4f} -> {'PASS' if v['passed'] else 'FAIL'}")
    if not v["passed"]:
        manifest["valid"] = False
    finalize_manifest(out, manifest)
    if not v["passed"]:
        raise VerificationError(f"TensorRT {precision} engine failed verification; bundle {out} is marked invalid",
                                hint="try --trt fp16 or more --calib-images")
