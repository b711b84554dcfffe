"""The trainer's quality guard: does a network trained from random weights on class-sorted folders learn?

    python benchmarks/bench_quality.py [--images 6000] [--size 64] [--epochs 15] [--patience 5,3] [--work DIR]

A consistency check (the network vs a probe on its own features, Keras vs ONNX) cannot see
both sides getting worse. This guard trains MobileNetV2 from random weights on the
synthetic shapes folder (``transfer data shapes``: four classes, one random-coloured shape
per image at a random place and size; the folder is class-sorted on disk, as every image
folder is) with ``--augment flip --seed 1`` and early stopping, once per ``--patience``
value, each run one ``transfer train`` process, and prints the per-epoch validation accuracy
of the network's own head, the epoch it saved and the saved model's test accuracy.

Bars (per-epoch validation reads the population BatchNorm statistics; when those are wrong
the validation becomes noise and early stopping saves a weak epoch): validation accuracy
>= 0.95 by epoch 6 and test accuracy >= 0.99, with ``--patience 5`` and with the default 3.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, table


def transfer(*args) -> float:
    """Run ``transfer ARGS`` in a fresh process; its wall time in seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    print("$ transfer " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "transfer.cli", *map(str, args)], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def shapes_guard(work: Path, *, images: int, size: int, epochs: int, patience: int) -> dict:
    from transfer.runfolder import RunFolder

    data = work / f"shapes-{images}-{size}"
    if not (data / ".complete").is_file():
        transfer("data", "shapes", data, "--images", images, "--size", size, "--seed", 0, "--force")
        (data / ".complete").touch()
    run = work / f"run-p{patience}"
    seconds = transfer("train", data, "--backbone", "mobilenet_v2", "--weights", "none", "--trainable", "1.0",
                       "--image-size", size, "--epochs", epochs, "--patience", patience, "--augment", "flip",
                       "--seed", 1, "--out", run)
    trial = RunFolder(run).trial("mobilenet_v2-t100")
    history = trial.files.history()
    metrics = trial.metrics
    val = {int(r["epoch"]): float(r["val_accuracy"]) for r in history}
    by6 = max((v for e, v in val.items() if e <= 6), default=0.0)
    return {"patience": patience, "val": val, "best_epoch": metrics["best_epoch"], "epochs_run": len(history),
            "test": metrics["test"]["accuracy"], "val_saved": metrics["val"]["accuracy"], "by6": by6,
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", default="5,3", help="comma list: one run per value")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transfer-bench" / "quality")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    results = [shapes_guard(a.work, images=a.images, size=a.size, epochs=a.epochs, patience=int(p))
               for p in a.patience.split(",")]
    epochs = sorted({e for r in results for e in r["val"]})
    print(table(["patience", *[f"val e{e}" for e in epochs]],
                [[r["patience"], *[f"{r['val'][e]:.3f}" if e in r["val"] else "" for e in epochs]] for r in results]))
    print()
    print(table(["patience", "epochs run", "saved epoch", "val (saved)", "best val by epoch 6", "test acc",
                 "bar (val >= 0.95 by 6, test >= 0.99)", "seconds"],
                [[r["patience"], r["epochs_run"], r["best_epoch"], f"{r['val_saved']:.3f}", f"{r['by6']:.3f}",
                  f"{r['test']:.4f}", "met" if r["by6"] >= 0.95 and r["test"] >= 0.99 else "NOT MET",
                  f"{r['seconds']:.0f}"] for r in results]))


if __name__ == "__main__":
    main()
