"""End-to-end `transfer infer` over a folder of JPEGs vs backbone-only throughput, and peak
memory of infer over 20,000 vs 1,000 images.

    python benchmarks/bench_infer.py [--backbone mobilenet_v2] [--images 512] [--memory 1000,20000]

Targets: end-to-end >= 80 % of backbone-only throughput (decoding hidden behind
inference); peak RSS over 20,000 images <= 1.2x the peak over 1,000.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import ROOT, keras_bundle, table, timeit


def make_jpegs(folder: Path, n: int, side: int, seed: int = 0) -> None:
    """``n`` real JPEG files (smooth random colour fields, so decoding does real work)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (n % 64 + 64, 8, 8, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(base[i % len(base)]).resize((side, side), Image.BILINEAR)
        img.save(folder / f"{i:06d}.jpg", quality=90)


def peak_rss_mb(bundle: Path, folder: Path) -> tuple[float, float]:
    code = (
        "import resource, sys, time\n"
        "from transfer.runtime.infer import infer\n"
        "t = time.perf_counter()\n"
        f"s = infer({str(bundle)!r}, [{str(folder)!r}], out={str(folder) + '.csv'!r}, batch=32)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (TensorFlow-loaded) parent
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(int(hwm) / 1024, s.images_per_second)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    mb, ips = out.stdout.split()
    return float(mb), float(ips)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--memory", default="1000,20000")
    a = ap.parse_args()
    from transfer.bundle import load_bundle
    from transfer.runtime.infer import infer
    from transfer.runtime.runners import OrtRunner

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b = keras_bundle(a.backbone, tmp / "bundle")
        bundle = load_bundle(b)
        h, w = bundle.input_size
        make_jpegs(tmp / "jpegs", a.images, side=int(h * 1.15))
        runner = OrtRunner(bundle, "onnx-fp32", "cpu")
        x = np.random.default_rng(0).uniform(0, 255, (32, h, w, 3)).astype(np.float32)
        backbone_ips = 32 / timeit(lambda: runner.run(x), seconds=5)
        infer(b, [tmp / "jpegs"], out=tmp / "warm.csv", batch=32)  # warm caches
        t = time.perf_counter()
        s = infer(b, [tmp / "jpegs"], out=tmp / "p.csv", batch=32, workers=2)
        e2e_ips = s.total / (time.perf_counter() - t)
        rows = [[a.backbone, f"{h}x{w}", a.images, round(backbone_ips, 1), round(e2e_ips, 1),
                 f"{100 * e2e_ips / backbone_ips:.0f} %"]]
        print(table(["backbone", "input", "JPEGs", "backbone-only img/s (batch 32)", "transfer infer img/s",
                     "end-to-end / backbone"], rows))

        # memory: the small demo-size model, many files
        small = keras_bundle("arc2", tmp / "small", size=32)
        mem_rows = []
        for n in [int(v) for v in a.memory.split(",")]:
            make_jpegs(tmp / f"m{n}", n, side=48, seed=1)
            mb, ips = peak_rss_mb(small, tmp / f"m{n}")
            mem_rows.append([n, round(mb, 1), round(ips, 1)])
        print()
        print(table(["images", "peak RSS MB (transfer infer, arc2 32x32)", "img/s"], mem_rows))
        print(f"\npeak RSS ratio {mem_rows[-1][0]} vs {mem_rows[0][0]} images: "
              f"{mem_rows[-1][1] / mem_rows[0][1]:.3f}x")


if __name__ == "__main__":
    main()
