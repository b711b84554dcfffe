# One-off measurement of docs/benchmarks.md section 12 (int8 vs fp32 maps of the identity bundle); paths are those of that run.
"""int8 vs fp32 maps of the identity bench's MobileNetV2 bundle (quantized as export does: quantize_int8)."""
import sys, glob, numpy as np
from pathlib import Path
from transfer.bundle import load_bundle
from transfer.data.stream import decode_batches
from transfer.export.quantize import quantize_int8, calibration_batches
from transfer.export.cam_export import map_agreement
from transfer.runtime.cam import BundleCam
from transfer.runtime.runners import OrtRunner
from transfer.runfolder import RunFolder
b = load_bundle("/tmp/cam/bench/ident/bundle-mobilenet_v2")
rf = RunFolder("/tmp/cam/bench/ident/run")
train, _ = rf.split_paths("train")
calib = [x.astype(np.float32) for x in calibration_batches(train, b.input_size, count=128, recipe=rf.recipe)]
info = quantize_int8(b.paths["model.onnx"], "/tmp/cam/bench/agree_int8.onnx", iter(calib))
print("quantized", {k: info[k] for k in ("format", "activations", "weights")}, flush=True)
val, vy = rf.split_paths("val")
test, ty = rf.split_paths("test")
paths = (list(val) + list(test))[:200]
x = np.concatenate([pb.x for pb in decode_batches(paths, b.input_size, batch=32, recipe=rf.recipe)])
cam = BundleCam.open(b, "onnx-fp32")
outs = {}
for name, path in (("fp32", b.paths["model.onnx"]), ("int8", "/tmp/cam/bench/agree_int8.onnx")):
    r = OrtRunner(path, "cpu").request("feature_map")
    parts = [r.infer(x[i:i + 32]) for i in range(0, len(x), 32)]
    outs[name] = (np.concatenate([p.feature_map for p in parts]), np.concatenate([p.probs for p in parts]))
    print(name, "done", flush=True)
cls = outs["fp32"][1].argmax(1)
a = map_agreement(cam.raw(outs["fp32"][0], cls), cam.raw(outs["int8"][0], cls))
y = np.array((list(vy) + list(ty))[:200])
print(a)
print("top-1 agreement", float((outs["int8"][1].argmax(1) == cls).mean()), "acc fp32", float((cls == y).mean()),
      "acc int8", float((outs["int8"][1].argmax(1) == y).mean()))
