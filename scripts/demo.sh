#!/usr/bin/env bash
# `make demo`: the main job end to end, offline, on the embedded digits data
# (scikit-learn's 1,797 real 8x8 handwritten digits written as PNG class folders).
# Every step is resumable: re-running the demo skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
T=".venv/bin/transfer"
OUT="${DEMO_DIR:-demo}"
RUN="$OUT/runs/digits"
step() { printf '\n==> %s\n' "$*"; }

step "1/12 embedded data -> $OUT/digits"
if [ ! -f "$OUT/digits/.complete" ]; then
    $T data digits "$OUT/digits" --force
    touch "$OUT/digits/.complete"
else
    echo "already there"
fi

step "2/12 freeze sweep: mobilenet_v2 and arc2, trainable 0 / 30 % / 100 % (offline: random weights, so t100 is the random-init trial)"
$T train "$OUT/digits" --backbone mobilenet_v2,arc2 --trainable 0,0.3,1.0 --random-init \
    --weights none --epochs 5 --image-size 32 --out "$RUN"

step "3/12 classical heads on the learned features (network vs RF / SVM / logistic regression)"
$T heads "$RUN" --head rf,svm,logreg

step "4/12 per-class metrics, confusion matrix, sample grids"
$T evaluate "$RUN"

step "5/12 learned features in 2-D"
$T features "$RUN" --plot pca,tsne

step "6/12 Grad-CAM (three methods) with the confidence-drop faithfulness number"
$T gradcam "$RUN" --samples 16 --method all

step "7/12 resolution study (report E's TOTV): test images at 16 / 8 / 4 px"
$T resolution "$RUN" --sizes 16,8,4 --mode totv

step "8/12 export: verified ONNX bundle + int8 + RandomForest head"
$T export "$RUN" --head rf --quantize int8 --force

step "9/12 TensorFlow-free inference over every demo image with the RF head"
$T infer "$RUN/bundle" "$OUT/digits" --recursive --head rf --topk 3 --out "$OUT/predictions.csv"

step "10/12 latency benchmark: ONNX Runtime fp32 / int8 vs Keras"
$T bench "$RUN/bundle" --backends onnxruntime,onnxruntime-int8,keras --batch 1,8,32 --head rf --seconds 1

step "11/12 one report"
$T report "$RUN"

step "12/12 summary"
.venv/bin/python - "$RUN" <<'PY'
import json, sys
from transfer.runfolder import RunFolder
run = RunFolder(sys.argv[1])
best = run.trial("best")
m = best.metrics
acc = m["test"]["accuracy"]
print(f"best trial {best.name}: test accuracy {acc:.4f} (bar: >= 0.95)")
import csv
with open(run.path / "heads" / best.name / "heads.csv", newline="") as fh:
    heads = {r["head"]: float(r["test_accuracy"]) for r in csv.DictReader(fh)}
gap = 100 * (heads["network"] - heads["rf"])
print(f"RandomForest head on its features: test accuracy {heads['rf']:.4f} vs the network's "
      f"{heads['network']:.4f} ({-gap:+.1f} points; bar: within 2 points below)")
sys.exit(0 if acc >= 0.95 and gap <= 2.0 else 1)
PY
