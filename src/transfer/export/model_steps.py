"""The models of a bundle, one :class:`~transfer.export.step.Step` each: Keras -> ONNX fp32
(reference: Keras), int8 with its accuracy-aware ladder of float layers and fp16 (reference: ONNX
fp32, by accuracy), a classical head's ONNX graph (reference: its pickle) and a TensorRT engine
(reference: ONNX fp32). :func:`transfer.export.api.export_bundle` runs them in that order.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..analysis.head_study import ensure_head
from ..bundle import Bundle
from ..classical_heads import head_to_onnx, load_head
from ..errors import ExportError
from ..models.onnx_convert import export_onnx, stamp_onnx
from ..runtime.heads import OnnxHead
from ..runtime.runner_base import Outputs
from ..runtime.trt_runner import TrtRunner
from .cam_export import FEATURE_MAP, write_cam_weights
from .cam_graph import CAM_GRAPH, CamGraphError, check_graph, write_gradcam_graph
from .fp16 import convert_fp16
from .keras_runner import KerasRunner
from .quantize import calibration_batches, quantize_int8
from .step import ExportContext, Step, fp32_outputs, judge, ort_runner
from .tensorrt import build_engine, device_info, engine_entry, prepare_int8_onnx
from .verify import run_all


def fp32_step() -> Step:
    """Keras -> ONNX fp32 (tf2onnx), compared with Keras itself."""
    def convert(ctx):
        ctx.progress.say(f"export {ctx.t.name}: converting to ONNX (opset {ctx.opset})")
        plan = ctx.extra["cam_plan"]
        io = export_onnx(ctx.extra["model"], ctx.folder / "model.onnx", opset=ctx.opset, extra=plan.extra_outputs)
        if plan.available and plan.via_graph:
            ctx.extra["cam_plan"] = _cam_graph(ctx, plan)
        elif plan.available:
            write_cam_weights(ctx.folder, plan)
        return {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime", **io}

    def keras(ctx):
        return KerasRunner(ctx.extra["model"], batch_size=32), "Keras"

    return Step("onnx-fp32", convert, ort_runner, keras)


def _cam_graph(ctx: ExportContext, plan):
    """Write ``cam.onnx`` and check it against Keras's Grad-CAM on the verification images; the
    plan with the check's figures, or one that says why the bundle has no maps."""
    ctx.progress.say(f"export {ctx.t.name}: Grad-CAM graph at layer {plan.layer}")
    try:
        write_gradcam_graph(ctx.extra["model"], plan.layer, ctx.folder / CAM_GRAPH, opset=ctx.opset)
        identity = check_graph(ctx.extra["model"], plan, ctx.folder / CAM_GRAPH, ctx.x)
    except CamGraphError as exc:
        (ctx.folder / CAM_GRAPH).unlink(missing_ok=True)
        ctx.progress.say(f"maps: none in this bundle: {exc.message}")
        return replace(plan, layer=None, reason=f"{plan.why_graph}; {exc.message}")
    ctx.progress.say(f"maps: the Grad-CAM graph equals Keras's Grad-CAM on {identity['images']} verification images "
                     f"(median Pearson {identity['pearson_median']:.6f})")
    return replace(plan, identity=identity)


#: accuracy-aware int8: how many of the first compute layers (Conv / MatMul / Gemm) stay in float
#: on each attempt, until the int8 model passes its checks
FLOAT_LAYER_LADDER = (0, 1, 2, 4, 8)


def int8_step() -> Step:
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
            ctx.outputs[step.key] = run_all([ort_runner(ctx, entry)], ctx.x)[0]
            ref, ref_name = fp32_outputs(ctx)
            d, chosen_on = _ladder_judgement(ctx, step, ref.probs, ref_name)
            if d is None or d["passed"] or k == FLOAT_LAYER_LADDER[-1] or len(info.get("float_nodes", [])) < k:
                break
            tried.append({"float_layers": k, "why": _failure(d)})
            ctx.progress.say(f"int8 with {k} first layer(s) in float fails on {chosen_on} ({tried[-1]['why']}); "
                             "keeping one more in float")
        entry["quantization"]["attempts"] = tried
        entry["quantization"]["chosen_on"] = chosen_on
        return entry

    step = Step("onnx-int8", convert, ort_runner, fp32_outputs, check="accuracy",
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


def fp16_step() -> Step:
    """ONNX fp32 -> fp16 (onnxconverter-common, float32 input/outputs kept), compared with fp32 by
    accuracy; TensorRT fp16 engines are built from it."""
    def convert(ctx):
        ctx.progress.say("fp16: converting the ONNX model (float32 input and outputs kept)")

        info = convert_fp16(ctx.folder / "model.onnx", ctx.folder / "model.fp16.onnx")
        stamp_onnx(ctx.folder / "model.fp16.onnx", role="model", precision="fp16")
        return {"file": "model.fp16.onnx", "precision": "fp16", "runtime": "onnxruntime", "conversion": info,
                **{k: ctx.models["onnx-fp32"][k] for k in ("inputs", "outputs", "opset")}}

    return Step("onnx-fp16", convert, ort_runner, fp32_outputs, check="accuracy",
                accuracy_names=("fp32_accuracy", "fp16_accuracy"))


def head_step(kind: str) -> Step:
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


def engine_step(precision: str, profile, workspace_mb: int, work: Path) -> Step:
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
        if FEATURE_MAP in (ctx.models.get("onnx-fp32", {}).get("outputs") or {}):
            entry["outputs"][FEATURE_MAP] = FEATURE_MAP  # built from a model with maps: the engine has them too
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
        return ort_runner(ctx, {"file": "model.onnx"}), "onnx-fp32"

    return Step(f"trt-{precision}", convert, engine, onnx_fp32, check="parity" if precision == "fp32" else "accuracy",
                atol=1e-3, name=f"trt-{precision}")
