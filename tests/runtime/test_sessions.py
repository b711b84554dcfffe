"""ONNX Runtime sessions: default threads = physical cores less one, documented options for the GPU providers.

Everything here is real ONNX Runtime on the CPU. The GPU providers' options are checked as
the values ``make_session`` hands ONNX Runtime (onnxruntime-gpu and a GPU are not here);
the ``gpu`` test at the end creates real CUDA / TensorRT provider sessions with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers.tiny_models import tiny_onnx
from transfer.errors import ConfigError
from transfer.runtime.sessions import (
    _options_for,
    default_threads,
    make_session,
    ort_trt_cache_dir,
    physical_cores,
    provider_options,
)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def fake_sysfs(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    """``cpu<n>/topology/{physical_package_id,core_id}`` as Linux lays them out."""
    for cpu, (pkg, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_hyperthread_siblings_once(tmp_path):
    # 1 socket, 4 cores, 2 threads each: cpu n and cpu n+4 are siblings (Linux's usual numbering)
    sysfs = fake_sysfs(tmp_path, {c: (0, c % 4) for c in range(8)})
    assert physical_cores(range(8), sysfs=sysfs) == 4
    assert physical_cores([0, 4], sysfs=sysfs) == 1  # a cpuset of two siblings: one core
    assert physical_cores([0, 1, 5], sysfs=sysfs) == 2
    # two sockets reuse core ids: (package, core) pairs are what is unique
    two = fake_sysfs(tmp_path / "two", {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)})
    assert physical_cores(range(4), sysfs=two) == 4
    # no topology (restricted container): every logical CPU counts
    assert physical_cores(range(3), sysfs=tmp_path / "missing") == 3


def test_default_threads_are_the_physical_cores_of_this_process_less_one():
    cpus = sorted(os.sched_getaffinity(0))
    assert default_threads() == max(1, physical_cores(cpus) - 1) <= len(cpus)


def test_make_session_uses_the_default_and_explicit_threads(tiny_model):
    sess, used = make_session(tiny_model, "cpu")
    assert used == CPU
    assert sess.get_session_options().intra_op_num_threads == default_threads()
    sess, _ = make_session(tiny_model, "cpu", threads=1)
    assert sess.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ConfigError) as ei:
        make_session(tiny_model, "cpu", threads=0)
    assert ei.value.option == "threads"
    x = np.zeros((2, 8, 8, 3), np.float32)
    assert sess.run(["probs"], {"image": x})[0].shape == (2, 3)


def test_gpu_provider_options_are_the_documented_ones(tiny_model, tmp_path):
    assert provider_options(CUDA, tiny_model, device_id=1) == {"device_id": "1", "use_tf32": "0"}
    assert provider_options(CUDA, tiny_model, tf32=True)["use_tf32"] == "1"
    trt = provider_options(TRT, tiny_model, device_id=2, fp16=True, cache_dir=tmp_path / "c")
    assert trt == {"device_id": "2", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                   "trt_engine_cache_path": str(tmp_path / "c"), "trt_timing_cache_enable": "True",
                   "trt_timing_cache_path": str(tmp_path / "c")}
    assert (tmp_path / "c").is_dir()
    assert provider_options(TRT, tiny_model, cache_dir=tmp_path / "c")["trt_fp16_enable"] == "False"
    assert provider_options(CPU, tiny_model) == {}
    (tmp_path / "file").write_text("x")  # a file where the cache folder should go
    off = provider_options(TRT, tiny_model, cache_dir=tmp_path / "file" / "c")
    assert off["trt_engine_cache_enable"] == off["trt_timing_cache_enable"] == "False"


def test_engine_cache_is_outside_the_bundle_and_keyed_by_model_content(tmp_path, monkeypatch):
    from transfer.fsutil import sha256_file

    (tmp_path / "bundle").mkdir()
    tiny_model = tiny_onnx(tmp_path / "bundle" / "model.onnx")
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    d = ort_trt_cache_dir(tiny_model)
    assert d == tmp_path / "cache" / "ort-trt" / sha256_file(tiny_model)[:16]
    assert tiny_model.parent not in d.parents  # never inside the (hashed, maybe read-only) bundle
    copy = tmp_path / "elsewhere.onnx"
    copy.write_bytes(tiny_model.read_bytes())
    assert ort_trt_cache_dir(copy) == d  # same model, same engines
    monkeypatch.delenv("TRANSFER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ort_trt_cache_dir(tiny_model).parents[1] == tmp_path / "xdg" / "transfer"


def test_options_follow_the_chosen_providers_and_overrides_merge(tiny_model, tmp_path):
    provs = [TRT, CUDA, CPU]
    opts = _options_for(provs, tiny_model, {"cuda": {"device_id": 1, "gpu_mem_limit": 2 << 30}},
                        device_id=0, fp16=False, cache_dir=tmp_path)
    assert [set(o) for o in opts][2] == set() and opts[1] == {"device_id": "1", "use_tf32": "0",
                                                              "gpu_mem_limit": str(2 << 30)}
    assert opts[0]["device_id"] == "0" and opts[0]["trt_engine_cache_path"] == str(tmp_path)
    assert _options_for([CUDA, CPU], tiny_model, [{"device_id": 3}, {}]) == [{"device_id": "3"}, {}]
    with pytest.raises(ConfigError, match="2 provider option sets for 1 providers"):
        _options_for([CPU], tiny_model, [{}, {}])
    with pytest.raises(ConfigError, match="not among the providers used"):
        _options_for([CPU], tiny_model, {"cuda": {"device_id": 0}})


def test_make_session_passes_options_to_onnx_runtime(tiny_model):
    sess, _ = make_session(tiny_model, "cpu", provider_options={"cpu": {}})
    assert sess.get_provider_options() == {CPU: {}}
    with pytest.raises(ConfigError, match="not among the providers used"):
        make_session(tiny_model, "cpu", provider_options={"tensorrt": {"trt_fp16_enable": True}})


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return tiny_onnx(tmp_path / "model.onnx")


@pytest.mark.gpu
def test_gpu_providers_take_the_options(tiny_model, tmp_path, monkeypatch):
    """On an NVIDIA machine with onnxruntime-gpu: CUDA runs with its options, TensorRT writes its
    engine cache where the options say, and both agree with the CPU."""
    from transfer.runtime.sessions import available_providers

    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    ref = make_session(tiny_model, "cpu")[0].run(["probs"], {"image": x})[0]
    cuda, used = make_session(tiny_model, "cuda")
    assert used == CUDA and cuda.get_provider_options()[CUDA]["use_tf32"] == "0"
    np.testing.assert_allclose(cuda.run(["probs"], {"image": x})[0], ref, atol=1e-5)
    if TRT in available_providers():
        trt, used = make_session(tiny_model, "tensorrt")
        assert used == TRT
        np.testing.assert_allclose(trt.run(["probs"], {"image": x})[0], ref, atol=1e-4)
        assert any(ort_trt_cache_dir(tiny_model).iterdir())
