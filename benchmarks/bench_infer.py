"""End-to-end `transfer infer` over a folder of JPEGs vs backbone-only throughput, full-size
camera photos with the old and the new pixel recipe, and peak memory of infer over 20,000
vs 1,000 images.

    python benchmarks/bench_infer.py [--backbone mobilenet_v2] [--images 512] [--photos 24] [--memory 1000,20000]
                                     [--cam-images 500] [--only cam]

Targets: end-to-end >= 80 % of backbone-only throughput (decoding hidden behind
inference); 12-megapixel JPEGs -> MobileNetV2 at 224: recipe 2 (DCT-scaled decoding) >= 3x
the img/s of recipe 1 (full decode, then resize) in the same run, with the bundle's
probabilities equal to Keras on recipe-2 pixels within 1e-4; peak RSS over 20,000 images
<= 1.2x the peak over 1,000; `transfer infer --cam` (a map .npy + overlay PNG per image) <= 1.15x
the wall time of `transfer infer` (MobileNetV2 224, batch 32, 500 images, alternated in one run).
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


def make_photos(folder: Path, n: int, h: int = 3000, w: int = 4000) -> None:
    """``n`` 12-megapixel camera-like JPEGs (smooth gradients, texture, sensor noise; ~4 MB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        rng = np.random.default_rng(i)
        a, b = rng.uniform(0.5, 2.0, 2)
        img = np.stack([xx / w * 255 * a, yy / h * 255 * b, (xx * a + yy * b) % 256], -1)
        img += rng.normal(0, 8, (h, w, 3)).astype(np.float32)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"photo_{i:03d}.jpg", quality=92)


def photo_rows(b: Path, folder: Path, n: int) -> list[list]:
    """`transfer infer` on full-size photos: the bundle as exported (recipe 2) and the same
    bundle recording recipe 1 (how an old bundle decodes), alternated, best of 2 each."""
    import json
    import shutil

    from transfer.data.image import RECIPES

    old = folder.parent / "bundle-recipe1"
    shutil.copytree(b, old)
    m = json.loads((old / "manifest.json").read_text())
    m["preprocessing"] = RECIPES[1]
    (old / "manifest.json").write_text(json.dumps(m))
    from transfer.runtime.infer import infer

    best = {1: 0.0, 2: 0.0}
    for _ in range(2):
        for version, bundle in ((1, old), (2, b)):
            s = infer(bundle, [folder], out=folder.parent / f"photos{version}.csv", batch=8, workers=2)
            assert s.errors == 0, s.error_examples
            best[version] = max(best[version], s.images_per_second)
    from transfer.data.image import load_image

    photo = sorted(folder.glob("*.jpg"))[0]
    ms = {}
    for version in (1, 2, 1, 2):  # decoding alone, one thread, best of 3 per recipe
        ms[version] = min(ms.get(version, 1e9), 1000 * min(_time(lambda: load_image(photo, (224, 224),
                                                                                    recipe=RECIPES[version]))
                                                           for _ in range(3)))
    return [[f"{n} x 12 MP JPEG", "1 (full decode, bilinear)", round(ms[1], 1), round(best[1], 2), "1.00x"],
            [f"{n} x 12 MP JPEG", "2 (DCT-scaled decode, reduce, bilinear)", round(ms[2], 1), round(best[2], 2),
             f"{best[2] / best[1]:.2f}x (decode alone {ms[1] / ms[2]:.2f}x)"]]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def photo_parity(b: Path, folder: Path) -> float:
    """Largest |probability difference| between `transfer infer` and the Keras model on the
    pixels training would use (recipe 2) for the full-size photos."""
    import csv

    import keras

    from transfer.bundle import load_bundle
    from transfer.data.image import load_image
    from transfer.runtime.infer import infer

    bundle = load_bundle(b)
    c = len(bundle.class_names)
    infer(b, [folder], out=folder.parent / "parity.csv", batch=8, topk=c)
    rows = list(csv.DictReader(open(folder.parent / "parity.csv", newline="")))
    model = keras.saving.load_model(b / "model.keras", compile=False)
    worst = 0.0
    for r in rows:
        x = load_image(r["path"], bundle.input_size)[None].astype(np.float32)
        ref = model.predict(x, verbose=0)[0]
        for k in range(1, c + 1):
            worst = max(worst, abs(float(r[f"prob{k}"]) - float(ref[bundle.class_names.index(r[f"class{k}"])])))
    return worst


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


CAM_HEADER = ["run", "JPEGs", "best wall s", "img/s", "wall vs transfer infer", "CPU s", "CPU vs transfer infer",
              "overlays written"]


def cam_rows(folder: Path, tmp: Path, n: int, rounds: int = 3) -> list[list]:
    """`transfer infer` without and with `--cam` (each `--cam-overlay`: jpg, the default; png; none)
    on the same JPEGs (MobileNetV2 224 with maps, batch 32), alternated ``rounds`` times; the best
    wall time and the CPU time (every thread of this process) of that run."""
    from transfer.runtime.infer import infer

    b = keras_bundle("mobilenet_v2", tmp / "bundle-cam", cam=True)
    make_jpegs(folder, n, side=258, seed=2)
    infer(b, [folder], out=tmp / "cam-warm.csv", batch=32)  # warm caches
    kinds = {"transfer infer": None, "transfer infer --cam": "jpg", "transfer infer --cam --cam-overlay png": "png",
             "transfer infer --cam --cam-overlay none": "none"}
    runs: dict[str, list] = {k: [] for k in kinds}
    for r in range(rounds):
        for name, overlay in kinds.items():
            extra = {} if overlay is None else {"cam": str(tmp / f"maps-{overlay}-{r}"), "cam_overlay": overlay}
            cpu, t = time.process_time(), time.perf_counter()
            infer(b, [folder], out=tmp / "rows.csv", batch=32, workers=2, **extra)
            runs[name].append((time.perf_counter() - t, time.process_time() - cpu))
    best = {k: min(v) for k, v in runs.items()}
    p, pc = best["transfer infer"]
    rows = []
    for name, overlay in kinds.items():
        w, c = best[name]
        written = "-" if overlay is None else sum(1 for f in (tmp / f"maps-{overlay}-0").iterdir()
                                                  if f.suffix in (".jpg", ".png"))
        rows.append([name, n, round(w, 2), round(n / w, 1), f"{w / p:.3f}x", round(c, 1), f"{c / pc:.3f}x",
                     written])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--memory", default="1000,20000")
    ap.add_argument("--cam-images", type=int, default=500)
    ap.add_argument("--only", choices=("cam",), default=None, help="run only this section")
    a = ap.parse_args()
    if a.only == "cam":
        with tempfile.TemporaryDirectory() as tmp:
            rows = cam_rows(Path(tmp) / "cam-jpegs", Path(tmp), a.cam_images)
        print(table(CAM_HEADER, rows))
        return
    from transfer.bundle import load_bundle
    from transfer.runtime.infer import infer
    from transfer.runtime.runners import make_runner

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b = keras_bundle(a.backbone, tmp / "bundle")
        bundle = load_bundle(b)
        h, w = bundle.input_size
        make_jpegs(tmp / "jpegs", a.images, side=int(h * 1.15))
        runner = make_runner(bundle, "onnxruntime", "cpu")
        x = np.random.default_rng(0).uniform(0, 255, (32, h, w, 3)).astype(np.float32)
        backbone_ips = 32 / timeit(lambda: runner.infer(x), seconds=5)
        infer(b, [tmp / "jpegs"], out=tmp / "warm.csv", batch=32)  # warm caches
        t = time.perf_counter()
        s = infer(b, [tmp / "jpegs"], out=tmp / "p.csv", batch=32, workers=2)
        e2e_ips = s.total / (time.perf_counter() - t)
        rows = [[a.backbone, f"{h}x{w}", a.images, round(backbone_ips, 1), round(e2e_ips, 1),
                 f"{100 * e2e_ips / backbone_ips:.0f} %"]]
        print(table(["backbone", "input", "JPEGs", "backbone-only img/s (batch 32)", "transfer infer img/s",
                     "end-to-end / backbone"], rows))

        if a.photos:
            make_photos(tmp / "photos", a.photos)
            print()
            print(table(["inputs", "pixel recipe", "decode ms/img", "transfer infer img/s", "vs recipe 1"],
                        photo_rows(b, tmp / "photos", a.photos)))
            print(f"\nmax |probability difference| infer vs Keras on recipe-2 pixels of the photos: "
                  f"{photo_parity(b, tmp / 'photos'):.2e} (6-decimal CSV; bar 1e-4)")

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
        if a.cam_images:
            print()
            print(table(CAM_HEADER,
                        cam_rows(tmp / "cam-jpegs", tmp, a.cam_images)))


if __name__ == "__main__":
    main()
