"""Is every trial's network at least as good as a logistic regression on its own pooled features?

    python benchmarks/bench_heads_bar.py [--work DIR] [--only digits|transfer]

Two sweeps, each followed by ``transfer heads RUN --trial all --head logreg`` (StandardScaler +
LogisticRegression on the pooled features of each trial's own saved model):

* digits: scikit-learn's 1,797 real 8x8 digits as images (``transfer data digits``),
  MobileNetV2 from random weights at 32x32, trainable 0.3 and 1.0;
* transfer: MobileNetV2 pretrained with ``transfer train`` on five Fashion-MNIST classes
  (T-shirt/top, trouser, pullover, dress, coat; 6,000 images), then a sweep on the five
  other classes with 20 training images each (val carved from them) and 200 test images
  each, starting from the pretrained model (``--weights PATH``), trainable 0, 0.3 and 1.0.

Bar: in every trial, network test accuracy >= logistic regression test accuracy - 3 points.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, logreg_guard_rows, table

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def transfer(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "transfer.cli", *map(str, args)]
    print("$ transfer " + " ".join(map(str, args)), flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")



def digits(work: Path) -> list[list]:
    data, run = work / "digits", work / "digits-run"
    if not (data / ".complete").is_file():
        transfer("data", "digits", data, "--force")
        (data / ".complete").touch()
    transfer("train", data, "--backbone", "mobilenet_v2", "--weights", "none", "--trainable", "0.3,1.0",
             "--image-size", 32, "--epochs", 5, "--out", run)
    transfer("heads", run, "--trial", "all", "--head", "logreg")
    return [["digits", *r] for r in logreg_guard_rows(run)]


def _fashion(work: Path) -> Path:
    from transfer.data.datasets import FASHION_MNIST_CLASSES, write_idx

    out = work / "fmnist"
    if not (out / ".complete").is_file():
        for split, stem in (("train", "train"), ("test", "t10k")):
            write_idx(FMNIST / f"{stem}-images-idx3-ubyte.gz", FMNIST / f"{stem}-labels-idx1-ubyte.gz",
                      out / split, class_names=FASHION_MNIST_CLASSES, overwrite=True)
        (out / ".complete").touch()
    return out


def _subset(src: Path, out: Path, classes, per_class: int) -> None:
    for c in classes:
        (out / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            shutil.copyfile(f, out / c / f.name)


def fashion_transfer(work: Path) -> list[list]:
    fm = _fashion(work)
    from transfer.data.datasets import FASHION_MNIST_CLASSES

    source, target = list(FASHION_MNIST_CLASSES[:5]), list(FASHION_MNIST_CLASSES[5:])
    pre_data, pre_run = work / "fm-source", work / "fm-pretrain"
    if not pre_data.exists():
        _subset(fm / "train", pre_data, source, 1200)
    transfer("train", pre_data, "--backbone", "mobilenet_v2", "--weights", "none", "--trainable", "1.0",
             "--image-size", 32, "--epochs", 8, "--out", pre_run)
    weights = pre_run / "trials" / "mobilenet_v2-t100" / "model.keras"
    tgt_data, tgt_run = work / "fm-target", work / "fm-target-run"
    if not tgt_data.exists():
        _subset(fm / "train", tgt_data / "train", target, 20)
        _subset(fm / "test", tgt_data / "test", target, 200)
    transfer("train", tgt_data, "--backbone", "mobilenet_v2", "--weights", weights, "--trainable", "0,0.3,1.0",
             "--image-size", 32, "--epochs", 10, "--val", 0.2, "--out", tgt_run)
    transfer("heads", tgt_run, "--trial", "all", "--head", "logreg")
    return [["fashion transfer", *r] for r in logreg_guard_rows(tgt_run)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transfer-bench" / "heads-bar")
    ap.add_argument("--only", choices=("digits", "transfer"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if a.only in (None, "digits"):
        rows += digits(a.work)
    if a.only in (None, "transfer"):
        rows += fashion_transfer(a.work)
    print(table(["sweep", "trial", "network test acc %", "logreg test acc %", "difference (points)",
                 "bar (>= -3)"], rows))


if __name__ == "__main__":
    main()
