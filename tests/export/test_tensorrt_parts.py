"""TensorRT pieces that need no GPU, and the engine build behind the `gpu` marker."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_files import solid_pngs  # noqa: E402

from transfer.errors import ConfigError, ExportError, TensorRTUnavailableError
from transfer.export.quantize import calibration_batches
from transfer.export.tensorrt import BatchProfile, engine_entry, gpu_status, parse_batch_profile, require_tensorrt


def test_batch_profile_parsing():
    assert parse_batch_profile("1:8:32") == BatchProfile(1, 8, 32)
    assert parse_batch_profile("4") == BatchProfile(4, 4, 4)
    assert parse_batch_profile("1:8:32").shapes(224, 224) == ((1, 224, 224, 3), (8, 224, 224, 3), (32, 224, 224, 3))
    for bad in ("0:1:2", "8:4:2", "a:b:c", "1:2", "", "-1"):
        with pytest.raises(ConfigError):
            parse_batch_profile(bad)


def test_calibration_batches_skip_bad_files_and_respect_count(tmp_path):
    paths = solid_pngs(tmp_path, [i * 20 for i in range(10)], (20, 30), name="{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    paths.append(tmp_path / "bad.png")
    batches = list(calibration_batches(paths, (8, 8), count=11, batch=4))
    assert [b.shape for b in batches] == [(4, 8, 8, 3), (4, 8, 8, 3), (2, 8, 8, 3)]
    assert all(b.dtype == np.float32 and b.max() <= 255 for b in batches)
    assert sum(len(b) for b in calibration_batches(paths, (8, 8), count=5, batch=4)) == 5
    with pytest.raises(ExportError, match="could be read"):
        list(calibration_batches([tmp_path / "bad.png"], (8, 8), count=4))


def test_engine_manifest_entry():
    e = engine_entry("model.fp16.engine", "fp16", BatchProfile(1, 8, 32),
                     {"gpu": "NVIDIA A10", "compute_capability": "8.6", "tensorrt": "10.3"})
    assert e["runtime"] == "tensorrt" and e["batch"] == {"min": 1, "opt": 8, "max": 32}
    assert e["gpu"] == "NVIDIA A10" and e["inputs"] == {"image": "image"}


def test_no_gpu_is_a_distinct_clear_error():
    ok, reason = gpu_status()
    if ok:
        pytest.skip("a GPU is present")
    with pytest.raises(TensorRTUnavailableError) as ei:
        require_tensorrt()
    assert ei.value.exit_code == 3 and "NVIDIA GPU with CUDA" in str(ei.value.message)


def test_int8_model_for_tensorrt_is_symmetric_qdq_and_keeps_accuracy(full_bundle, tmp_path):
    """The explicit-quantization model TensorRT int8 engines are built from, checked on CPU."""
    import onnxruntime as ort

    from transfer.data.image import load_image
    from transfer.export.tensorrt import prepare_int8_onnx, qdq_summary
    from transfer.runfolder import RunFolder
    from transfer.export.compare import compare_outputs

    run, res = full_bundle
    rf = RunFolder(run)
    size = tuple(rf.trial(res.manifest["source"]["trial"]).image_size)
    train, _ = rf.split_paths("train")
    info = prepare_int8_onnx(res.bundle_dir / "model.onnx", tmp_path / "q.onnx",
                             calibration_batches(train, size, count=64, batch=8))
    assert info["symmetric"] and info["activations"] == "int8" and info["calibration_images"] == min(64, len(train))
    assert info["qdq"]["quantize"] > 0 and info["qdq"]["nonzero_zero_points"] == []
    # the CPU int8 model of the bundle is asymmetric (uint8 activations): not what TensorRT takes
    assert qdq_summary(res.bundle_dir / "model.int8.onnx")["nonzero_zero_points"]
    assert qdq_summary(res.bundle_dir / "model.onnx")["quantize"] == 0
    paths, labels = rf.split_paths("val")
    x = np.stack([load_image(p, size) for p in paths]).astype(np.float32)
    ref = ort.InferenceSession(str(res.bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    v = compare_outputs(ref.run(["probs"], {"image": x})[0], q.run(["probs"], {"image": x})[0], labels)
    assert v["accuracy_drop"] <= 0.05 and v["top1_agreement"] >= 0.9, v


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_on_gpu(full_bundle, precision, tmp_path):
    from transfer.export.tensorrt import build_engine, prepare_int8_onnx

    run, res = full_bundle
    h = res.manifest["input"]["height"]
    src = res.bundle_dir / "model.onnx"
    if precision == "int8":
        calib = [np.random.default_rng(0).uniform(0, 255, (8, h, h, 3)).astype(np.float32)] * 4
        prepare_int8_onnx(src, tmp_path / "q.onnx", calib)
        src = tmp_path / "q.onnx"
    info = build_engine(src, tmp_path / "m.engine", precision=precision,
                        profile=BatchProfile(1, 8, 16), input_hw=(h, h), timing_cache=tmp_path / "tc.cache")
    assert (tmp_path / "m.engine").stat().st_size > 0 and info["precision"] == precision
    assert (tmp_path / "tc.cache").stat().st_size > 0


@pytest.mark.gpu
def test_full_export_with_trt_fp16_is_verified(run_copy, tmp_path):
    from transfer.bundle import load_bundle
    from transfer.export.api import export_bundle

    res = export_bundle(run_copy, out=tmp_path / "b", trt="fp16", batch="1:4:8", progress=None)
    b = load_bundle(res.bundle_dir)
    e = b.model_entry("trt-fp16")
    assert e["gpu"] and e["compute_capability"] and e["tensorrt"] and e["batch"] == {"min": 1, "opt": 4, "max": 8}
    assert b.manifest["verification"]["trt-fp16"]["passed"]

