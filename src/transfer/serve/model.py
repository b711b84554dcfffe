"""The served model: one function loads a bundle for serving, one method builds an answer row.

:func:`load_served_model` is the only place the server opens a bundle (hash-checked once by
:func:`transfer.bundle.load_bundle`, so a bundle ``transfer verify`` refuses never starts)
and makes its :class:`~transfer.runtime.predictor.Predictor` (the runner, head and
unknown-input rule ``transfer infer`` uses too); :meth:`ServedModel.row` is the only place a
probability row becomes an answer. What is loaded and answered is decided by the model and
trust groups of :class:`~transfer.serve.serve_config.ServeConfig`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle, load_bundle
from ..bundle_format import MANIFEST
from ..runtime.cam import BundleCam, cam_problem, overlay_png, parse_class
from ..runtime.predict_config import ModelOptions, TrustOptions
from ..runtime.predictor import Predictor


@dataclass(frozen=True)
class ImagePrediction:
    """One image's answer from the model thread: its probabilities and, with ``--reject``, its
    unknown-input score and whether it looks known."""

    probs: np.ndarray
    score: float | None = None
    known: bool | None = None
    feature_map: np.ndarray | None = None  # (h, w, K) when the bundle has maps (``?cam=1``)
    net_probs: np.ndarray | None = None    # the network head's probabilities (the maps are its)


class BatchPrediction:
    """The predictions of one batch, indexable per image (the batcher hands ``[i]`` to each request)."""

    def __init__(self, probs: np.ndarray, unknown: tuple[np.ndarray, np.ndarray] | None = None,
                 feature_map: np.ndarray | None = None, net_probs: np.ndarray | None = None):
        self.probs, self.unknown, self.feature_map, self.net_probs = probs, unknown, feature_map, net_probs

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, i: int) -> ImagePrediction:
        maps = {} if self.feature_map is None else {"feature_map": self.feature_map[i], "net_probs": self.net_probs[i]}
        if self.unknown is None:
            return ImagePrediction(self.probs[i], **maps)
        return ImagePrediction(self.probs[i], float(self.unknown[0][i]), bool(self.unknown[1][i]), **maps)


def bundle_id(bundle: Bundle) -> str:
    """``sha256:<hex>`` of the bundle's ``manifest.json`` as it was checked when loaded (the
    manifest holds every file's SHA-256, so this names the whole bundle: ``sha256sum
    BUNDLE/manifest.json`` prints the same hex; a bundle made in code: its manifest file's now)."""
    if bundle.digest is None:
        return "sha256:" + hashlib.sha256((Path(bundle.path) / MANIFEST).read_bytes()).hexdigest()
    return "sha256:" + bundle.digest


class ServedModel:
    """A verified bundle and its predictor, ready for batches of pixels."""

    def __init__(self, bundle: Bundle, predictor: Predictor, options: ModelOptions):
        self.bundle = bundle
        self.predictor = predictor
        self.options = options
        # class activation maps (``?cam=1``): the bundle's, for the model that runs, or why there are none
        self.cam_problem = cam_problem(bundle, predictor.runner.model_key)
        self.cam = BundleCam.open(bundle, predictor.runner.model_key) if self.cam_problem is None else None
        if self.cam is not None and self.cam.needs_feature_map:
            predictor.runner.request("feature_map")
        self.id = bundle_id(bundle)
        self.names = predictor.names
        self.size = predictor.input_size
        self.recipe = predictor.recipe

    @property
    def runner(self):
        return self.predictor.runner

    @property
    def head(self):
        return self.predictor.head

    @property
    def detector(self):
        return self.predictor.detector

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        """The decoded images of one batch as the model's input: uint8 (N, H, W, 3) (the batcher
        calls this in the model thread, just before :meth:`predict`)."""
        return np.stack(images)

    def predict(self, x: np.ndarray) -> tuple[BatchPrediction, float]:
        """Class probabilities of a batch (:meth:`transfer.runtime.predictor.Predictor.predict`:
        one model call, one head call and, with ``--reject``, the unknown-input rule).

        Args:
            x: uint8 or float32 (N, H, W, 3) RGB pixels 0..255.

        Returns:
            (a :class:`BatchPrediction` of N images, seconds the calls took).
        """
        t = time.perf_counter()
        pred = self.predictor.predict(x)
        unknown = None if pred.known is None else (pred.scores, pred.known)
        fm = pred.outputs.feature_map
        return (BatchPrediction(pred.probs, unknown, fm, pred.outputs.probs if self.cam is not None else None),
                time.perf_counter() - t)

    def cam_class(self, value) -> int | None:
        """``?cam_class=``: a class name or index (ConfigError naming the classes), or None."""
        return parse_class(value, self.names)

    def map_entry(self, pred: ImagePrediction, pixels: np.ndarray, cls: int | None = None) -> dict:
        """The class activation map of one answered image (``?cam=1``): the network head's map of its
        predicted class (or ``cls``) at the feature map's cells (``cells``: rows of values in [0, 1])
        and as a jet overlay on the model-size pixels (``png``: base64 PNG), with the map's flag."""
        import base64

        c = int(np.argmax(pred.net_probs)) if cls is None else int(cls)
        fm, k = None if pred.feature_map is None else pred.feature_map[None], np.array([c])
        px = None if self.cam.needs_feature_map else np.asarray(pixels, np.float32)[None]
        full = self.cam.maps(fm, k, px)[0]
        png, flag = overlay_png(np.asarray(pixels, np.uint8), full)
        cells = self.cam.small(fm, k, px)[0]
        return {"class": self.names[c], "head": "network", "layer": self.cam.layer,
                "cells": np.round(cells, 4).tolist(), "flag": flag,
                "png": base64.b64encode(png).decode("ascii")}

    def warm_up(self, max_batch: int) -> float:
        """Run the smallest and the largest batch once (sessions allocate on first use); seconds taken."""
        t = time.perf_counter()
        h, w = self.size
        for n in sorted({1, max_batch}):
            self.predict(np.zeros((n, h, w, 3), np.uint8))
        return time.perf_counter() - t

    def row(self, pred: "ImagePrediction | np.ndarray", topk: int) -> dict:
        """The answer for one image: ``{"top": [{"class", "prob"}, ...]}``, most probable first;
        with ``--reject`` also ``"decision": "known" | "unknown"`` and the rule and score
        (``"unknown": {"score", "value", "threshold"}``), as every ``transfer infer --reject`` row."""
        probs = pred.probs if isinstance(pred, ImagePrediction) else pred
        classes, ps = self.predictor.top_k(probs, topk)
        out = {"top": [{"class": c, "prob": p} for c, p in zip(classes, ps)]}
        if self.detector is not None and isinstance(pred, ImagePrediction) and pred.known is not None:
            out["decision"] = "known" if pred.known else "unknown"
            out["unknown"] = {"score": self.detector.score, "value": pred.score, "threshold": self.detector.threshold}
        return out

    def info(self) -> dict:
        """What ``GET /v1/model`` shows: classes, input, models, heads, verification."""
        m = self.bundle.manifest
        serving = self.predictor.describe()
        return {
            "bundle_id": self.id,
            "bundle": Path(self.bundle.path).name,
            "created": m.get("created"),
            "source_trial": (m.get("source") or {}).get("trial"),
            "backbone": m.get("backbone"),
            "class_names": self.names,
            "num_classes": len(self.names),
            "input": dict(m.get("input", {})),
            "preprocessing": m.get("preprocessing"),
            "models": {k: {f: e.get(f) for f in ("file", "precision", "runtime") if f in e}
                       for k, e in self.bundle.models.items()},
            "heads": ["network", *sorted(self.bundle.heads)],
            "default_head": m.get("default_head", "network"),
            "serving": {**serving,
                        "head_format": self.options.head_format if serving["head"] != "network" else None},
            "verification": {"valid": bool(m.get("valid", False)), "checks": m.get("verification", {})},
            "signed_by": self.bundle.signer, "trusted": self.bundle.trusted,
            "calibration": m.get("calibration"),
            "unknown": (dict(self.detector.describe(), rejecting=True) if self.detector is not None
                        else {"rejecting": False, "available": sorted((m.get("unknown") or {}).get("scores", {}))}),
            "tools": m.get("tools", {}),
            "cam": ({"available": True, "layer": self.cam.layer, "cells": list(self.cam.shape[:2])}
                    if self.cam is not None else {"available": False, "reason": self.cam_problem[0]}),
        }


def open_model(bundle: Bundle, options: ModelOptions | None = None, *, trust_pickle: bool = False,
               spinning: bool = False) -> ServedModel:
    """A :class:`ServedModel` of an already loaded bundle: options checked against it, then the
    sessions made, by default with idle threads that do not spin (between batches the event loop
    and the decode threads need the cores: docs/benchmarks.md, "ONNX Runtime threads").

    Raises:
        as :meth:`transfer.runtime.predictor.Predictor.open`.
    """
    options = options or ModelOptions()
    predictor = Predictor.open(bundle, options, trust_pickle=trust_pickle, spinning=spinning)
    return ServedModel(bundle, predictor, options)


def load_served_model(bundle_path, model: ModelOptions | None = None, security: TrustOptions | None = None) -> ServedModel:
    """Open a bundle for serving: hashes checked (once), options checked, sessions created.

    Raises:
        BundleError / TamperedBundleError: what ``transfer verify`` refuses.
        ConfigError: a backend, provider or head this bundle or machine cannot serve.
        TensorRTUnavailableError: a TensorRT backend without a GPU.

    Example::

        model = load_served_model("runs/digits/bundle", ModelOptions(head="rf"))
        probs, seconds = model.predict(pixels)
    """
    security = security or TrustOptions()
    bundle = load_bundle(bundle_path, trust=security.store)
    return open_model(bundle, model, trust_pickle=security.trust_pickle)


__all__ = ["ModelOptions", "TrustOptions", "ImagePrediction", "BatchPrediction", "ServedModel", "load_served_model",
           "open_model", "bundle_id"]
