"""Shared helpers of the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def keras_bundle(backbone: str, out: Path, *, size: int | None = None, num_classes: int = 10) -> Path:
    """A bundle of a random-weights classifier (speed only; no run folder, no verification set)."""
    from transfer.bundle import finalize_manifest
    from transfer.data.image import PREPROCESSING
    from transfer.export.onnx import export_onnx
    from transfer.models.build import build_classifier
    from transfer.models.registry import get_backbone

    spec = get_backbone(backbone)
    size = size or spec.default_size
    out.mkdir(parents=True, exist_ok=True)
    model, _ = build_classifier(backbone, input_shape=(size, size, 3), weights="none", num_classes=num_classes, seed=0)
    model.save(out / "model.keras")  # not listed in the manifest: the keras baseline of the benchmark
    export_onnx(model, out / "model.onnx")
    feature_dim = int(model.get_layer("features").output.shape[-1])
    finalize_manifest(out, {
        "valid": True, "class_names": [str(i) for i in range(num_classes)],
        "input": {"name": "image", "height": size, "width": size, "channels": 3, "color": "RGB",
                  "dtype": "float32", "range": [0, 255], "layout": "NHWC"},
        "preprocessing": dict(PREPROCESSING), "backbone": backbone, "feature_dim": feature_dim,
        "num_classes": num_classes, "opset": 17, "heads": {}, "default_head": "network",
        "models": {"onnx-fp32": {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime"}},
        "source": {"run": None, "trial": None}}, exclude=("model.keras",))
    return out


def timeit(fn, *, seconds: float = 3.0, min_iters: int = 5, warmup: int = 2) -> float:
    """Mean seconds per call after warm-up (at least ``min_iters`` calls, about ``seconds``)."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)
