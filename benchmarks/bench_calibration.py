"""Calibrated bundles that can answer "unknown", measured on real data (scikit-learn's digits).

    python benchmarks/bench_calibration.py [--backbones arc2,mobilenet_v2] [--epochs 5] [--size 32]
                                           [--val 0.2] [--test 0.1]

For each backbone, one run trained the way `make demo` trains (random weights, 100 %
trainable, --image-size 32), exported with calibration:

1. all ten digits: ECE / NLL / Brier on the test split before and after temperature
   scaling (bar: ECE after <= half of before, or <= 0.02; accuracy unchanged);
2. digits trained WITHOUT two classes (8 and 9): AUROC of each unknown-input score for the
   known test images vs (a) the two left-out classes, (b) uniform noise images, (c)
   Fashion-MNIST images when Debian's dataset-fashion-mnist is installed; the false-accept
   rate at the bundle's own threshold (bar: AUROC >= 0.90 for the best score).

Everything runs through the CLI a user types (`transfer train`, `transfer export`) and the
runtime (`transfer.runtime.unknown.evaluate_unknown`), on the files the bundle holds.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import ROOT, table

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def transfer(*args: str) -> None:
    cmd = [sys.executable, "-m", "transfer.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")


def write_noise(folder: Path, n: int = 200) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"noise_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def write_fashion(folder: Path, n: int = 300) -> list[Path]:
    imgs = next(iter(FMNIST.glob("t10k-images-idx3-ubyte*")), None)
    if imgs is None:
        return []
    data = gzip.open(imgs).read() if imgs.suffix == ".gz" else imgs.read_bytes()
    arr = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, a in enumerate(arr):
        p = folder / f"fashion_{i:03d}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def train_export(data: Path, run: Path, backbone: str, epochs: int, size: int, val: float, test: float) -> Path:
    transfer("train", str(data), "--backbone", backbone, "--trainable", "1.0", "--weights", "none",
             "--epochs", str(epochs), "--image-size", str(size), "--val", str(val), "--test", str(test),
             "--out", str(run))
    transfer("export", str(run), "--force", "--quiet")
    return run / "bundle"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", default="arc2,mobilenet_v2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    # the demo's split (val 0.2, test 0.1) leaves 179 test images, where even a perfectly
    # calibrated model shows an ECE of ~0.03; --val 0.3 --test 0.4 measures it on ~720
    ap.add_argument("--val", type=float, default=0.2)
    ap.add_argument("--test", type=float, default=0.1)
    a = ap.parse_args()
    from transfer.bundle import load_bundle
    from transfer.data.datasets import write_digits
    from transfer.runfolder import RunFolder
    from transfer.runtime.unknown import evaluate_unknown

    cal_rows, ood_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits(tmp / "digits")
        known8 = tmp / "digits8"
        shutil.copytree(tmp / "digits", known8)
        for c in ("8", "9"):
            shutil.move(str(known8 / c), tmp / f"left_out_{c}")
        held_out = sorted((tmp / "left_out_8").glob("*.png")) + sorted((tmp / "left_out_9").glob("*.png"))
        noise = write_noise(tmp / "noise")
        fashion = write_fashion(tmp / "fashion")
        for bb in a.backbones.split(","):
            t0 = time.perf_counter()
            b = load_bundle(train_export(tmp / "digits", tmp / f"run10-{bb}", bb, a.epochs, a.size, a.val, a.test))
            c = b.manifest["calibration"]
            before, after = c["test"]["before"], c["test"]["after"]
            bar = after["ece"] <= 0.5 * before["ece"] or after["ece"] <= 0.02
            cal_rows.append([bb, f"{c['temperature']:.3f}", before["images"], before["accuracy"], after["accuracy"],
                             f"{before['ece']:.4f}", f"{after['ece']:.4f}", f"{after['ece_floor']:.4f}",
                             before["nll"], after["nll"], before["brier"], after["brier"],
                             "yes" if bar and before["accuracy"] == after["accuracy"] else "NO"])
            b8 = load_bundle(train_export(known8, tmp / f"run8-{bb}", bb, a.epochs, a.size, a.val, a.test))
            known = RunFolder(tmp / f"run8-{bb}").split_paths("test")[0]
            for label, files in (("left-out digits 8, 9", held_out), ("uniform noise", noise),
                                 ("Fashion-MNIST", fashion)):
                if not files:
                    continue
                r = evaluate_unknown(b8, known, files)
                best = r["best"]
                ood_rows.append([bb, label, r["known"], r["unknown"]]
                                + [r["scores"][s]["auroc"] for s in ("mahalanobis", "msp")]
                                + [best, r["scores"][best]["false_accept_rate"], r["scores"][best]["known_accept_rate"],
                                   "yes" if r["scores"][best]["auroc"] >= 0.90 else "NO"])
            print(f"{bb}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n### Calibration on the digits test split (all ten classes)\n")
    print(table(["backbone", "T", "test images", "acc before", "acc after", "ECE before", "ECE after",
                 "ECE of a calibrated model here", "NLL before", "NLL after", "Brier before", "Brier after",
                 "bar met"], cal_rows))
    print("\n### Unknown inputs: trained without digits 8 and 9\n")
    print(table(["backbone", "unknown images", "known", "unknown", "AUROC mahalanobis", "AUROC msp", "best",
                 "false-accept at threshold", "known accepted", "AUROC >= 0.90"], ood_rows))
    if not fashion:
        print("\n(Fashion-MNIST rows need Debian's dataset-fashion-mnist)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
