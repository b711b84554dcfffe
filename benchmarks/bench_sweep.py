"""What a freeze sweep costs with the frozen-prefix cache, and what the cache does to accuracy.

    python benchmarks/bench_sweep.py [--images 2000] [--size 96] [--epochs 3] [--weights none|PATH]
                                     [--rss 20000 [--rss-only]] [--work DIR]

MobileNetV2 at 96x96 on the first ``--images`` images of Fashion-MNIST's training set
(Debian package dataset-fashion-mnist), trainable 0, 0.1, 0.3, 0.5, 0.7 and 1.0, each sweep
one ``transfer train`` process:

1. the cached sweep: its wall time and each trial's (the t100 trial trains everything, so
   it has no frozen part to cache: it is the reference "one fine-tune");
2. the same sweep with ``--no-cache`` (same seed, same batches): each trial's test
   accuracy, cached vs uncached;
3. with ``--rss N``: the peak resident memory of a cached sweep (trainable 0, 0.5; one
   epoch) over N images and over ``--images`` images, each in a fresh process.

Bars: cached sweep wall <= 2.0x its own t100 trial; each trial's test accuracy within
1.5 points cached vs uncached; peak RSS over N images <= 1.5x over ``--images``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, table

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FRACTIONS = "0,0.1,0.3,0.5,0.7,1.0"


def fashion_folder(root: Path, n: int) -> Path:
    """The first ``n`` Fashion-MNIST training images as class folders (made once)."""
    from transfer.data.datasets import FASHION_MNIST_CLASSES, write_idx

    out = root / f"fmnist-{n}"
    if not (out / ".complete").is_file():
        write_idx(FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "train-labels-idx1-ubyte.gz", out,
                  class_names=FASHION_MNIST_CLASSES, limit=n, overwrite=True)
        (out / ".complete").touch()
    return out


def sweep(data: Path, out: Path, *, size: int, epochs: int, weights: str, fractions: str, extra=()) -> dict:
    """Run ``transfer train`` in a fresh process; wall time, per-trial wall times and peak RSS."""
    cmd = [sys.executable, "-m", "transfer.cli", "train", str(data), "--backbone", "mobilenet_v2",
           "--trainable", fractions, "--weights", weights, "--epochs", str(epochs), "--image-size", str(size),
           "--batch-size", "32", "--patience", "0", "--workers", "2", "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    starts, ends, log = {}, {}, []
    for line in proc.stderr:
        now = time.perf_counter() - t0
        log.append(f"{now:8.1f}  {line.rstrip()}")
        words = line.split()
        if line.startswith("trial ") and len(words) >= 3 and "/" in words[1]:
            name = words[2].rstrip(":")
            if len(words) == 3:
                starts[name] = now
            elif words[3] in ("done", "FAILED:"):
                ends[name] = now
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.log").write_text("\n".join(log) + "\n")
    if status != 0:
        raise SystemExit(f"sweep into {out} failed; see {out.parent / (out.name + '.log')}")
    trials = {n: ends[n] - starts[n] for n in ends if n in starts}
    metrics = {n: json.loads((out / "trials" / n / "metrics.json").read_text()) for n in trials}
    return {"wall": wall, "trials": trials, "metrics": metrics, "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--weights", default="none")
    ap.add_argument("--rss", type=int, default=0, help="also measure peak RSS over this many images")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transfer-bench" / "sweep")
    ap.add_argument("--skip-uncached", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS part (needs --rss)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.rss_only:
        return rss(a)
    data = fashion_folder(a.work, a.images)
    tag = f"{a.images}-{a.size}-e{a.epochs}-{Path(a.weights).stem}"
    kw = dict(size=a.size, epochs=a.epochs, weights=a.weights, fractions=FRACTIONS)
    cached = sweep(data, a.work / f"cached-{tag}", **kw)
    t100 = cached["trials"]["mobilenet_v2-t100"]
    print(f"cached sweep: {cached['wall']:.0f} s; its t100 trial {t100:.0f} s; ratio {cached['wall'] / t100:.2f} "
          f"(bar <= 2.0)")
    rows = []
    uncached = None if a.skip_uncached else sweep(data, a.work / f"uncached-{tag}", extra=("--no-cache",), **kw)
    for name, secs in cached["trials"].items():
        m = cached["metrics"][name]
        row = [name, round(secs, 1), m["cache"].get("mode"), round(m["cost"]["prefix_seconds"], 1),
               round(m["cost"]["train_seconds"], 1), round(m["cost"]["evaluate_seconds"], 1),
               f"{100 * m['test']['accuracy']:.1f}"]
        if uncached:
            u = uncached["metrics"][name]
            row += [round(uncached["trials"][name], 1), f"{100 * u['test']['accuracy']:.1f}",
                    f"{100 * (m['test']['accuracy'] - u['test']['accuracy']):+.1f}"]
        rows.append(row)
    header = ["trial", "cached s", "frozen part", "prefix s", "train s", "evaluate s", "test acc %"]
    if uncached:
        header += ["uncached s", "uncached test acc %", "difference (points)"]
    print(table(header, rows))
    if uncached:
        print(f"uncached sweep: {uncached['wall']:.0f} s ({uncached['wall'] / cached['wall']:.2f}x the cached one)")
    if a.rss:
        rss(a)


def rss(a) -> None:
    """Peak RSS of a cached sweep (trainable 0, 0.5; one epoch) over ``--images`` and ``--rss`` images."""
    small = fashion_folder(a.work, a.images)
    large = fashion_folder(a.work, a.rss)
    rk = dict(size=a.size, epochs=1, weights=a.weights, fractions="0,0.5")
    for n in (a.images, a.rss):  # fresh run folders: a finished one would only be resumed
        shutil.rmtree(a.work / f"rss-{n}", ignore_errors=True)
    r_small = sweep(small, a.work / f"rss-{a.images}", **rk)["rss_mb"]
    r_large = sweep(large, a.work / f"rss-{a.rss}", **rk)["rss_mb"]
    print(f"peak RSS, cached sweep (trainable 0,0.5; 1 epoch): {a.images} images {r_small:.0f} MB, "
          f"{a.rss} images {r_large:.0f} MB: {r_large / r_small:.2f}x (bar <= 1.5)")


if __name__ == "__main__":
    main()
