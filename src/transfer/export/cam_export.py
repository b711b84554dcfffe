"""Class activation maps inside a bundle: what export adds so the runtime explains without TensorFlow.

For a contract model whose head is ``last spatial layer -> GlobalAveragePooling2D "features"
-> Dropout -> Dense "probs"`` (every Keras application of the registry), the logit of class
``c`` is ``mean over cells of (A @ W[:, c]) + b[c]``, linear in the last spatial feature map
``A`` (h, w, K). Its class activation map (CAM, Zhou et al. 2016) is ``A @ W[:, c]``: the
gradient of the logit with respect to ``A`` is ``W[:, c] / (h w)`` at every cell, so Grad-CAM
at that layer is the same map divided by ``h w`` (the same after :func:`transfer.maps.to_input_maps`,
which divides by the maximum). A calibration temperature divides every logit by ``T > 0``:
the same map again.

Export therefore adds (:func:`plan_cam`, :func:`write_cam_weights`, :func:`cam_record`):

* a ``feature_map`` output (N, h, w, K) to the ONNX model (and so to the int8 and fp16
  models made from it), the output of the layer the ``features`` pooling reads;
* ``cam.npz`` with ``kernel`` (K, C), the ``probs`` layer's kernel (the bias is the same at
  every cell and is left out, as in CAM and Grad-CAM);
* the manifest's ``cam`` record: layer, output, shape, weights file, where the cells sit on
  the input (:func:`transfer.analysis.cam_layers.layer_geometry`, so maps upsample exactly as
  ``transfer gradcam``'s) -- or ``{"available": false, "reason": ...}`` for a head the identity
  does not hold for (the small CNNs' ``Flatten -> Dense(64, relu)``: the class score is not
  linear in the feature map, so no exact map exists in the graph).

Verification (:func:`map_agreement`) compares the int8 / fp16 models' maps with fp32's on the
verification images: the median Spearman rank correlation of the CAM cells and the share of
images whose peak cell is the same. It is recorded beside the accuracy and calibration checks
(``verification.json``, the check's ``cam``); a disagreement beyond :data:`MIN_SPEARMAN` /
:data:`MIN_PEAK_AGREEMENT` is a finding the record and ``transfer verify`` state, not a failed
check (the model's predictions are what passes or fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._lazy import import_keras
from ..analysis.cam_layers import layer_geometry, resolve_layer
from ..errors import ModelError
from ..fsutil import atomic_path
from .cam_graph import CAM, CAM_GRAPH
from .cam_graph import METHOD as GRAPH_METHOD

#: the ONNX output holding the last spatial feature map
FEATURE_MAP = "feature_map"
#: the file with the class weights of the maps
CAM_WEIGHTS = "cam.npz"
#: reduced-precision maps agree with fp32 when the median Spearman correlation and the share of
#: images with the same peak cell reach these
MIN_SPEARMAN = 0.9
MIN_PEAK_AGREEMENT = 0.9

METHOD = ("CAM (Zhou et al. 2016): feature_map @ kernel[:, class] of the probs layer; at this layer it equals "
          "Grad-CAM up to a positive scale (global average pooling -> Dense)")


@dataclass(frozen=True)
class CamPlan:
    """What export adds for maps: ``layer`` and ``kernel`` (K, C), or why there is no map (``reason``)."""

    layer: str | None = None
    kernel: np.ndarray | None = None
    shape: tuple[int, int, int] | None = None
    geometry: tuple | None = None
    reason: str | None = None
    #: the maps come from a Grad-CAM graph (:mod:`transfer.export.cam_graph`), not the identity;
    #: ``why_graph`` says why the identity is not used, ``identity`` how the written graph
    #: compared with Keras's Grad-CAM
    via_graph: bool = False
    why_graph: str | None = None
    identity: dict | None = None

    @property
    def available(self) -> bool:
        return self.layer is not None

    @property
    def extra_outputs(self) -> dict[str, str]:
        """``{output name: layer}`` for :func:`transfer.export.onnx.export_onnx`."""
        return {FEATURE_MAP: self.layer} if self.available and not self.via_graph else {}


def _inbound(layer):
    """The layer whose output ``layer`` reads (its first input), or None."""
    inp = layer.input[0] if isinstance(layer.input, (list, tuple)) else layer.input
    hist = getattr(inp, "_keras_history", None)
    return hist.operation if hist is not None else None


def plan_cam(model, default_layer: str | None = None) -> CamPlan:
    """Whether the model's class scores are exactly a map of its last spatial feature map, and the
    layer and weights if so; else a Grad-CAM graph's plan (:func:`graph_plan`, at the trial's
    ``default_layer`` as ``transfer gradcam`` picks it) or why there is no map.

    Example::

        plan_cam(mobilenet_v2_model).layer     # 'out_relu'
        plan_cam(arc2_model, "conv2").via_graph    # True: a Grad-CAM graph (Dense(64, relu) on the flattened map)
    """
    keras = import_keras()
    L = keras.layers
    try:
        feats, probs = model.get_layer("features"), model.get_layer("probs")
    except ValueError:
        return CamPlan(reason="the model has no 'features' / 'probs' layers (not a model of `transfer train`)")
    if not isinstance(probs, L.Dense):
        return CamPlan(reason=f"the probs layer is a {type(probs).__name__}, not a Dense layer")
    if not isinstance(feats, L.GlobalAveragePooling2D):
        what = type(feats).__name__
        if isinstance(feats, L.Dense):
            act = getattr(feats.activation, "__name__", str(feats.activation))
            what = f"Dense({feats.units}, {act}) on the flattened feature map"
        return graph_plan(model, f"the features layer is {what}: the class score is not a weighted sum of the "
                                 "last feature map's cells (the head is not global average pooling -> Dense), so the "
                                 "bundle has no exact class activation map", default=default_layer)
    op = _inbound(probs)
    while op is not None and op is not feats:
        if not isinstance(op, L.Dropout):
            return CamPlan(reason=f"layer {op.name!r} ({type(op).__name__}) sits between the pooled features and "
                                  "probs: the class score is not linear in the feature map, so the bundle has no exact "
                                  "class activation map")
        op = _inbound(op)
    if op is None:
        return CamPlan(reason="probs does not read the pooled features")
    source = _inbound(feats)
    shape = tuple(int(d) for d in source.output.shape[1:])
    if len(shape) != 3:
        return CamPlan(reason=f"the pooled layer {source.name!r} has output shape {shape}, not (h, w, channels)")
    kernel = np.asarray(probs.kernel.numpy() if hasattr(probs.kernel, "numpy") else probs.kernel, np.float32)
    return CamPlan(layer=source.name, kernel=kernel, shape=shape, geometry=layer_geometry(model, source.name))


def graph_plan(model, why: str, *, default: str | None = None, layer: str | None = None) -> CamPlan:
    """A plan for a Grad-CAM graph at ``layer``, else the layer ``transfer gradcam`` explains by
    default (the trial's ``default``, or a finer one when its map is too coarse), so the two are
    comparable; ``why``: why the exact identity is not used.

    Raises:
        ModelError: ``layer`` is not a spatial layer of the model (the candidates named).
    """
    if layer is not None:
        target = resolve_layer(model, layer)
    else:
        try:
            target = resolve_layer(model, None, default=default, fine=True)
        except ModelError as exc:
            return CamPlan(reason=f"{why}; no layer for a Grad-CAM graph: {exc.message}")
    shape = tuple(int(d) for d in target.output.shape[1:])
    return CamPlan(layer=target.name, shape=shape, geometry=layer_geometry(model, target.name), via_graph=True,
                   why_graph=why)


def write_cam_weights(folder: Path, plan: CamPlan) -> str:
    """``cam.npz`` (``kernel`` float32 (K, C)) in ``folder``; returns its name."""
    with atomic_path(Path(folder) / CAM_WEIGHTS, suffix=".npz") as tmp:
        np.savez(tmp, kernel=plan.kernel.astype(np.float32))
    return CAM_WEIGHTS


def cam_record(plan: CamPlan, models: list[str]) -> dict:
    """The manifest's ``cam`` record (``models``: the model entries that have the ``feature_map``
    output; with a Grad-CAM graph, every model: the graph explains the class any of them predicts)."""
    if not plan.available:
        return {"available": False, "reason": plan.reason}
    geo = plan.geometry
    if plan.via_graph:
        return {"available": True, "method": GRAPH_METHOD, "layer": plan.layer, "output": CAM, "graph": CAM_GRAPH,
                "shape": list(plan.shape), "models": sorted(models), "why": plan.why_graph,
                "identity": plan.identity,
                "geometry": None if geo is None else {"y": [float(v) for v in geo[0]], "x": [float(v) for v in geo[1]]}}
    return {"available": True, "method": METHOD, "layer": plan.layer, "output": FEATURE_MAP,
            "shape": list(plan.shape), "weights": CAM_WEIGHTS, "models": sorted(models),
            "geometry": None if geo is None else {"y": [float(v) for v in geo[0]], "x": [float(v) for v in geo[1]]}}


def cam_with_model(cam: dict | None, key: str, entry: dict) -> dict | None:
    """The manifest's ``cam`` record with model ``key`` among its ``models`` when its entry has
    the ``feature_map`` output (a TensorRT engine added to a bundle with maps); else unchanged."""
    if not isinstance(cam, dict) or not cam.get("available") or FEATURE_MAP not in (entry.get("outputs") or {}):
        return cam
    return {**cam, "models": sorted(set(cam.get("models") or []) | {key})}


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=1)


def map_agreement(reference: np.ndarray, maps: np.ndarray) -> dict:
    """How far ``maps`` (raw CAMs (N, h, w) of a reduced-precision model) agree with ``reference``
    (fp32's, same images and classes): per image the Spearman rank correlation of the cells and
    whether the peak cell is the same; the median correlation and the share of same peaks, and
    whether both reach :data:`MIN_SPEARMAN` / :data:`MIN_PEAK_AGREEMENT` (``agrees``).

    Example::

        map_agreement(cams_fp32, cams_int8)["spearman_median"]     # e.g. 0.97
    """
    a = np.asarray(reference, np.float64).reshape(len(reference), -1)
    b = np.asarray(maps, np.float64).reshape(len(maps), -1)
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    va, vb = (ra ** 2).sum(axis=1), (rb ** 2).sum(axis=1)
    den = np.sqrt(va * vb)
    # a flat map has no ranking: it agrees only with another flat map
    rho = np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), ((va == 0) & (vb == 0)) * 1.0)
    same = a.argmax(axis=1) == b.argmax(axis=1)
    med, share = float(np.median(rho)) if len(rho) else float("nan"), float(same.mean()) if len(same) else float("nan")
    return {"images": int(len(a)), "cells": int(a.shape[1]) if a.ndim == 2 else 0, "spearman_median": med,
            "spearman_p10": float(np.percentile(rho, 10)) if len(rho) else float("nan"),
            "same_peak": share, "min_spearman": MIN_SPEARMAN, "min_same_peak": MIN_PEAK_AGREEMENT,
            "agrees": bool(med >= MIN_SPEARMAN and share >= MIN_PEAK_AGREEMENT),
            "explained": "the fp32 model's predicted class"}


__all__ = ["CAM_WEIGHTS", "FEATURE_MAP", "CamPlan", "cam_record", "cam_with_model", "graph_plan", "map_agreement", "plan_cam",
           "write_cam_weights"]
