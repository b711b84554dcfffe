#!/usr/bin/env bash
# scripts/gpu_check.sh: everything about the NVIDIA path that a machine without a GPU cannot
# check, in one command on an NVIDIA machine (budget: under 8 minutes with a warm pip cache).
#
#   scripts/gpu_check.sh [OUT]          # default OUT: gpu-check/
#
# 1. refuses to start without an NVIDIA GPU (exit 3, before installing anything);
# 2. installs transfer with the train, gpu and dev extras into a venv and swaps onnxruntime
#    for onnxruntime-gpu (the README's recipe: both provide the same module);
# 3. runs the `gpu` tests (engines against ONNX fp32 on real images, the runner, the providers);
# 4. trains two tiny runs on the embedded digits (arc2 at 32 px, MobileNetV2 at 224 px;
#    --weights none, or GPU_CHECK_WEIGHTS=FILE for a local weights file);
# 5. exports fp32 / fp16 / int8 TensorRT engines of both (each verified against ONNX fp32 by
#    transfer export) and re-checks every bundle with `transfer verify --deep`;
# 6. runs `transfer bench` with every GPU backend: the native engines, ONNX Runtime's CUDA
#    provider and ONNX Runtime's TensorRT provider;
# 7. writes OUT/gpu_check.json: versions, GPU, each step's status and time, test counts,
#    each engine's verification and bench rows. Exit 0 only when every step passed.
#
# Environment: GPU_CHECK_VENV (default .venv-gpu), GPU_CHECK_SKIP_INSTALL=1 (use that venv as
# it is), GPU_CHECK_WEIGHTS (weights file for MobileNetV2), NVIDIA_SMI (default nvidia-smi),
# PYTHON (default python3). Logs of every step: OUT/logs/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="${1:-gpu-check}"
VENV="${GPU_CHECK_VENV:-.venv-gpu}"
SMI="${NVIDIA_SMI:-nvidia-smi}"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)

fail() {  # message, hint, exit code
    printf 'error: %s\n' "$1" >&2
    [ -n "${2:-}" ] && printf 'hint: %s\n' "$2" >&2
    exit "${3:-1}"
}

# ---- 1. a GPU, before anything is installed or written ---------------------------------------
NO_GPU_HINT="run scripts/gpu_check.sh on a machine with an NVIDIA GPU and its driver; without one, 'make test' covers the rest"
command -v "$SMI" >/dev/null 2>&1 \
    || fail "no NVIDIA GPU: '$SMI' not found (no NVIDIA driver on this machine)" "$NO_GPU_HINT" 3
if ! GPUS=$("$SMI" -L 2>&1); then
    fail "no NVIDIA GPU: '$SMI -L' failed: $(printf '%s' "$GPUS" | head -c 300)" "$NO_GPU_HINT" 3
fi
printf '%s\n' "$GPUS" | grep -q '^GPU ' \
    || fail "no NVIDIA GPU: '$SMI -L' lists none: $(printf '%s' "$GPUS" | head -c 300)" "$NO_GPU_HINT" 3

mkdir -p "$OUT/logs"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
PY="$VENV/bin/python"
T="$VENV/bin/transfer"

step() {  # name, command...: run, log to OUT/logs/name.log, record status and seconds
    local name=$1; shift
    local t0 rc
    t0=$(date +%s)
    printf '\n==> %s: %s\n' "$name" "$*"
    "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/logs/$name.log"
    printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
    [ "$rc" -eq 0 ] || printf '    FAILED (exit %d): see %s\n' "$rc" "$OUT/logs/$name.log"
    return "$rc"
}

# ---- 2. install ----------------------------------------------------------------------------------
install() {
    [ -x "$PY" ] || "$PYTHON" -m venv "$VENV" || return 1
    "$PY" -m pip install --quiet --upgrade pip setuptools wheel || return 1
    "$PY" -m pip install --quiet -e ".[train,gpu,dev]" || return 1
    "$PY" -m pip uninstall --quiet -y onnxruntime onnxruntime-gpu || return 1
    "$PY" -m pip install --quiet onnxruntime-gpu || return 1
    "$PY" -m pip list 2>/dev/null | grep -iE '^(tensorrt|cuda-python|cuda-bindings|onnxruntime|tensorflow|onnxconverter)'
}
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    [ -x "$PY" ] || fail "GPU_CHECK_SKIP_INSTALL=1 but $PY does not exist" "unset it to install into $VENV"
else
    step install install || fail "the install failed (log: $OUT/logs/install.log)"
fi

# the CUDA runtime's view (honours CUDA_VISIBLE_DEVICES), with TensorRT importable
step gpu-status "$PY" -c '
from transfer.runtime.devices import device_info, gpu_status
ok, reason = gpu_status()
print(reason)
raise SystemExit(0 if ok else 3)' \
    || fail "TensorRT / CUDA are not usable here: $(tail -n 1 "$OUT/logs/gpu-status.log")" \
            "see $OUT/logs/gpu-status.log and docs/gpu.md" 3

# ---- 3. the gpu tests ------------------------------------------------------------------------------
step gpu-tests "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests

# ---- 4. two tiny runs ------------------------------------------------------------------------------
[ -f "$OUT/digits/.complete" ] || { step data "$T" data digits "$OUT/digits" --force && touch "$OUT/digits/.complete"; }
step train-arc2 "$T" train "$OUT/digits" --backbone arc2 --trainable 1 --weights none --epochs 5 \
    --image-size 32 --out "$OUT/runs/arc2" --patience 0
step train-mobilenet_v2 "$T" train "$OUT/digits" --backbone mobilenet_v2 --trainable 1 \
    --weights "${GPU_CHECK_WEIGHTS:-none}" --epochs 2 --image-size 224 --out "$OUT/runs/mobilenet_v2" --patience 0

# ---- 5. engines: export (verified against ONNX fp32) and verify --deep --------------------------
for model in arc2 mobilenet_v2; do
    for prec in fp32 fp16 int8; do
        b="$OUT/bundles/$model-$prec"
        extra=()
        [ "$prec" = int8 ] && extra=(--quantize int8 --calib-images 256)
        step "export-$model-$prec" "$T" export "$OUT/runs/$model" --trt "$prec" --batch 1:8:32 \
            --out "$b" --force ${extra[@]+"${extra[@]}"} \
            && step "verify-$model-$prec" "$T" verify "$b" --deep
    done
done

# ---- 6. bench every GPU backend ----------------------------------------------------------------------
for model in arc2 mobilenet_v2; do
    for prec in fp32 fp16 int8; do
        b="$OUT/bundles/$model-$prec"
        [ -f "$b/model.$prec.engine" ] || continue
        backends="tensorrt-$prec"
        [ "$prec" = fp32 ] && backends="onnxruntime,tensorrt-fp32"
        [ "$prec" = int8 ] && backends="onnxruntime-int8,tensorrt-int8"
        step "bench-$model-$prec" "$T" bench "$b" --backends "$backends" --providers cuda \
            --batch 1,8,32 --seconds 1 --out "$OUT/bench/$model-$prec"
    done
    # ONNX Runtime's own TensorRT provider on the fp32 model (engine cache outside the bundle)
    [ -d "$OUT/bundles/$model-fp32" ] && step "bench-$model-ort-trt" "$T" bench "$OUT/bundles/$model-fp32" \
        --backends onnxruntime --providers tensorrt --batch 1,8,32 --seconds 1 --out "$OUT/bench/$model-ort-trt"
done

# ---- 7. one JSON summary ------------------------------------------------------------------------------
"$PY" - "$OUT" "$START" "$SMI" <<'PY'
import json, subprocess, sys, time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

out, start, smi = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]


def version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


summary = {"seconds": int(time.time()) - start, "budget_seconds": 480,
           "versions": {p: version(p) for p in ("transfer", "tensorrt", "cuda-python", "cuda-bindings",
                                                 "onnxruntime-gpu", "onnxruntime", "tensorflow",
                                                 "onnxconverter-common")},
           "steps": steps, "passed": all(s["exit"] == 0 for s in steps)}
try:
    from transfer.runtime.devices import device_info
    summary["device"] = device_info()
    q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    summary["device"]["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
except Exception as exc:  # noqa: BLE001 - the summary is written whatever failed
    summary["device"] = {"error": str(exc)}
xml = out / "gpu-tests.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["gpu_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
engines = {}
for manifest in sorted(out.glob("bundles/*/manifest.json")):
    m = json.loads(manifest.read_text())
    name = manifest.parent.name
    engines[name] = {"valid": m.get("valid"),
                     "models": {k: {kk: v.get(kk) for kk in ("precision", "gpu", "compute_capability", "tensorrt",
                                                             "batch")} for k, v in m.get("models", {}).items()},
                     "verification": m.get("verification", {})}
summary["bundles"] = engines
bench = {}
for f in sorted(out.glob("bench/*/bench.json")):
    res = json.loads(f.read_text())
    bench[f.parent.name] = {"rows": [{k: r.get(k) for k in ("backend", "provider", "batch", "p50_ms", "p99_ms",
                                                            "images_per_s", "top1_agreement_vs_fp32")}
                                     for r in res.get("rows", [])], "skipped": res.get("skipped", {})}
summary["bench"] = bench
summary["within_budget"] = summary["seconds"] <= summary["budget_seconds"]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
failed = [s["step"] for s in steps if s["exit"] != 0]
print(f"\n{out / 'gpu_check.json'}: {len(steps) - len(failed)}/{len(steps)} steps passed in {summary['seconds']} s"
      + (f"; failed: {', '.join(failed)}" if failed else ""))
sys.exit(0 if not failed else 1)
PY
