#!/usr/bin/env bash
# `make demo`: the main job end to end, offline, on the embedded digits data
# (scikit-learn's 1,797 real 8x8 handwritten digits written as PNG class folders).
# Every step is resumable: re-running the demo skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
T=".venv/bin/transfer"
PY=".venv/bin/python"
OUT="${DEMO_DIR:-demo}"
RUN="$OUT/runs/digits"
step() { printf '\n==> %s\n' "$*"; }

step "1/15 embedded data -> $OUT/digits"
if [ ! -f "$OUT/digits/.complete" ]; then
    $T data digits "$OUT/digits" --force
    touch "$OUT/digits/.complete"
else
    echo "already there"
fi

step "2/15 freeze sweep: mobilenet_v2 and arc2, trainable 0 / 30 % / 100 % (offline: random weights, so t100 is the random-init trial)"
$T train "$OUT/digits" --backbone mobilenet_v2,arc2 --trainable 0,0.3,1.0 --random-init \
    --weights none --epochs 5 --image-size 32 --out "$RUN"

step "3/15 data audit: duplicates, leakage across the run's splits, likely label errors, outliers"
$T data audit "$OUT/digits" --run "$RUN" -q

step "4/15 classical heads on the learned features (network vs RF / SVM / logistic regression)"
$T heads "$RUN" --head rf,svm,logreg

step "5/15 per-class metrics, confusion matrix, sample grids"
$T evaluate "$RUN"

step "6/15 learned features in 2-D"
$T features "$RUN" --plot pca,tsne

step "7/15 Grad-CAM (three methods) with the faithfulness numbers"
$T gradcam "$RUN" --samples 32 --method all

step "8/15 resolution study (train once at 32 px, test at 16 / 8 / 4 px)"
$T resolution "$RUN" --sizes 16,8,4 --mode totv

step "9/15 export: verified, calibrated ONNX bundle + int8 + RandomForest head"
$T export "$RUN" --head rf --quantize int8 --force

step "10/15 how well the bundle answers 'unknown': test digits vs noise images"
if [ ! -f "$OUT/unknown/.complete" ]; then
    $PY - "$OUT/unknown" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(100):  # uniform noise and smooth blobs: none of them is a digit
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) if i % 2 else \
        np.kron(rng.integers(0, 256, (2, 2, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    Image.fromarray(img).save(out / f"unknown_{i:03d}.png")
(out / ".complete").touch()
PY
fi
$T evaluate "$RUN" --unknown "$OUT/unknown" -q

step "11/15 TensorFlow-free inference over every demo image with the RF head, rejecting unknowns"
$T infer "$RUN/bundle" "$OUT/digits" "$OUT/unknown" --recursive --head rf --topk 3 --reject \
    --out "$OUT/predictions.csv"

step "12/15 latency benchmark: ONNX Runtime fp32 / int8 vs Keras"
$T bench "$RUN/bundle" --backends onnxruntime,onnxruntime-int8,keras --batch 1,8,32 --head rf --seconds 1

step "13/15 the bundle as an HTTP service: start, one request, stop"
$PY - "$RUN/bundle" "$OUT/digits/3" <<'PY'
import json, signal, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
bundle, folder = sys.argv[1], Path(sys.argv[2])
srv = subprocess.Popen([".venv/bin/transfer", "serve", bundle, "--port", "0", "--head", "rf", "--reject"],
                       stderr=subprocess.PIPE, text=True)
url = None
t0 = time.time()
while url is None and time.time() - t0 < 120:
    line = srv.stderr.readline()
    print(line.rstrip(), file=sys.stderr)
    if "http://127.0.0.1:" in line:
        url = "http://" + line.split("http://", 1)[1].split()[0].rstrip(".,)")
def ready() -> bool:
    try:
        return json.load(urllib.request.urlopen(url + "/readyz")).get("status") == "ready"
    except urllib.error.HTTPError:  # 503 while warming up
        return False
try:
    while not ready() and time.time() - t0 < 120:
        time.sleep(0.2)
    img = sorted(folder.glob("*.png"))[0]
    req = urllib.request.Request(url + "/v1/predict", data=img.read_bytes(), headers={"Content-Type": "image/png"})
    answer = json.load(urllib.request.urlopen(req))
    p = answer["predictions"][0]
    print(f"POST {img.name} -> {p['top'][0]['class']} ({p['top'][0]['prob']:.3f}), decision {p.get('decision')}, "
          f"{answer['timings_ms']['total']:.1f} ms")
finally:
    srv.send_signal(signal.SIGTERM)
    print(f"server stopped (exit {srv.wait(30)})", file=sys.stderr)
PY

step "14/15 one report"
$T report "$RUN"

step "15/15 summary"
$PY - "$RUN" <<'PY'
import csv, json, sys
from transfer.runfolder import RunFolder
run = RunFolder(sys.argv[1])
best = run.trial("best")
acc = best.metrics["test"]["accuracy"]
print(f"best trial {best.name}: test accuracy {acc:.4f} (bar: >= 0.95)")
chance = 1.0 / len(run.class_names)
for t in run.finished_trials():
    ta = t.metrics["test"]["accuracy"]
    print(f"  {t.name:20s} test accuracy {ta:.4f}" + ("   <- near chance" if ta < 2 * chance else ""))
with open(run.heads_dir(best.name) / "heads.csv", newline="") as fh:
    heads = {r["head"]: float(r["test_accuracy"]) for r in csv.DictReader(fh)}
gap = 100 * (heads["network"] - heads["rf"])
print(f"RandomForest head on its features: test accuracy {heads['rf']:.4f} vs the network's "
      f"{heads['network']:.4f} ({-gap:+.1f} points; bar: within 2 points below)")
m = json.loads((run.bundle_dir / "manifest.json").read_text())
cal = m["calibration"]
if cal.get("applied"):
    b, a = cal["test"]["before"], cal["test"]["after"]
    print(f"calibration: temperature {cal['temperature']:.3f} (checked on val folds); test ECE {b['ece']:.4f} -> "
          f"{a['ece']:.4f} (a perfectly calibrated model would show {a['ece_floor']:.4f} on these {a['images']} "
          f"images), NLL {b['nll']:.4f} -> {a['nll']:.4f}, accuracy {b['accuracy']:.4f} -> {a['accuracy']:.4f}")
else:
    print(f"calibration: no temperature applied: {cal.get('reason')}")
unk = json.loads((run.evaluate_dir(best.name) / "unknown.json").read_text())
s = unk["scores"][unk["default"]]
print(f"unknown inputs: the bundle's default score {unk['default']} (chosen at export without test images) "
      f"AUROC {s['auroc']:.3f}, false accepts at its threshold {s['false_accept_rate']:.3f}, "
      f"known accepted {s['known_accept_rate']:.3f}")
sys.exit(0 if acc >= 0.95 and gap <= 2.0 else 1)
PY
