"""Class activation maps from the bundle (docs/benchmarks.md, section 12): identity with Keras
Grad-CAM, int8 / fp16 vs fp32 maps, and the pointing game through `transfer infer --cam`.

    python benchmarks/bench_cam.py identity [--backbones mobilenet_v2,efficientnet_b0] [--images 120] [--work DIR]
    python benchmarks/bench_cam.py pointing --data SHAPES --run RUN [--images 200] [--work DIR]
    python benchmarks/bench_cam.py graph [--cases arc2:conv1:32,...] [--images 16]

``identity``: Fashion-MNIST test images (``/usr/share/datasets/fashion-mnist``) become a folder;
`transfer train` fits each backbone's head on its random-weight features at 224 px (7 x 7 last
feature map); `transfer export` writes the bundle; `transfer gradcam --method gradcam --layer L
--save-maps` explains ``--images`` held-out images with the Keras model; `transfer infer --cam` on
the same images runs in a process where importing TensorFlow / Keras fails. Per image: Pearson r
of the two maps. Bar: median r >= 0.999.

``pointing``: a MobileNetV2 trained from scratch with `transfer train` on `transfer data shapes`
images (224 px; no ImageNet weights: e.g. started from a `transfer train` run on 64 px shapes);
its bundle (with int8, whose maps export compares with fp32's); `transfer infer --cam` on the
run's test images in a process without TensorFlow; a hit when the map's peak lies in the shape's
box (`.boxes.csv`) grown by the game's 15-pixel tolerance (Zhang et al. 2016; also printed
without it). Bar: >= 80 % hits; chance = the (grown) boxes' mean share of the image.
Also prints the int8 / fp16 vs fp32 agreement export recorded (Spearman of cells, same peak).

``graph``: the Grad-CAM graph of `transfer export --cam-layer` (:mod:`transfer.export.cam_graph`)
for a layer of each registry backbone (random weights: the backward ops, not the weights, decide
whether it converts): written, then compared with Keras's Grad-CAM at that layer on random pixels
(Pearson r per image, through the same map definition), or the reason it is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import ROOT, table

FMNIST = Path("/usr/share/datasets/fashion-mnist")

#: runs `transfer` with TensorFlow / Keras blocked (the maps must come from the bundle alone)
NO_TF = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from transfer.cli import main
sys.argv = ['transfer'] + sys.argv[1:]
try:
    main()
finally:
    assert not any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules), 'TensorFlow was imported'
"""


def transfer(*args, no_tf: bool = False, check: bool = True) -> str:
    """Run the CLI (its own process, as a user runs it); returns its output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-c", NO_TF, *map(str, args)] if no_tf else [sys.executable, "-m", "transfer.cli",
                                                                         *map(str, args)]
    print("$ transfer " + " ".join(map(str, args)) + ("   (TensorFlow blocked)" if no_tf else ""), flush=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0 and check:
        raise SystemExit(f"failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def infer_maps(out: Path) -> dict[str, np.ndarray]:
    """``{image path: map}`` of a `transfer infer --cam` folder."""
    with open(out / "maps.csv", newline="") as f:
        return {os.path.realpath(r["path"]): np.load(out / r["map"]) for r in csv.DictReader(f)}


def gradcam_maps(folder: Path) -> dict[str, np.ndarray]:
    """``{image path: map}`` of a `transfer gradcam --save-maps` method folder."""
    with open(folder / "maps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for k, r in enumerate(rows):
        out[os.path.realpath(r["image"])] = np.load(folder / f"{k:03d}_{Path(r['image']).stem}.npy")
    return out


def agreement_rows(bundle: Path, name: str) -> list[list]:
    checks = json.loads((bundle / "verification.json").read_text())
    rows = []
    for key in ("onnx-int8", "onnx-fp16"):
        c = (checks.get(key) or {}).get("cam")
        if c:
            rows.append([name, key, c["images"], c["cells"], round(c["spearman_median"], 4),
                         round(c["spearman_p10"], 4), f"{100 * c['same_peak']:.1f} %", "yes" if c["agrees"] else "NO",
                         f"{100 * checks[key].get('candidate_accuracy', float('nan')):.1f} %"])
    return rows


AGREE_HEADER = ["model", "reduced", "images", "cells", "Spearman median", "Spearman 10th pct", "same peak cell",
                "agrees (>= 0.9, >= 90 %)", "its val accuracy"]


def identity(a) -> None:
    work = Path(a.work)
    data, run = work / "fmnist", work / "run"
    if not (data / ".done").exists():
        transfer("data", "idx", FMNIST / "t10k-images-idx3-ubyte.gz", FMNIST / "t10k-labels-idx1-ubyte.gz", data,
                 "--classes", "fashion-mnist", "--limit", a.source_images, "--force")
        (data / ".done").write_text("")
    if not (run / "best.json").exists():
        transfer("train", data, "--out", run, "--backbone", a.backbones, "--weights", "none", "--trainable", "0",
                 "--image-size", a.size, "--epochs", 2, "--val", 0.2, "--test", 0.3, "--batch-size", 32)
    from transfer.runfolder import RunFolder

    rf = RunFolder(run)
    test, _ = rf.split_paths("test")
    chosen = work / "explain"
    shutil.rmtree(chosen, ignore_errors=True)
    chosen.mkdir()
    for i, p in enumerate(test[:a.images]):
        shutil.copy(p, chosen / f"{i:04d}_{Path(p).parent.name}_{Path(p).name}")
    rows, agree = [], []
    for bb in a.backbones.split(","):
        trial = f"{bb}-t000"
        bundle = work / f"bundle-{bb}"
        transfer("export", run, "--trial", trial, "--out", bundle, "--force", "--verify-images", 64)
        layer = json.loads((bundle / "manifest.json").read_text())["cam"]["layer"]
        transfer("gradcam", run, chosen, "--trial", trial, "--method", "gradcam", "--layer", layer, "--save-maps",
                 "--steps", 2, "--road", "off")
        out = work / f"maps-{bb}"
        shutil.rmtree(out, ignore_errors=True)
        transfer("infer", bundle, chosen, "--cam", out, "--out", work / f"pred-{bb}.csv", "--batch", 32, no_tf=True)
        keras_maps = gradcam_maps(rf.gradcam_dir(trial) / "gradcam")
        bundle_maps = infer_maps(out)
        common = sorted(set(keras_maps) & set(bundle_maps))
        r = np.array([pearson(keras_maps[p], bundle_maps[p]) for p in common])
        empty = sum(1 for p in common if keras_maps[p].max() == 0)
        cells = json.loads((bundle / "manifest.json").read_text())["cam"]["shape"][:2]
        rows.append([bb, layer, f"{cells[0]}x{cells[1]}", len(common), round(float(np.median(r)), 6),
                     round(float(r.min()), 6), f"{100 * np.mean(r >= 0.999):.1f} %", empty,
                     "yes" if np.median(r) >= 0.999 else "NO"])
    # int8 / fp16 vs fp32 maps of the MobileNetV2 trial (its export may fail the accuracy check on a
    # random backbone: the map agreement is recorded either way)
    if "mobilenet_v2" in a.backbones.split(","):
        q = work / "bundle-mobilenet_v2-int8"
        transfer("export", run, "--trial", "mobilenet_v2-t000", "--out", q, "--force", "--quantize", "int8,fp16",
                 "--verify-images", 256, check=False)
        agree = agreement_rows(q, "mobilenet_v2 (Fashion-MNIST, random backbone)")
    print()
    print(table(["backbone (random weights, head trained)", "layer", "cells", "images", "median r", "min r",
                 "images with r >= 0.999", "empty maps (both)", "bar: median >= 0.999"], rows))
    if agree:
        print()
        print(table(AGREE_HEADER, agree))


#: the pointing game's tolerance (Zhang et al. 2016, "Top-down neural attention by excitation
#: backprop": a hit "if the maximum point lies on one of the annotated instances ... with a
#: 15-pixel tolerance"); at 224 px a last-layer map's peak sits on a 32 px grid of cell centres
TOLERANCE = 15


def pointing(a) -> None:
    from transfer.data.datasets import read_shape_boxes
    from transfer.runfolder import RunFolder

    work = Path(a.work)
    data, run = Path(a.data), Path(a.run)
    bundle = work / "bundle-shapes"
    if not (bundle / "manifest.json").exists():
        transfer("export", run, "--out", bundle, "--force", "--quantize", "int8,fp16")
    rf = RunFolder(run)
    test, _ = rf.split_paths("test")
    test = test[:a.images]
    out = work / "maps-shapes"
    shutil.rmtree(out, ignore_errors=True)
    transfer("infer", bundle, *test, "--cam", out, "--out", work / "pred-shapes.csv", "--batch", 32, no_tf=True)
    maps = infer_maps(out)
    boxes = {os.path.realpath(data / k): v for k, v in read_shape_boxes(data).items()}
    paths = [p for p in maps if p in boxes]
    from transfer.maps import pointing_hits

    m = np.stack([maps[p] for p in paths])
    bx = np.array([boxes[p] for p in paths])
    hits = pointing_hits(m, bx, margin=TOLERANCE)  # the game's definition: a 15-pixel tolerance
    exact = pointing_hits(m, bx)
    h, w = m.shape[1:]

    def share(b) -> float:  # of the image inside each box (grown by the tolerance, clipped)
        return float(np.mean((np.minimum(b[:, 2], h) - np.maximum(b[:, 0], 0))
                             * (np.minimum(b[:, 3], w) - np.maximum(b[:, 1], 0)) / (h * w)))

    grown = bx + np.array([-TOLERANCE, -TOLERANCE, TOLERANCE, TOLERANCE])
    with open(work / "pred-shapes.csv", newline="") as f:
        pred = {os.path.realpath(r["path"]): r["class1"] for r in csv.DictReader(f)}
    right = np.array([pred.get(p) == Path(p).parent.name for p in paths])
    print()
    print(table(["model", "input", "images", f"pointing hits ({TOLERANCE} px tolerance)", "hits (correct predictions)",
                 "chance (box + tolerance share)", "hits, no tolerance", "chance (box share)",
                 "test accuracy (these images)", "bar: >= 80 %"],
                [["mobilenet_v2 from scratch (`transfer train`)", f"{h}x{w}", len(paths), f"{100 * hits.mean():.1f} %",
                  f"{100 * hits[right].mean():.1f} %" if right.any() else "-", f"{100 * share(grown):.1f} %",
                  f"{100 * exact.mean():.1f} %", f"{100 * share(bx):.1f} %", f"{100 * right.mean():.1f} %",
                  "yes" if hits.mean() >= 0.8 else "NO"]]))
    print()
    print(table(AGREE_HEADER, agreement_rows(bundle, "mobilenet_v2 (shapes)")))


GRAPH_CASES = ("arc2:conv1:32,arc3:conv2:32,mobilenet_v2:block_3_expand_relu:64,"
               "mobilenet_v2:block_13_expand_relu:96,vgg16:block4_conv3:64,resnet50:conv4_block6_out:64,"
               "efficientnet_b0:block6a_expand_activation:64,densenet121:conv4_block24_concat:64,"
               "xception:block13_sepconv2_act:72")


def graph(a) -> None:
    import time

    from transfer.export.cam_export import graph_plan
    from transfer.export.cam_graph import CamGraphError, check_graph, write_gradcam_graph
    from transfer.models.build import build_classifier

    rows = []
    for case in a.cases.split(","):
        name, layer, size = case.split(":")
        model, _ = build_classifier(name, input_shape=(int(size), int(size), 3), weights="none", num_classes=5,
                                    seed=1)
        plan = graph_plan(model, "bench", layer=layer)
        x = np.random.default_rng(0).uniform(0, 255, (a.images, int(size), int(size), 3)).astype(np.float32)
        t = time.perf_counter()
        try:
            write_gradcam_graph(model, layer, Path(a.work) / f"{name}-{layer}.onnx")
            found = check_graph(model, plan, Path(a.work) / f"{name}-{layer}.onnx", x)
            rows.append([name, layer, size, "x".join(map(str, plan.shape[:2])), f"{found['pearson_median']:.6f}",
                         f"{found['pearson_min']:.6f}", f"{found['max_abs_diff']:.1e}", f"{time.perf_counter() - t:.1f}",
                         "written"])
        except CamGraphError as exc:
            rows.append([name, layer, size, "x".join(map(str, plan.shape[:2])), "-", "-", "-",
                         f"{time.perf_counter() - t:.1f}", "refused: " + exc.message.split(": ", 1)[-1][:160]])
    print(table(["backbone", "layer", "input", "cells", "Pearson median", "Pearson min", "max |diff|",
                 "convert + check s", "graph"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    i = sub.add_parser("identity")
    i.add_argument("--backbones", default="mobilenet_v2,efficientnet_b0")
    i.add_argument("--images", type=int, default=120)
    i.add_argument("--source-images", type=int, default=600)
    i.add_argument("--size", type=int, default=224)
    i.add_argument("--work", default=None)
    p = sub.add_parser("pointing")
    p.add_argument("--data", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--images", type=int, default=225)
    p.add_argument("--work", default=None)
    g = sub.add_parser("graph")
    g.add_argument("--cases", default=GRAPH_CASES, help="backbone:layer:input side, comma-separated")
    g.add_argument("--images", type=int, default=16)
    g.add_argument("--work", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a.work = a.work or tmp
        Path(a.work).mkdir(parents=True, exist_ok=True)
        {"identity": identity, "pointing": pointing, "graph": graph}[a.what](a)


if __name__ == "__main__":
    main()
