"""TensorRT runner: buffers, padding, splitting, error checks, GPU identity; real engines behind `gpu`.

The device-free tests run the real :class:`transfer.runtime.runners.TrtRunner` against the
recording stand-ins of ``tensorrt`` and cuda-python's runtime in ``nvidia_fakes.py``:
TensorRT cannot be installed on the machines this project is tested on (no GPU, NVIDIA's
package index unreachable), so these check the runner's choices against the documented
API -- allocation once at the profile's maximum, a small last batch padded to the profile
minimum and sliced back, a large batch split, every failing return code raised as an
error naming the call. The tests that need no stand-in use the real cuda-python runtime
(installed here; it answers without a GPU). Real engines: the ``gpu`` tests at the end.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from helpers.nvidia_fakes import (
    CudaErr,
    FakeCudart,
    fake_tensorrt,
    install,
    reference_map,
    reference_outputs,
)
from transfer.bundle import Bundle
from transfer.errors import (
    BundleError,
    ConfigError,
    TensorRTUnavailableError,
    TransferError,
)
from transfer.runtime import devices
from transfer.runtime.devices import CudaError
from transfer.runtime.trt_runner import TrtRunner

H = W = 8


def _fp(out):
    """``(features, probs)`` of a runner's outputs."""
    return out.features, out.probs


def engine_bundle(tmp_path, *, gpu="NVIDIA A10", cc="8.6", trt="11.1.0", batch=(1, 4, 8)) -> Bundle:
    (tmp_path / "model.fp16.engine").write_bytes(b"serialized engine")
    entry = {"file": "model.fp16.engine", "precision": "fp16", "runtime": "tensorrt",
             "batch": dict(zip(("min", "opt", "max"), batch)), "gpu": gpu, "compute_capability": cc, "tensorrt": trt}
    manifest = {"input": {"height": H, "width": W}, "models": {"trt-fp16": entry},
                "files": {"model.fp16.engine": {"sha256": "-", "bytes": 17}}}
    return Bundle(tmp_path, manifest)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, H, W, 3)).astype(np.float32)


@pytest.fixture
def cudart(monkeypatch):
    c = FakeCudart()
    install(monkeypatch, cudart=c)
    return c


def runner(monkeypatch, tmp_path, cudart, **trt_kw) -> tuple[TrtRunner, object]:
    trt = fake_tensorrt(**trt_kw)
    install(monkeypatch, trt=trt)
    return TrtRunner(engine_bundle(tmp_path, batch=trt_kw.get("profile", (1, 4, 8))), "trt-fp16"), trt


def test_buffers_are_allocated_once_at_the_profile_maximum(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart, profile=(1, 4, 8), features=5, classes=3)
    assert not r.active and cudart.count("cudaMalloc") == 0  # nothing on the GPU before activation
    with r:
        sizes = sorted(args[0] for name, args in cudart.calls if name == "cudaMalloc")
        assert sizes == sorted([8 * H * W * 3 * 4, 8 * 5 * 4, 8 * 3 * 4])
        for n in (1, 8, 3, 8, 5):
            r.infer(images(n))
        assert cudart.count("cudaMalloc") == 3 and cudart.count("cudaFree") == 0
        assert len(cudart.streams) == 1
    assert cudart.count("cudaFree") == 3 and not cudart.buffers and not cudart.streams and not r.active


def test_outputs_equal_the_per_image_reference(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart, profile=(1, 4, 8), features=5, classes=3)
    x = images(6)
    with r:
        f, p = _fp(r.infer(x))
    ref_f, ref_p = reference_outputs(x, 5, 3)
    np.testing.assert_allclose(f, ref_f, rtol=1e-6)
    np.testing.assert_allclose(p, ref_p, rtol=1e-6)
    assert f.dtype == p.dtype == np.float32 and f.flags.owndata  # copies, not views of the reused buffers


def test_small_last_batch_is_padded_to_the_profile_minimum_and_sliced_back(monkeypatch, tmp_path, cudart):
    r, trt = runner(monkeypatch, tmp_path, cudart, profile=(8, 8, 8))  # --batch 8 -> an 8:8:8 profile
    x = images(11)
    with r:
        f, p = _fp(r.infer(x[:8]))
        f3, p3 = _fp(r.infer(x[8:]))  # the last batch of a folder: 3 images
    assert f3.shape[0] == p3.shape[0] == 3
    ref_f, ref_p = reference_outputs(x[8:], f3.shape[1], p3.shape[1])
    np.testing.assert_allclose(f3, ref_f, rtol=1e-6)
    np.testing.assert_allclose(p3, ref_p, rtol=1e-6)
    h2d = [args for name, args in cudart.calls if name == "cudaMemcpyAsync"
           and args[3] == cudart.cudaMemcpyKind.cudaMemcpyHostToDevice]
    assert [a[2] for a in h2d] == [8 * H * W * 3 * 4] * 2  # both calls ran the engine at batch 8


def test_large_batch_is_split_at_the_profile_maximum(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart, profile=(2, 4, 4))
    x = images(9)  # 4 + 4 + 1 (the 1 padded to 2)
    f, p = _fp(r.infer(x))  # no `with`: activated on first use
    assert r.active
    ref_f, ref_p = reference_outputs(x, f.shape[1], p.shape[1])
    np.testing.assert_allclose(f, ref_f, rtol=1e-6)
    np.testing.assert_allclose(p, ref_p, rtol=1e-6)
    assert cudart.count("cudaStreamSynchronize") == 3
    assert r.batch_range == (2, 4)
    r.close()
    assert not cudart.buffers and not r.active
    r.close()  # idempotent
    f2, _ = _fp(r.infer(x[:2]))  # re-activates
    np.testing.assert_allclose(f2, ref_f[:2], rtol=1e-6)
    r.close()


def test_an_engine_with_maps_runs_and_returns_the_feature_map_only_when_asked(monkeypatch, tmp_path, cudart):
    """An engine built from a bundle exported with maps has a fourth output, feature_map: TensorRT
    runs it only with an address for every output, so its buffer is always allocated; it is
    copied back only after request("feature_map") (infer --cam on the TensorRT backend)."""
    r, _ = runner(monkeypatch, tmp_path, cudart, profile=(2, 4, 4), features=5, classes=3, feature_map=(2, 2, 3))
    x = images(5)  # 4 + 1 (the 1 padded to 2)
    with r:
        assert cudart.count("cudaMalloc") == 4
        out = r.infer(x)
        assert out.feature_map is None
        d2h = sum(1 for name, args in cudart.calls if name == "cudaMemcpyAsync"
                  and args[3] == cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        assert d2h == 2 * 2  # features and probs of two engine calls
        r.request("feature_map")
        out = r.infer(x)
        assert r.infer(x[:0]).feature_map.shape == (0, 2, 2, 3)
    np.testing.assert_allclose(out.feature_map, reference_map(x, (2, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(out.probs, reference_outputs(x, 5, 3)[1], rtol=1e-6)


def test_an_engine_with_an_unknown_output_is_refused(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart, extra_output="logits")
    with pytest.raises(BundleError, match=r"\['logits'\] are not part of a bundle model"):
        r.activate()
    assert cudart.count("cudaMalloc") == 0


def test_empty_and_wrong_shaped_input(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart, features=6, classes=3)
    with r:
        f, p = _fp(r.infer(np.zeros((0, H, W, 3), np.float32)))
        assert f.shape == (0, 6) and p.shape == (0, 3)
        with pytest.raises(ConfigError, match=r"\(N, 8, 8, 3\)"):
            r.infer(np.zeros((2, H, W + 1, 3), np.float32))


@pytest.mark.parametrize("call", ["cudaStreamCreate", "cudaMalloc", "cudaMemcpyAsync", "cudaStreamSynchronize"])
def test_every_failing_cuda_call_raises_naming_the_call(monkeypatch, tmp_path, cudart, call):
    r, _ = runner(monkeypatch, tmp_path, cudart)
    cudart.fail[call] = CudaErr.cudaErrorMemoryAllocation
    with pytest.raises(CudaError) as ei:
        r.infer(images(2))
    assert call in ei.value.message and "out of memory" in ei.value.message and isinstance(ei.value, TransferError)
    cudart.fail.clear()
    r.close()
    assert not cudart.buffers and not cudart.streams  # a failed activation released what it had


@pytest.mark.parametrize("call", ["set_tensor_address", "set_input_shape", "execute_async_v3"])
def test_every_failing_tensorrt_call_raises_naming_the_call(monkeypatch, tmp_path, cudart, call):
    r, _ = runner(monkeypatch, tmp_path, cudart, context_fail=call)
    with pytest.raises(CudaError, match=call):
        r.infer(images(2))
    r.close()


def test_failing_free_is_reported_after_releasing_the_rest(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart)
    r.activate()
    cudart.fail["cudaFree"] = CudaErr.cudaErrorInvalidValue
    with pytest.raises(CudaError, match="cudaFree.*invalid argument"):
        r.close()
    assert cudart.count("cudaFree") == 3 and cudart.count("cudaStreamDestroy") == 1 and not r.active


def test_an_error_inside_with_is_not_hidden_by_release(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart)
    with pytest.raises(ValueError, match="user code"):
        with r:
            cudart.fail["cudaFree"] = CudaErr.cudaErrorInvalidValue
            raise ValueError("user code")


def test_unloadable_engine_is_a_bundle_error(monkeypatch, tmp_path, cudart):
    r, _ = runner(monkeypatch, tmp_path, cudart, engine_ok=False)
    with pytest.raises(BundleError, match="could not load"):
        r.activate()
    assert cudart.count("cudaMalloc") == 0


def test_gpu_identity_comes_from_the_cuda_runtime_of_the_current_device(monkeypatch, tmp_path):
    # two visible devices; the process's current one (what CUDA_VISIBLE_DEVICES and
    # cudaSetDevice select) is device 1, an sm_89 card: the engine built for 8.6 is refused
    c = FakeCudart(devices=[("NVIDIA A10", 8, 6), ("NVIDIA L4", 8, 9)], current=1)
    install(monkeypatch, trt=fake_tensorrt(), cudart=c)
    assert devices.device_info() == {"gpu": "NVIDIA L4", "compute_capability": "8.9", "tensorrt": "11.1.0"}
    with pytest.raises(BundleError, match="compute capability 8.6 vs this GPU's 8.9"):
        TrtRunner(engine_bundle(tmp_path), "trt-fp16")
    assert devices.device_info(0)["gpu"] == "NVIDIA A10"
    TrtRunner(engine_bundle(tmp_path), "trt-fp16", device=0)  # the matching device is accepted
    with pytest.raises(TensorRTUnavailableError, match="device 2 does not exist; 2 device"):
        devices.device_info(2)


def test_no_visible_device_is_unavailable_with_cuda_text(monkeypatch):
    c = FakeCudart()
    c.fail["cudaGetDeviceCount"] = CudaErr.cudaErrorNoDevice
    install(monkeypatch, trt=fake_tensorrt(), cudart=c)
    ok, reason = devices.gpu_status()
    assert not ok and "cudaGetDeviceCount failed: no CUDA-capable device is detected" in reason
    with pytest.raises(TensorRTUnavailableError) as ei:
        devices.require_tensorrt()
    assert ei.value.exit_code == 3 and "NVIDIA GPU with CUDA" in ei.value.message


def test_a_gpu_without_the_tensorrt_package_says_so(monkeypatch):
    install(monkeypatch, cudart=FakeCudart())
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, reason = devices.gpu_status()
    assert not ok and "tensorrt package is not installed" in reason
    with pytest.raises(TensorRTUnavailableError, match="needs the tensorrt package") as ei:
        devices.require_tensorrt()
    assert ei.value.exit_code == 3


def test_legacy_cuda_python_without_a_driver_is_unavailable_not_a_crash(monkeypatch):
    """cuda-python 12.5's ``cuda.cudart`` raises instead of returning an error code when libcuda
    is missing (seen with the real 12.5.0 wheel: "Failed to dlopen libcuda.so.1")."""

    class NoDriver(FakeCudart):
        def cudaGetDeviceCount(self):
            raise RuntimeError("Failed to dlopen libcuda.so.1")

    install(monkeypatch, trt=fake_tensorrt(), cudart=NoDriver())
    ok, reason = devices.gpu_status()
    assert not ok and reason == "the CUDA runtime cannot start: Failed to dlopen libcuda.so.1"


# ------------------------------------------------------------- the real cuda-python, no GPU


def test_real_cuda_python_imports_and_reports_no_gpu_with_cudas_words():
    """cuda-python installs without a GPU; its runtime then answers every call with an error code."""
    pytest.importorskip("cuda.bindings.runtime")
    cudart = devices.import_cudart()
    assert cudart.__name__ == "cuda.bindings.runtime"
    if devices.gpu_status()[0]:
        pytest.skip("a GPU is present")
    with pytest.raises(TensorRTUnavailableError) as ei:
        devices.cuda_device()
    msg = ei.value.message
    assert "cudaGetDeviceCount failed:" in msg and "(cudaError " in msg and ei.value.exit_code == 3
    with pytest.raises(CudaError, match=r"cudaMalloc failed: .+ \(cudaError \d+\)"):
        devices.cuda_call(cudart, "cudaMalloc", cudart.cudaMalloc(1024))


def test_cuda_python_12_layout_is_the_fallback(monkeypatch):
    """cuda-python < 12.6 has only ``cuda.cudart``; 13.x only ``cuda.bindings.runtime``."""
    import builtins
    import types

    legacy = types.ModuleType("cuda.cudart")
    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cuda.bindings":
            raise ImportError("No module named 'cuda.bindings'")
        if name == "cuda" and fromlist and "cudart" in fromlist:
            return types.SimpleNamespace(cudart=legacy)
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert devices.import_cudart() is legacy

    def no_cuda(name, globals=None, locals=None, fromlist=(), level=0):
        if name.startswith("cuda"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(TensorRTUnavailableError, match="cuda-python is not installed") as ei:
        devices.import_cudart()
    assert ei.value.exit_code == 3 and "transfer[gpu]" in ei.value.hint


# ------------------------------------------------------------- real engines (NVIDIA GPU)


@pytest.mark.gpu
def test_real_engine_pads_splits_and_releases(rt_bundle, tmp_path):
    """On a GPU: an fp32 engine with a 4:8:8 profile runs 3 images (padded), 19 (split) and
    agrees with ONNX fp32 on the run's real validation images; close() releases, run() re-activates."""
    import shutil

    from transfer.bundle import Bundle, read_manifest
    from transfer.bundle_write import finalize_manifest
    from transfer.export.tensorrt import (
        BatchProfile,
        build_engine,
        device_info,
        engine_entry,
    )
    from transfer.export.verify import verification_images
    from transfer.runfolder import RunFolder
    from transfer.runtime.runners import make_runner

    run, bundle_dir = rt_bundle
    out = tmp_path / "b"
    shutil.copytree(bundle_dir, out)
    manifest = read_manifest(out)
    run = RunFolder(run)
    t = run.trial(manifest["source"]["trial"])
    profile = BatchProfile(4, 8, 8)
    build_engine(out / "model.onnx", out / "model.fp32.engine", precision="fp32", profile=profile,
                 input_hw=t.image_size)
    manifest["models"]["trt-fp32"] = engine_entry("model.fp32.engine", "fp32", profile, device_info())
    b = Bundle(out, finalize_manifest(out, manifest))
    x, _, _ = verification_images(run, t.image_size, 19)
    x = x[:19]
    ref = _fp(make_runner(b, "onnxruntime", "cpu").infer(x))
    r = TrtRunner(b, "trt-fp32")
    assert r.batch_range == (4, 8)
    f, p = _fp(r.infer(x))                      # 8 + 8 + 3 (the 3 padded to 4)
    f3, p3 = _fp(r.infer(x[:3]))                # below the profile minimum
    np.testing.assert_allclose(p, ref[1], atol=1e-4)
    np.testing.assert_allclose(f, ref[0], rtol=1e-3, atol=1e-3 * float(np.abs(ref[0]).max()))
    np.testing.assert_allclose(p3, p[:3], atol=1e-5)
    r.close()
    assert not r.active
    np.testing.assert_allclose(_fp(r.infer(x[:5]))[1], p[:5], atol=1e-5)
    r.close()


@pytest.mark.gpu
def test_real_runner_reports_this_gpu():
    info = devices.device_info()
    assert info["gpu"] and info["gpu"] != "unknown" and info["compute_capability"].count(".") == 1
