"""Audit of Fashion-MNIST's 60,000 training images with a trained arc2 trial: wall time and peak RSS.

Writes the images as a folder (``transfer data idx``), plants corruptions (flipped labels,
resized / re-compressed / cropped copies across splits, blank and noise images; see
tests/helpers/corrupt.py), trains arc2 once (``--epochs``), then runs ``transfer data audit
DATA --run RUN`` in a fresh process and reports its wall time, its peak RSS (VmHWM of the audit
process, and the largest sum over it and its children -- the model is converted to ONNX in a
child process -- sampled every 0.1 s) and the audit's scores on the planted truth, with the
seconds of each phase (indexing and hashing before the pass; the pass reading every image once
and computing its features; duplicates; label issues; outliers; quality; writing the outputs).
Bars: wall <= 180 s, peak RSS <= 1.5 GB on 2 cores (the bar run is the full 60,000; ``--n``
for a smaller one).

    python benchmarks/bench_audit.py --work /tmp/bench_audit [--n 60000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import ROOT

sys.path.insert(0, str(ROOT / "tests"))

FMNIST = Path("/usr/share/datasets/fashion-mnist")

_AUDIT = """
import json, sys, time
sys.path.insert(0, {src!r})
t0 = time.perf_counter()
from transfer.analysis.audit import audit_folder
res = audit_folder({data!r}, run={run!r}, force=True)
wall = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
cpu = time.process_time()
print("RESULT " + json.dumps({{"wall": wall, "rss_kb": int(hwm), "cpu": cpu, "counts": res.summary["counts"]}}))
"""


class _TreeRss:
    """Samples, every 0.1 s, the resident memory of a process and of all its descendants (the
    audit converts the model in a child process): the largest sum seen, in kB."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self.peak_children, self._stop = pid, 0, 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _tree(self, pid: int) -> list[int]:
        out = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    for c in f.read().split():
                        out += self._tree(int(c))
        except OSError:
            pass
        return out

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                return next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")), 0)
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop:
            pids = self._tree(self.pid)
            rss = [self._rss(q) for q in pids]
            self.peak = max(self.peak, sum(rss))
            self.peak_children = max(self.peak_children, sum(rss[1:]))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop = True
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_audit")
    ap.add_argument("--n", "--limit", dest="limit", type=int, default=60000,
                    help="training images of Fashion-MNIST to use (the bar run: 60000)")
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    from helpers.corrupt import score_audit, write_corrupted
    from transfer.data.datasets import FASHION_MNIST_CLASSES, read_idx

    work = Path(a.work)
    data, run = work / "data", work / "run"
    truth_file = work / "truth.json"
    if not truth_file.is_file():
        x = read_idx(FMNIST / "train-images-idx3-ubyte.gz", kind="images")[:a.limit]
        y = read_idx(FMNIST / "train-labels-idx1-ubyte.gz", kind="labels")[:a.limit].astype(np.int64)
        truth = write_corrupted(x, y, list(FASHION_MNIST_CLASSES), data, flips=a.limit // 100, copies=300,
                                blanks=50, noise=50)
        truth_file.write_text(json.dumps(truth))
    truth = json.loads(truth_file.read_text())
    if not (run / "best.json").is_file():
        from transfer.trainer.config import load_config
        from transfer.trainer.sweep import run_sweep

        t0 = time.perf_counter()
        cfg = load_config(None, {"data": str(data), "out": str(run), "backbones": "arc2", "trainable": "1",
                                 "weights": "none", "epochs": a.epochs, "image_size": 28, "batch_size": 128,
                                 "patience": 0, "lr": 2e-3})
        res = run_sweep(cfg, progress=print)
        print(f"trained in {time.perf_counter() - t0:.0f} s: {res.best}")
    load = os.getloadavg()
    p = subprocess.Popen([sys.executable, "-c", _AUDIT.format(src=str(ROOT / "src"), data=str(data), run=str(run))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    tree = _TreeRss(p.pid)
    out, err = p.communicate()
    tree.stop()
    p.stdout, p.stderr = out, err
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        sys.exit(p.stderr[-3000:])
    r = json.loads(line[0][7:])
    from transfer.analysis.audit import audit_dir

    s = json.loads((audit_dir(run) / "audit.json").read_text())
    import csv

    with open(audit_dir(run) / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scores = score_audit(rows, s, truth)
    by_kind = {}
    for kind in ("resized", "recompressed", "cropped"):
        mine = [c for c in truth["copies"] if kind in c[1]]
        by_kind[kind] = score_audit(rows, s, {**truth, "copies": mine})["dup_recall"]
    ph = s.get("phase_seconds", {})
    before = r["wall"] - s["seconds"]  # indexing, file hashes
    print("| images | wall s | peak RSS MB (audit process; with its children, sampled) | load before / after | "
          "index+hash s | read+features s (model) | duplicates s | label issues s | outliers s | quality+write s |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {s['images']} | {r['wall']:.0f} | {r['rss_kb'] / 1024:.0f} ({tree.peak / 1024:.0f}) | {load[0]:.1f} / "
          f"{os.getloadavg()[0]:.1f} | {before:.0f} | "
          f"{ph.get('read_and_features', 0):.0f} ({ph.get('model', 0):.0f}) | {ph.get('duplicates', 0):.0f} | "
          f"{ph.get('label_issues', 0):.0f} | {ph.get('outliers', 0):.0f} | "
          f"{ph.get('quality', 0) + ph.get('write', 0):.0f} |")
    print()
    print("| cross-split dup recall | dup precision | pairs reported | resized / re-compressed / cropped found | "
          "flips p@k | blank/noise recall |")
    print("|---:|---:|---:|---|---:|---:|")
    print(f"| {scores['dup_recall']:.3f} | {scores['dup_precision']:.3f} | {scores['dup_reported_pairs']} | "
          f"{by_kind['resized']:.2f} / {by_kind['recompressed']:.2f} / {by_kind['cropped']:.2f} | "
          f"{scores['flip_precision_at_k']:.3f} | {scores['blank_noise_recall']:.3f} |")
    print(json.dumps({"counts": r["counts"], "near_duplicate_search": s.get("near_duplicate_search"),
                      "cpu_s": r.get("cpu")}))


if __name__ == "__main__":
    main()
