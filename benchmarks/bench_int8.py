"""int8 vs fp32 ONNX Runtime throughput (random-weights MobileNetV2 at 224) and the demo
bundle's int8 accuracy drop.

    python benchmarks/bench_int8.py [--demo-bundle demo/runs/digits/bundle]

Targets: int8 >= 1.8x fp32 throughput; accuracy drop <= 1 point on the demo data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from _common import ROOT, keras_bundle, table, timeit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--demo-bundle", default=str(ROOT / "demo" / "runs" / "digits" / "bundle"))
    a = ap.parse_args()
    from transfer.export.quantize import quantize_int8
    from transfer.runtime.runners import OrtRunner

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        b = keras_bundle(a.backbone, Path(tmp) / "b")
        m = json.loads((b / "manifest.json").read_text())
        h, w = m["input"]["height"], m["input"]["width"]
        rng = np.random.default_rng(0)
        calib = (rng.uniform(0, 255, (8, h, w, 3)).astype(np.float32) for _ in range(4))
        quantize_int8(b / "model.onnx", Path(tmp) / "int8.onnx", calib)
        r32 = OrtRunner(b / "model.onnx", "cpu").activate()
        r8 = OrtRunner(Path(tmp) / "int8.onnx", "cpu", name="onnxruntime-int8").activate()
        for bs in [int(v) for v in a.batches.split(",")]:
            x = rng.uniform(0, 255, (bs, h, w, 3)).astype(np.float32)
            t32 = timeit(lambda: r32.infer(x))
            t8 = timeit(lambda: r8.infer(x))
            rows.append([a.backbone, bs, round(bs / t32, 1), round(bs / t8, 1), f"{t32 / t8:.2f}x"])
            print(rows[-1], flush=True)
    print(table(["model", "batch", "fp32 img/s", "int8 img/s", "int8 / fp32"], rows))
    demo = Path(a.demo_bundle) / "manifest.json"
    if demo.is_file():
        v = json.loads(demo.read_text())["verification"].get("onnx-int8")
        if v:
            print(f"\ndemo bundle int8: accuracy {v['candidate_accuracy']:.4f} vs fp32 {v['reference_accuracy']:.4f} "
                  f"on {v['images']} val/test images (drop {100 * v['accuracy_drop']:.2f} points)")
    else:
        print(f"\n(no demo bundle at {demo.parent}; run `make demo` for the accuracy figure)")


if __name__ == "__main__":
    main()
