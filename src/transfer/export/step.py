"""One model of a bundle at export: convert -> run it and its reference -> compare -> record.

:class:`Step` names the four moves of one model (the fp32 ONNX model, int8 / fp16, a classical
head, a TensorRT engine, the temperature written into the graph: :mod:`transfer.export.model_steps`,
:mod:`transfer.export.calibration_stage`); :func:`run_step` runs them on the verification images of
an :class:`ExportContext` (runners first, :func:`transfer.export.verify.run_all`, then
:func:`judge`: parity for the same precision, the accuracy drop for a reduced one, plus a
calibrated bundle's ECE and unknown-input decisions and the class-activation-map agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as with_fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import calibration as cal
from ..runtime.cam import BundleCam
from ..runtime.runner_base import Outputs, Runner
from ..runtime.runners import OrtRunner
from .cam_export import map_agreement
from .verify import accuracy_check, parity_check, run_all, summary_line


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


def ort_runner(ctx: ExportContext, entry: dict) -> OrtRunner:
    """ONNX Runtime on the CPU on a model file of the bundle being made (sessions as the runtime makes them;
    the feature map too when the bundle has maps, for :func:`_map_agreement`)."""
    runner = OrtRunner(ctx.folder / entry["file"], "cpu", name=f"onnxruntime-{entry.get('precision', 'fp32')}")
    return runner.request("feature_map") if getattr(ctx.extra.get("cam_plan"), "available", False) else runner


def fp32_outputs(ctx: ExportContext) -> tuple[Outputs, str]:
    """The reference of a reduced-precision model: the fp32 outputs already run (calibrated when applied)."""
    return ctx.outputs["onnx-fp32"], "onnx-fp32"
