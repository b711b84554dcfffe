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

``--digits``: label issues where they hurt most, per split. scikit-learn's digits (``transfer
data digits``) as train / val / test folders (70 / 15 / 15 %, seeded), 5 % of the training images
moved to a wrong class (``--flip-splits train,val,test`` flips 5 % of each), a run trained on
them that fits its training labels (``transfer train --backbone arc2|mobilenet_v2 --weights none
--trainable 1 --dropout 0 --image-size 32 --patience 0 --epochs E``), then ``transfer data audit
DATA --run RUN``. Per split: planted flips, images flagged, precision and recall -- and, in the
same run, what the audit did before (cross-validated heads on the trained trial's features,
cleanlab's default filter) on the same features. Bar: in the training split, recall >= 0.85 at
precision >= 0.8.

    python benchmarks/bench_audit.py --digits --work /tmp/bench_flips [--backbone arc2] [--epochs 60]

``--digits --kfold K``: the K fine-tuned folds the user can ask for. The digits as class folders, 5 %
of all images moved to a wrong class, ``transfer train ... --kfold K --test 0.15`` (every image
outside test is trained on by K-1 fold models and held out by one), then the audit; per split:
the images the audited trial trained on, the others outside test, and test.

    python benchmarks/bench_audit.py --digits --kfold 5 --work /tmp/bench_flips_k5
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


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "transfer.cli", *args], env=env, check=True, text=True,
                          capture_output=True)


def _flip_folder(src: Path, data: Path, splits: tuple[str, ...] | None, rate: float = 0.05, seed: int = 0) -> list[str]:
    """``src/<class>/*.png`` copied as ``data/{train,val,test}/<class>/`` (70 / 15 / 15 %, seeded),
    ``rate`` of the images of each of ``splits`` moved to another class; returns the moved paths.
    ``splits=None``: copied as ``data/<class>/`` (no split), ``rate`` of all images moved."""
    import shutil

    rng = np.random.default_rng(seed)
    files = sorted(src.rglob("*.png"))
    classes = sorted({f.parent.name for f in files})
    order = rng.permutation(len(files))
    n_tr, n_va = int(0.7 * len(files)), int(0.15 * len(files))
    part = {int(i): ("train" if k < n_tr else "val" if k < n_tr + n_va else "test") for k, i in enumerate(order)}
    moved = set()
    for s in (splits or ("train", "val", "test")):
        mine = [i for i in range(len(files)) if part[i] == s]
        moved |= set(rng.choice(mine, int(round(rate * len(mine))), replace=False).tolist())
    out = []
    for i, f in enumerate(files):
        c = f.parent.name
        if i in moved:
            c = classes[(classes.index(c) + int(rng.integers(1, len(classes)))) % len(classes)]
        rel = f"{part[i]}/{c}/{f.name}" if splits else f"{c}/{f.name}"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / rel)
        if i in moved:
            out.append(rel)
    return out


def _before(data: Path, features: Path, folds: int = 5) -> list[dict]:
    """What the audit did before, on the same features: 5-fold cross-validated logistic regression
    on the trained trial's features of every image, cleanlab's default filter; as audit rows."""
    import warnings

    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from transfer.data.folder import FileCheck, index_folder

    samples = index_folder(data, strict=False, check=FileCheck(decode=False)).samples
    labels = np.array([s.label for s in samples])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probs = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=100)), np.load(features),
                                  labels, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                                  method="predict_proba")
    flagged = find_label_issues(labels, probs, n_jobs=1)
    return [{"path": samples[i].path, "kind": "label_issue"} for i in np.flatnonzero(flagged)]


def digits_flips(a) -> None:
    """The ``--digits`` bench (module docstring)."""
    import csv

    from helpers.corrupt import flips_by_split

    work = Path(a.work)
    src, data, run = work / "digits", work / "data", work / f"run-{a.backbone}"
    if not src.is_dir():
        _cli("data", "digits", str(src))
    truth_file = work / "truth.json"
    if not truth_file.is_file():
        splits = None if a.kfold else tuple(a.flip_splits.split(","))
        truth_file.write_text(json.dumps(_flip_folder(src, data, splits)))
    flipped = json.loads(truth_file.read_text())
    train_cmd = ["train", str(data), "--backbone", a.backbone, "--weights", "none", "--trainable", "1", "--dropout",
                 "0", "--image-size", "32", "--patience", "0", "--epochs", str(a.epochs), "--out", str(run), "-q"]
    if a.kfold:
        train_cmd[-3:-3] = ["--kfold", str(a.kfold), "--test", "0.15"]
    if not (run / "best.json").is_file():
        t0 = time.perf_counter()
        _cli(*train_cmd)
        print(f"trained in {time.perf_counter() - t0:.0f} s")
    best = json.loads((run / "best.json").read_text())
    m = json.loads((run / "trials" / best["trial"] / "metrics.json").read_text())
    t0 = time.perf_counter()
    _cli("data", "audit", str(data), "--run", str(run), "--force", "-q")
    wall = time.perf_counter() - t0
    with open(run / "audit" / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    s = json.loads((run / "audit" / "audit.json").read_text())
    where = None
    if a.kfold:  # the audited trial's own train split, the rest outside test, test
        from transfer.runfolder import RunFolder

        run_folder = RunFolder(run)
        t = run_folder.trial(best["trial"])
        where = {p: "test" for p, _ in run_folder.split("test")}
        where.update({p: "train" for p, _ in run_folder.split("train", fold=t.fold)})
        where.update({p: "val" for p, _ in run_folder.split("val", fold=t.fold)})
    before_rows = _before(data, run / "audit" / "features.npy")
    now, before = flips_by_split(rows, flipped, where=where), flips_by_split(before_rows, flipped, where=where)
    print(f"`transfer {' '.join(train_cmd)}`: trial {best['trial']}, train accuracy {m['train']['accuracy']:.3f}, "
          f"val {m['val']['accuracy']:.3f}, test {m['test']['accuracy']:.3f}; audit {wall:.0f} s wall")
    print()
    print("| split | planted flips | flagged | found | precision | recall | before: flagged / precision / recall |")
    print("|---|---:|---:|---:|---:|---:|---|")

    def f3(v):
        return "--" if v is None else f"{v:.3f}"

    for k in ("train", "val", "test"):
        x, b = now[k], before[k]
        print(f"| {k} | {x['flips']} | {x['flagged']} | {x['found']} | {f3(x['precision'])} | {f3(x['recall'])} | "
              f"{b['flagged']} / {f3(b['precision'])} / {f3(b['recall'])} |")
    print()
    for g in s["label_issues"]["groups"]:
        print(f"- {g['what']} ({g['images']} images): {g.get('source')} -- out-of-fold log loss {g.get('log_loss')}")
    tr = now["train"]
    met = (tr["recall"] or 0) >= 0.85 and (tr["precision"] or 0) >= 0.8
    print(f"\nbar (training split: recall >= 0.85 at precision >= 0.8): {'met' if met else 'NOT met'} "
          f"(recall {f3(tr['recall'])}, precision {f3(tr['precision'])})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_audit")
    ap.add_argument("--n", "--limit", dest="limit", type=int, default=60000,
                    help="training images of Fashion-MNIST to use (the bar run: 60000)")
    ap.add_argument("--epochs", type=int, default=None, help="[default: 2; 60 with --digits]")
    ap.add_argument("--digits", action="store_true", help="the label-issue bench on the digits (per split)")
    ap.add_argument("--backbone", default="arc2", help="with --digits: arc2 or mobilenet_v2")
    ap.add_argument("--flip-splits", default="train", help="with --digits: the splits whose labels are flipped")
    ap.add_argument("--kfold", type=int, default=None, help="with --digits: train K fold models (all images flipped)")
    a = ap.parse_args()
    if a.digits:
        a.epochs = a.epochs or 60
        return digits_flips(a)
    a.epochs = a.epochs or 2
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
    print()
    print("| split | planted flips | flagged | found | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, x in scores["flips_by_split"].items():
        print(f"| {k} | {x['flips']} | {x['flagged']} | {x['found']} | "
              + " | ".join("--" if v is None else f"{v:.3f}" for v in (x["precision"], x["recall"])) + " |")
    print(json.dumps({"counts": r["counts"], "near_duplicate_search": s.get("near_duplicate_search"),
                      "label_issues": s.get("label_issues"), "cpu_s": r.get("cpu")}))


if __name__ == "__main__":
    main()
