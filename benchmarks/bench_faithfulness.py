"""Do CAM maps carry information the model uses? Deletion, insertion and ROAD against another image's map.

    python benchmarks/bench_faithfulness.py [--images 200] [--steps 10] [--baseline blur] [--work DIR]
                                            [--shapes-run RUN] [--digits-run RUN] [--split test]

Three models trained from random weights (made in ``--work`` on first use, reused after):

* **shapes**: MobileNetV2 on ``transfer data shapes --images 4000 --size 64`` (four classes, one
  shape at a random place on noise; the folder's ``.boxes.csv`` says where), 64 px,
  ``--augment flip --epochs 15 --patience 5 --seed 1``;
* **digits**: arc2 and MobileNetV2 on ``transfer data digits`` (scikit-learn's 1,797 real 8x8
  digits), 32 px, ``--trainable 1.0 --epochs 5`` (the trials ``make demo`` trains from random
  weights).

For each model, ``--images`` random ``--split`` images are explained at the layer ``transfer
gradcam`` picks by default, by Grad-CAM, Grad-CAM++ and Score-CAM (``--scorecam-channels``), and
by two "maps" without information: a Gaussian blob at a random place and a fixed centre blob
(sigma = 1/6 of the side), and, as a reference, a map that knows where the object is (shapes: a
Gaussian on the shape's box; digits: the image's own ink). Each map is measured with :func:`transfer.faithfulness.faithfulness` against
its control (another image's map of the same kind) and the table gives, per number, the share
of images where the map beats its control, the sign-test verdict, the pointing game (shapes:
the map's peak inside the shape's box; the centre blob's hit rate is the centre prior), the
flags, and the seconds per image of the faithfulness measurement.

Bars: the maps of the method ``transfer gradcam`` leads with (ranked by the verdict) beat
their control on deletion AUC and on ROAD MoRF in >= 80 % of the images, for each model; the
random blob and the centre blob do not (<= 60 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, table

REAL = ("gradcam", "gradcam++", "scorecam")
FAKE = ("random blob", "centre blob")
#: what a map that knows where the object is scores (shapes: a blob on the shape's box; digits: the image's ink)
ORACLE = "reference: where the object is"


def transfer(*args) -> None:
    """Run ``transfer ARGS`` in a fresh process (as a user would)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    print("$ transfer " + " ".join(map(str, args)), flush=True)
    r = subprocess.run([sys.executable, "-m", "transfer.cli", *map(str, args)], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def shapes_run(work: Path) -> Path:
    data, run = work / "shapes", work / "shapes-run"
    if not (data / ".complete").is_file():
        transfer("data", "shapes", data, "--images", 4000, "--size", 64, "--seed", 0, "--force")
        (data / ".complete").touch()
    if not (run / "best.json").is_file():
        transfer("train", data, "--backbone", "mobilenet_v2", "--weights", "none", "--trainable", "1.0",
                 "--image-size", 64, "--epochs", 15, "--patience", 5, "--augment", "flip", "--seed", 1, "--out", run)
    return run


def digits_run(work: Path) -> Path:
    data, run = work / "digits", work / "digits-run"
    if not (data / ".complete").is_file():
        transfer("data", "digits", data, "--force")
        (data / ".complete").touch()
    if not (run / "best.json").is_file():
        transfer("train", data, "--backbone", "arc2,mobilenet_v2", "--weights", "none", "--trainable", "1.0",
                 "--image-size", 32, "--epochs", 5, "--out", run)
    return run


def blobs(n: int, size: int, *, seed: int, centre: bool) -> np.ndarray:
    rng = np.random.default_rng([seed, 0xB1])
    yy, xx = np.mgrid[:size, :size]
    sigma = size / 6
    centres = np.full((n, 2), (size - 1) / 2) if centre else rng.uniform(0, size, (n, 2))
    return np.stack([np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / (2 * sigma ** 2)) for a, b in centres]).astype(np.float32)


def box_maps(boxes: np.ndarray, size: int) -> np.ndarray:
    """A smooth map filling each box (a Gaussian with the box's centre and half its size as sigma)."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    out = []
    for y0, x0, y1, x1 in boxes:
        cy, cx, sy, sx = (y0 + y1) / 2, (x0 + x1) / 2, max(1.0, (y1 - y0) / 2), max(1.0, (x1 - x0) / 2)
        out.append(np.exp(-((yy - cy) ** 2 / (2 * sy ** 2) + (xx - cx) ** 2 / (2 * sx ** 2))))
    return np.stack(out).astype(np.float32)


def ink_maps(x: np.ndarray) -> np.ndarray:
    """Each image's own brightness as its map (a digit's ink)."""
    g = x.mean(-1)
    g = g - g.min(axis=(1, 2), keepdims=True)
    return (g / np.maximum(g.max(axis=(1, 2), keepdims=True), 1e-6)).astype(np.float32)


def images_of(run_dir: Path, trial, split: str, n: int, seed: int):
    """(pixels, paths, boxes or None) of ``n`` random images of the split, decoded with the run's recipe."""
    from transfer.data.datasets import read_shape_boxes
    from transfer.data.stream import decode_batches
    from transfer.runfolder import RunFolder

    run = RunFolder(run_dir)
    paths, _ = run.split_paths(split)
    idx = sorted(np.random.default_rng(seed).choice(len(paths), size=min(n, len(paths)), replace=False))
    sel = [Path(paths[i]) for i in idx]
    x = np.concatenate([b.x for b in decode_batches(sel, trial.image_size, batch=64, recipe=run.recipe)])
    boxes = None
    try:
        from transfer.fsutil import read_json

        root = Path(read_json(run_dir / "dataset.json")["root"])
        table_ = read_shape_boxes(root)
        boxes = np.array([table_[p.relative_to(root).as_posix()] for p in sel], dtype=float)
        boxes *= x.shape[1] / 64.0  # written at 64 px
    except Exception:  # not a shapes folder
        boxes = None
    return x, sel, boxes


def measure(name: str, run_dir: Path, trial_name: str, a) -> list[dict]:
    from transfer.analysis.cam_layers import resolve_layer
    from transfer.analysis.cam_verdict import rank_methods
    from transfer.analysis.gradcam import compute_maps, map_faithfulness
    from transfer.maps_config import FaithOptions
    from transfer.maps import map_flags, pointing_hits
    from transfer.runfolder import RunFolder

    trial = RunFolder(run_dir).trial(trial_name)
    model = trial.load_model()
    layer = resolve_layer(model, None, default=trial.meta.get("gradcam_layer"), fine=True).name
    x, _, boxes = images_of(run_dir, trial, a.split, a.images, a.seed)
    acc = trial.metrics["test"]["accuracy"]
    print(f"\n{name}: {trial_name} (test accuracy {acc:.3f}), layer {layer}, {len(x)} {a.split} images", flush=True)
    rows, summaries = [], {}
    from transfer.analysis.gradcam import keras_predict

    cls = keras_predict(model)(x).argmax(axis=1)  # the explained (predicted) class, also without a CAM method
    for meth in [m for m in REAL + FAKE + (ORACLE,) if m in a.maps]:
        t0 = time.perf_counter()
        if meth in REAL:
            maps, probs, cls = compute_maps(model, x, method=meth, layer=layer,
                                            scorecam_channels=a.scorecam_channels)
        elif meth == ORACLE:
            maps = box_maps(boxes, x.shape[1]) if boxes is not None else ink_maps(x)
        else:
            maps = blobs(len(x), x.shape[1], seed=a.seed, centre=meth == "centre blob")
        t1 = time.perf_counter()
        s, _ = map_faithfulness(model, x, maps, cls, FaithOptions(steps=a.steps, baseline=a.baseline,
                                                                  controls=a.controls, road="on", seed=a.seed,
                                                                  control_class=a.control_class))
        t2 = time.perf_counter()
        flags = map_flags(maps)
        summaries[meth] = s
        m = s["metrics"]
        rows.append({"model": name, "trial": trial_name, "layer": layer, "maps": meth, "images": len(x),
                     "measurable": s["measurable"],
                     **{k: m[k]["map_beats_control"] for k in m},
                     **{f"{k}_map": m[k]["map"] for k in m}, **{f"{k}_control": m[k]["control"] for k in m},
                     "beats_control": s["beats_control"],
                     "pointing": float(pointing_hits(maps, boxes).mean()) if boxes is not None else None,
                     "empty": flags.count("empty"), "border": flags.count("border"),
                     "map_s_per_img": (t1 - t0) / len(x), "faith_s_per_img": (t2 - t1) / len(x)})
        print(f"  {meth:12s} " + "  ".join(f"{k} {v['map_beats_control']:.2f}" for k, v in m.items())
              + f"  measurable {s['measurable']} of {len(x)}, empty {flags.count('empty')}  ({t2 - t0:.0f} s)", flush=True)
    ranked = rank_methods({k: v for k, v in summaries.items() if k in REAL})
    lead = ranked[0] if ranked else None
    for r in rows:
        r["lead"] = r["maps"] == lead
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--baseline", default="median")
    ap.add_argument("--controls", type=int, default=None, help="default: transfer gradcam's")
    ap.add_argument("--control-class", default="other", choices=("other", "any"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scorecam-channels", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transfer-bench" / "faithfulness")
    ap.add_argument("--shapes-run", type=Path, default=None, help="reuse a shapes run (MobileNetV2 trial)")
    ap.add_argument("--digits-run", type=Path, default=None, help="reuse a digits run with arc2-t100, mobilenet_v2-t100")
    ap.add_argument("--only", default="shapes,digits-arc2,digits-mobilenet_v2")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--maps", default=",".join(REAL + FAKE + ("reference",)),
                    help="comma list of the maps to measure (the lead is chosen among the CAM methods measured)")
    a = ap.parse_args()
    if a.controls is None:
        from transfer.maps_config import DEFAULT_CONTROLS

        a.controls = DEFAULT_CONTROLS
    a.work.mkdir(parents=True, exist_ok=True)
    only = a.only.split(",")
    a.maps = [ORACLE if m == "reference" else m for m in a.maps.split(",")]
    rows = []

    def add(new):  # rows so far are written after each model (a long run keeps what it measured)
        rows.extend(new)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))

    if "shapes" in only:
        add(measure("shapes", a.shapes_run or shapes_run(a.work), "mobilenet_v2-t100", a))
    if any(o.startswith("digits") for o in only):
        run = a.digits_run or digits_run(a.work)
        for bb in ("arc2", "mobilenet_v2"):
            if f"digits-{bb}" in only:
                add(measure(f"digits {bb}", run, f"{bb}-t100", a))

    def pct(v):
        return "-" if v is None else f"{100 * v:.0f} %"

    print(f"\nshare of the measurable {a.split} images (the removal baseline alone takes away at least half "
          f"of the class probability above chance) where the map beats its control (median of {a.controls} maps of images of "
          f"{'another' if a.control_class == 'other' else 'any other'} class); steps {a.steps}, baseline {a.baseline}, ROAD noise: the image's own noise level, >= 2.55")
    print(table(["model", "layer", "maps", "measurable", "deletion AUC", "insertion AUC", "ROAD MoRF", "ROAD LeRF",
                 "beats its control", "pointing game", "empty / border", "faithfulness s/img"],
                [[r["model"], r["layer"], r["maps"] + (" (leads)" if r["lead"] else ""),
                  f"{r['measurable']} of {r['images']}", pct(r["deletion_auc"]),
                  pct(r["insertion_auc"]), pct(r["road_morf"]), pct(r["road_lerf"]),
                  "yes" if r["beats_control"] else "no", pct(r["pointing"]), f"{r['empty']} / {r['border']}",
                  f"{r['faith_s_per_img']:.2f}"] for r in rows]))
    print()
    bars = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lead = next((r for r in rows if r["model"] == model and r["lead"]), None)
        if lead is not None:
            ok = lead["deletion_auc"] >= 0.8 and lead["road_morf"] >= 0.8
            bars.append([model, f"{lead['maps']} maps beat their control >= 80 % (deletion, ROAD)",
                         f"{pct(lead['deletion_auc'])}, {pct(lead['road_morf'])}", "met" if ok else "NOT MET"])
        for fake in FAKE:
            r = next((r for r in rows if r["model"] == model and r["maps"] == fake), None)
            if r is None:
                continue
            ok = r["deletion_auc"] <= 0.6 and r["road_morf"] <= 0.6
            bars.append([model, f"{fake} does not (<= 60 %)", f"{pct(r['deletion_auc'])}, {pct(r['road_morf'])}",
                         "met" if ok else "NOT MET"])
        r = next((r for r in rows if r["model"] == model and r["maps"] == ORACLE), None)
        if r is None:
            continue
        bars.append([model, "(sanity) the reference map reaches >= 80 %",
                     f"{pct(r['deletion_auc'])}, {pct(r['road_morf'])}",
                     "yes" if r["deletion_auc"] >= 0.8 and r["road_morf"] >= 0.8 else "no: the measurement cannot tell"])
    print(table(["model", "bar", "measured (deletion, ROAD)", ""], bars))


if __name__ == "__main__":
    main()
