"""Ray Data inference (`transfer infer --ray`) against local `transfer infer`, same bundle,
same JPEG folder, same process: where Ray's overhead goes on one 2-core machine.

For each model: local infer (the baseline), then Ray with 1 and 2 workers. ``ray.init``
(starting a local cluster) is timed on its own; the Ray rows are timed from the call to
``infer_ray`` to the last row written, like the local row. Ratios are Ray / local.

    python benchmarks/bench_ray.py                       # arc2 32x32 x 2000, mobilenet_v2 224x224 x 256
    python benchmarks/bench_ray.py --models arc2:32:4000 --batch 256

Needs ``pip install "transfer[train,distributed]"`` (the bundles are built with Keras).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from _common import keras_bundle, table
from bench_infer import make_jpegs


def _rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as fh:
        return [(r["path"], r["class1"]) for r in csv.DictReader(fh)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="arc2:32:2000,mobilenet_v2:224:256",
                    help="backbone:input-size:images, comma separated")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()

    import ray

    from transfer.runtime.infer import infer
    from transfer.runtime.ray_infer import infer_ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    init_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for spec in args.models.split(","):
            name, size, n = spec.split(":")
            size, n = int(size), int(n)
            bundle = keras_bundle(name, tmp / f"{name}-bundle", size=size)
            folder = tmp / f"{name}-jpegs"
            make_jpegs(folder, n, size)
            t = time.perf_counter()
            infer(bundle, [folder], out=tmp / "local.csv", batch=args.batch)
            local_s = time.perf_counter() - t
            ref = _rows(tmp / "local.csv")
            rows.append([name, f"{size}x{size}", n, "local", n / local_s, 1.0, "-"])
            for w in (int(v) for v in args.workers.split(",")):
                t = time.perf_counter()
                infer_ray(bundle, [folder], out=tmp / "ray.csv", batch=args.batch, workers=w)
                s = time.perf_counter() - t
                same = _rows(tmp / "ray.csv") == ref
                rows.append([name, f"{size}x{size}", n, f"ray, {w} worker(s)", n / s, local_s / s,
                             "yes" if same else "NO"])
    ray.shutdown()
    print(f"ray.init (local cluster start, not in the rows below): {init_s:.1f} s\n")
    print(table(["model", "input", "images", "mode", "img/s", "x local", "rows equal local"], rows))


if __name__ == "__main__":
    main()
