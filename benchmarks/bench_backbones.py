"""ONNX Runtime vs Keras `model.predict` on the same random-weights backbone, plus the roofline.

    python benchmarks/bench_backbones.py [--backbones mobilenet_v2,xception] [--seconds 3]

Bars (the runtime's speed targets): ORT >= 3x Keras throughput at batch 1 and >= 2x at
batch 32; fp32 Xception at batch 8 >= 85 % of the machine's measured matmul peak.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from _common import keras_bundle, table, timeit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="mobilenet_v2,xception")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    from transfer.bundle import load_bundle
    from transfer.models.build import load_model
    from transfer.runtime.bench import matmul_peak_gflops, model_gflops
    from transfer.runtime.runners import make_runner

    peak = matmul_peak_gflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bb in a.backbones.split(","):
            b = keras_bundle(bb, Path(tmp) / bb)
            bundle = load_bundle(b)
            h, w = bundle.input_size
            gf = model_gflops(b / "model.onnx")
            ort = make_runner(bundle, "onnxruntime", "cpu")
            keras = load_model(b / "model.keras")
            for bs in [int(x) for x in a.batches.split(",")]:
                x = np.random.default_rng(0).uniform(0, 255, (bs, h, w, 3)).astype(np.float32)
                t_ort = timeit(lambda: ort.infer(x), seconds=a.seconds)
                t_keras = timeit(lambda: keras.predict(x, batch_size=bs, verbose=0), seconds=a.seconds, min_iters=3)
                ips_o, ips_k = bs / t_ort, bs / t_keras
                rows.append([bb, f"{h}x{w}", bs, round(ips_k, 1), round(ips_o, 1), f"{ips_o / ips_k:.1f}x",
                             f"{gf:.2f}", f"{gf * ips_o:.1f}", f"{100 * gf * ips_o / peak:.0f} %"])
                print(rows[-1], flush=True)
    print()
    print(table(["backbone", "input", "batch", "Keras predict img/s", "ORT img/s", "ORT / Keras",
                 "GFLOP/img", "ORT GFLOP/s", "share of matmul peak"], rows))
    print(f"\nmatmul peak (numpy float32 GEMM, all cores): {peak:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
