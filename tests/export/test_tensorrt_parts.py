"""TensorRT pieces that need no GPU, and the engine build behind the `gpu` marker.

The builder tests run the real :func:`transfer.export.tensorrt.build_engine` against a
recording stand-in of the ``tensorrt`` module (tests/runtime/nvidia_fakes.py), in a 10.x
and an 11.x flavour that follow NVIDIA/TensorRT's ``pyCore.cpp`` of each release. That is
only because TensorRT cannot be installed where these tests run (no GPU, NVIDIA's package
index unreachable): they check the build path's choices against the documented API --
strong typing, no precision flags (absent in 11.x), TF32 cleared for fp32, the profile's
shapes, the workspace limit, the timing cache. The ONNX models, the fp16 conversion and
the QDQ model are real and run in ONNX Runtime; real engines are built by the `gpu` tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.image_files import solid_pngs
from helpers.nvidia_fakes import FakeCudart, fake_tensorrt, install
from helpers.tiny_models import tiny_onnx
from transfer.errors import ConfigError, ExportError, TensorRTUnavailableError
from transfer.export.quantize import calibration_batches
from transfer.export.tensorrt import (
    BatchProfile,
    engine_entry,
    gpu_status,
    parse_batch_profile,
    require_tensorrt,
)


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
    from transfer.export.compare import compare_outputs
    from transfer.export.tensorrt import prepare_int8_onnx, qdq_summary
    from transfer.runfolder import RunFolder

    run, res = full_bundle
    run = RunFolder(run)
    size = tuple(run.trial(res.manifest["source"]["trial"]).image_size)
    train, _ = run.split_paths("train")
    info = prepare_int8_onnx(res.bundle_dir / "model.onnx", tmp_path / "q.onnx",
                             calibration_batches(train, size, count=64, batch=8))
    assert info["symmetric"] and info["activations"] == "int8" and info["calibration_images"] == min(64, len(train))
    assert info["qdq"]["quantize"] > 0 and info["qdq"]["nonzero_zero_points"] == []
    # the CPU int8 model of the bundle is asymmetric (uint8 activations): not what TensorRT takes
    assert qdq_summary(res.bundle_dir / "model.int8.onnx")["nonzero_zero_points"]
    assert qdq_summary(res.bundle_dir / "model.onnx")["quantize"] == 0
    paths, labels = run.split_paths("val")
    x = np.stack([load_image(p, size) for p in paths]).astype(np.float32)
    ref = ort.InferenceSession(str(res.bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    v = compare_outputs(ref.run(["probs"], {"image": x})[0], q.run(["probs"], {"image": x})[0], labels)
    assert v["accuracy_drop"] <= 0.05 and v["top1_agreement"] >= 0.9, v


# ---------------------------------------------------------------- tiny real ONNX models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """fp32, fp16 and symmetric-QDQ versions of the tiny model (all real, all run in ONNX Runtime);
    made once for the module (the tests read them and write their engines in their own folders)."""
    tmp_path = tmp_path_factory.mktemp("trt-models")
    from transfer.export.fp16 import convert_fp16
    from transfer.export.tensorrt import prepare_int8_onnx

    fp32 = tiny_onnx(tmp_path / "model.onnx")
    convert_fp16(fp32, tmp_path / "model.fp16.onnx")
    calib = [np.random.default_rng(i).uniform(0, 255, (8, 8, 8, 3)).astype(np.float32) for i in range(4)]
    prepare_int8_onnx(fp32, tmp_path / "model.trt-int8.onnx", calib)
    return {"fp32": fp32, "fp16": tmp_path / "model.fp16.onnx", "int8": tmp_path / "model.trt-int8.onnx"}


# ---------------------------------------------------------------- fp16 model (real, ONNX Runtime)


def test_fp16_model_keeps_float32_io_and_tracks_fp32(models):
    import onnxruntime as ort

    from transfer.export.fp16 import float16_summary

    s = float16_summary(models["fp16"])
    assert s["io"] == {"image": "float32", "features": "float32", "probs": "float32"}
    assert s["float16_initializers"] >= 2 and float16_summary(models["fp32"])["float16_initializers"] == 0
    x = np.random.default_rng(1).uniform(0, 255, (5, 8, 8, 3)).astype(np.float32)
    ref = ort.InferenceSession(str(models["fp32"]), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    got = ort.InferenceSession(str(models["fp16"]), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert got[0].dtype == got[1].dtype == np.float32
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-3)
    np.testing.assert_allclose(got[1], ref[1], atol=2e-3)


def test_without_the_output_split_the_converter_breaks_bundle_models(tmp_path):
    """Why convert_fp16 splits ``features``: onnxconverter-common alone makes a model ORT cannot load."""
    import onnx
    import onnxruntime as ort
    from onnxconverter_common import float16

    m = float16.convert_float_to_float16(onnx.load(str(tiny_onnx(tmp_path / "m.onnx"))), keep_io_types=True)
    onnx.save(m, str(tmp_path / "naive.onnx"))
    with pytest.raises(Exception, match="bound to different types"):
        ort.InferenceSession(str(tmp_path / "naive.onnx"), providers=["CPUExecutionProvider"])


def test_fp16_model_of_a_trained_bundle_is_verified_on_real_images(full_bundle, tmp_path):
    from transfer.export.fp16 import convert_fp16, verify_fp16
    from transfer.export.verify import verification_images
    from transfer.runfolder import RunFolder

    run, res = full_bundle
    info = convert_fp16(res.bundle_dir / "model.onnx", tmp_path / "model.fp16.onnx")
    assert info["keep_io_types"] and info["split_outputs"] == ["features"] and info["float16_initializers"] > 0
    assert info["converter"].startswith("onnxconverter-common ")
    run = RunFolder(run)
    t = run.trial(res.manifest["source"]["trial"])
    x, y, _ = verification_images(run, t.image_size, 256)
    v = verify_fp16(res.bundle_dir / "model.onnx", tmp_path / "model.fp16.onnx", x, y)
    assert v["passed"] and v["accuracy_drop"] <= 0.01 and v["top1_agreement"] >= 0.98, v
    assert 0 < v["features_max_rel_diff"] < 0.01 and v["images"] == len(x)


# ---------------------------------------------------------------- the builder against the documented API


@pytest.fixture
def gpu(monkeypatch):
    """A visible CUDA device (cuda-python stand-in); each test installs its own tensorrt flavour."""
    install(monkeypatch, cudart=FakeCudart())


def build(monkeypatch, tmp_path, models, precision, version="11.1.0", **kw):
    from transfer.export.tensorrt import build_engine

    trt = fake_tensorrt(version, **{k: v for k, v in kw.items() if k in ("parse_ok", "build_ok", "profile_index",
                                                                          "timing_cache_ok")})
    install(monkeypatch, trt=trt)
    info = build_engine(models[precision], tmp_path / f"m.{precision}.engine", precision=precision,
                        profile=kw.get("profile", BatchProfile(1, 8, 32)), input_hw=(8, 8),
                        workspace_mb=kw.get("workspace_mb", 2048), timing_cache=kw.get("timing_cache"))
    return info, trt


@pytest.mark.parametrize("version", ["10.16.1", "11.1.0"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_builds_are_strongly_typed_without_precision_flags(gpu, monkeypatch, tmp_path, models, version, precision):
    info, trt = build(monkeypatch, tmp_path, models, precision, version)
    calls = [c[0] for c in trt.record]
    # 10.x: STRONGLY_TYPED is enum value 1 (0 is the deprecated EXPLICIT_BATCH); 11.x: 0, always on
    assert ("create_network", 1 << (1 if version.startswith("10") else 0)) in trt.record
    assert "set_flag" not in calls  # no FP16 / INT8 / any precision flag, on either version
    flags_at_build = next(c[1] for c in trt.record if c[0] == "build_serialized_network")
    tf32 = trt.BuilderFlag.TF32
    if precision == "fp32":
        assert ("clear_flag", tf32) in trt.record and tf32 not in flags_at_build and info["tf32"] is False
    else:
        assert "clear_flag" not in calls and tf32 in flags_at_build and info["tf32"] is True
    assert info["strongly_typed"] and info["tensorrt"] == version and info["precision"] == precision
    assert (tmp_path / f"m.{precision}.engine").read_bytes() == b"ENGINE"
    if version.startswith("11"):
        assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")


def test_profile_shapes_workspace_and_timing_cache(gpu, monkeypatch, tmp_path, models):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    info, trt = build(monkeypatch, tmp_path, models, "fp16", profile=BatchProfile(2, 8, 16), workspace_mb=512,
                      timing_cache=cache)
    assert ("set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 512 << 20) in trt.record
    assert ("add_optimization_profile", {"image": ((2, 8, 8, 3), (8, 8, 8, 3), (16, 8, 8, 3))}) in trt.record
    assert ("create_timing_cache", b"old") in trt.record and ("set_timing_cache", False) in trt.record
    assert cache.read_bytes() == b"timing-cache:old"  # the builder's updated cache is written back
    assert info["batch"] == {"min": 2, "opt": 8, "max": 16} and info["workspace_mb"] == 512


def test_a_mismatched_timing_cache_is_replaced_by_a_fresh_one(gpu, monkeypatch, tmp_path, models):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    _, trt = build(monkeypatch, tmp_path, models, "fp32", timing_cache=cache, timing_cache_ok=False)
    assert ("create_timing_cache", b"") in trt.record
    assert cache.read_bytes() == b"timing-cache:"


@pytest.mark.parametrize("kw, match", [({"parse_ok": False}, "could not parse .*Conv"),
                                       ({"profile_index": -1}, "refused the optimization profile"),
                                       ({"build_ok": False}, "failed to build a fp32 engine")])
def test_builder_failures_are_export_errors_and_write_nothing(gpu, monkeypatch, tmp_path, models, kw, match):
    with pytest.raises(ExportError, match=match):
        build(monkeypatch, tmp_path, models, "fp32", **kw)
    assert not (tmp_path / "m.fp32.engine").exists()


@pytest.mark.parametrize("precision, source", [("fp16", "fp32"), ("int8", "fp32"), ("fp32", "fp16"),
                                               ("fp32", "int8"), ("fp16", "int8"), ("int8", "fp16")])
def test_an_engine_is_built_only_from_the_model_of_its_precision(gpu, monkeypatch, tmp_path, models, precision,
                                                                 source):
    """Under strong typing the model's types are the engine's: an fp32 model cannot become an 'fp16' engine."""
    from transfer.export.tensorrt import build_engine

    trt = fake_tensorrt()
    install(monkeypatch, trt=trt)
    with pytest.raises(ExportError, match="model"):
        build_engine(models[source], tmp_path / "m.engine", precision=precision, profile=BatchProfile(1, 1, 1),
                     input_hw=(8, 8))
    assert not trt.record  # refused before TensorRT was asked anything


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_onnx_fp32_on_real_images(full_bundle, tmp_path, precision):
    """Build each precision's engine on this GPU from its own source model and compare it with
    ONNX fp32 on the run's real validation images: fp32 within fp32 limits (TF32 cleared),
    fp16 / int8 within max |dp|, top-1 agreement and accuracy-drop limits."""
    import shutil

    from transfer.bundle import Bundle, read_manifest
    from transfer.bundle_write import finalize_manifest
    from transfer.export.compare import compare_outputs
    from transfer.export.fp16 import convert_fp16
    from transfer.export.tensorrt import build_engine, device_info, prepare_int8_onnx
    from transfer.export.verify import verification_images
    from transfer.runfolder import RunFolder
    from transfer.runtime.runners import make_runner
    from transfer.runtime.trt_runner import TrtRunner

    run, res = full_bundle
    out = tmp_path / "b"
    shutil.copytree(res.bundle_dir, out)
    manifest = read_manifest(out)
    run = RunFolder(run)
    t = run.trial(manifest["source"]["trial"])
    src = out / "model.onnx"
    if precision == "fp16":
        src = tmp_path / "m16.onnx"
        convert_fp16(out / "model.onnx", src)
    elif precision == "int8":
        src = tmp_path / "q.onnx"
        train, _ = run.split_paths("train")
        prepare_int8_onnx(out / "model.onnx", src, calibration_batches(train, t.image_size, count=128))
    profile = BatchProfile(1, 8, 16)
    info = build_engine(src, out / f"model.{precision}.engine", precision=precision, profile=profile,
                        input_hw=t.image_size, timing_cache=tmp_path / "tc.cache")
    assert info["strongly_typed"] and (precision != "fp32" or info["tf32"] is False)
    assert (tmp_path / "tc.cache").stat().st_size > 0
    manifest["models"][f"trt-{precision}"] = engine_entry(f"model.{precision}.engine", precision, profile,
                                                          device_info())
    b = Bundle(out, finalize_manifest(out, manifest))
    x, y, _ = verification_images(run, t.image_size, 256)
    ref = make_runner(b, "onnxruntime", "cpu").infer(x)
    ref_f, ref_p = ref.features, ref.probs
    with TrtRunner(b, f"trt-{precision}") as r:
        out = r.infer(x)
    f, p = out.features, out.probs
    v = compare_outputs(ref_p, p, y)
    if precision == "fp32":
        assert v["top1_agreement"] >= 0.999 and v["max_abs_diff"] <= 1e-4, v
        np.testing.assert_allclose(f, ref_f, rtol=1e-3, atol=1e-3 * float(np.abs(ref_f).max()))
    else:
        # limits from the same models on ONNX Runtime CPU (this run's kind of model, 256 validation
        # images): fp16 max |dp| 0.0, int8 QDQ max |dp| 0.0125, both top-1 agreement 1.0, drop 0
        max_dp, min_agree = {"fp16": (0.05, 0.99), "int8": (0.1, 0.95)}[precision]
        assert v["max_abs_diff"] <= max_dp and v["top1_agreement"] >= min_agree, v
        assert v["accuracy_drop"] <= 0.02, v
        assert np.all(np.isfinite(f)) and np.all(np.isfinite(p))


@pytest.mark.gpu
def test_full_export_with_trt_fp16_is_verified(run_copy, tmp_path):
    from transfer.bundle import load_bundle
    from transfer.export.api import export_bundle

    res = export_bundle(run_copy, out=tmp_path / "b", trt="fp16", batch="1:4:8", progress=None)
    b = load_bundle(res.bundle_dir)
    e = b.model_entry("trt-fp16")
    assert e["gpu"] and e["compute_capability"] and e["tensorrt"] and e["batch"] == {"min": 1, "opt": 4, "max": 8}
    assert b.manifest["verification"]["trt-fp16"]["passed"]



# ---------------------------------------------------------------- scripts/gpu_check.sh without a GPU

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def fake_smi(tmp_path: Path, output: str, code: int) -> Path:
    p = tmp_path / "nvidia-smi"
    p.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {code}\n")
    p.chmod(0o755)
    return p


def run_script(tmp_path, smi, **env):
    import os
    import subprocess

    full = {**os.environ, "NVIDIA_SMI": str(smi), "GPU_CHECK_VENV": str(tmp_path / "venv"), **env}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env=full, timeout=120)


def test_gpu_check_script_is_valid_bash():
    import subprocess

    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert SCRIPT.stat().st_mode & 0o111  # executable


@pytest.mark.parametrize("smi, why", [(None, "not found"),
                                      (("No devices were found", 6), "-L' failed: No devices were found"),
                                      (("", 0), "lists none")])
def test_gpu_check_stops_before_installing_anything_without_a_gpu(tmp_path, smi, why):
    path = tmp_path / "missing-nvidia-smi" if smi is None else fake_smi(tmp_path, *smi)
    r = run_script(tmp_path, path)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: no NVIDIA GPU") and why in r.stderr and "hint: " in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "venv").exists()


def test_gpu_check_asks_the_cuda_runtime_when_nvidia_smi_lists_a_gpu(tmp_path):
    """nvidia-smi may list a GPU that this process cannot use (CUDA_VISIBLE_DEVICES, a driver
    too old for the runtime): the script's own CUDA check stops it, with CUDA's reason."""
    import os
    import sys

    if gpu_status()[0]:  # pragma: no cover - a usable GPU would start the whole check
        pytest.skip("a GPU is usable here")
    smi = fake_smi(tmp_path, "GPU 0: NVIDIA A10 (UUID: GPU-0)", 0)
    venv = Path(sys.executable).parent.parent
    src = str(Path(__file__).resolve().parents[2] / "src")
    r = run_script(tmp_path, smi, GPU_CHECK_VENV=str(venv), GPU_CHECK_SKIP_INSTALL="1",
                   PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "error: TensorRT / CUDA are not usable here: " in r.stderr
    # CUDA's own reason where cuda-python is installed, else the missing package
    assert "cudaGetDeviceCount failed" in r.stderr or "cuda-python is not installed" in r.stderr
    assert (tmp_path / "out" / "logs" / "gpu-status.log").is_file()
    step = (tmp_path / "out" / "steps.jsonl").read_text()
    assert '"step": "gpu-status", "exit": 3' in step
