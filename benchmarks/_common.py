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


def keras_bundle(backbone: str, out: Path, *, size: int | None = None, num_classes: int = 10,
                 cam: bool = False) -> Path:
    """A bundle of a random-weights classifier (speed only; no run folder). Its fp32 check
    compares ONNX Runtime with Keras on 8 random images, so the bundle loads like an exported one.
    With ``cam`` it has class activation maps as an export writes them (``feature_map`` output,
    ``cam.npz``, the manifest's ``cam`` record)."""
    from transfer.export.cam_export import cam_record, plan_cam, write_cam_weights
    from transfer.bundle_write import new_manifest, write_bundle
    from transfer.models.onnx_convert import export_onnx
    from transfer.export.keras_runner import KerasRunner
    from transfer.export.verify import parity_check, run_all
    from transfer.runtime.runners import OrtRunner
    from transfer.models.build import build_classifier
    from transfer.models.registry import get_backbone

    spec = get_backbone(backbone)
    size = size or spec.default_size
    out.mkdir(parents=True, exist_ok=True)
    model, _ = build_classifier(backbone, input_shape=(size, size, 3), weights="none", num_classes=num_classes, seed=0)
    model.save(out / "model.keras")  # not listed in the manifest: the keras baseline of the benchmark
    plan = plan_cam(model) if cam else None
    io = export_onnx(model, out / "model.onnx", extra=plan.extra_outputs if cam else None)
    extra = {}
    if cam:
        write_cam_weights(out, plan)
        extra["cam"] = cam_record(plan, ["onnx-fp32"])
    x = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    onnx, keras = run_all([OrtRunner(out / "model.onnx", "cpu"), KerasRunner(model, batch_size=32)], x)
    check = parity_check(keras.probs, onnx.probs, None, atol=1e-4, min_agreement=0.999,
                         reference_name="Keras (random pixels)")
    feature_dim = int(model.get_layer("features").output.shape[-1])
    manifest = new_manifest(class_names=[str(i) for i in range(num_classes)], input_size=(size, size),
                            feature_dim=feature_dim, backbone=backbone, opset=17, source={"run": None, "trial": None},
                            models={"onnx-fp32": {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime",
                                                  **io}}, **extra)
    write_bundle(out, manifest, {"onnx-fp32": check}, exclude=("model.keras",))
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
    """A Markdown table (:func:`transfer.tables.markdown`, floats with 2 decimals)."""
    from transfer.tables import markdown

    return markdown(header, rows, digits=2).rstrip("\n")


def logreg_guard_rows(run: Path) -> list[list]:
    """The "network >= logistic regression on its own features - 3 points" guard, per trial that
    ``transfer heads RUN --trial all --head logreg`` fitted: trial, network and logreg test accuracy
    (%), their gap (points), ``met`` / ``NOT met``."""
    import csv

    rows = []
    for d in sorted((run / "heads").iterdir()):
        with open(d / "heads.csv", newline="") as fh:
            acc = {r["head"]: float(r["test_accuracy"]) for r in csv.DictReader(fh)}
        gap = 100 * (acc["network"] - acc["logreg"])
        rows.append([d.name, f"{100 * acc['network']:.1f}", f"{100 * acc['logreg']:.1f}", f"{gap:+.1f}",
                     "met" if gap >= -3.0 else "NOT met"])
    return rows
