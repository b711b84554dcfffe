"""TensorRT pieces that need no GPU, and the engine build behind the `gpu` marker."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

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
    paths = []
    for i in range(10):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((20, 30, 3), i * 20, np.uint8)).save(p)
        paths.append(p)
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


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_on_gpu(full_bundle, precision, tmp_path):
    from transfer.export.tensorrt import build_engine

    run, res = full_bundle
    h = res.manifest["input"]["height"]
    calib = [np.random.default_rng(0).uniform(0, 255, (8, h, h, 3)).astype(np.float32)] * 4
    info = build_engine(res.bundle_dir / "model.onnx", tmp_path / "m.engine", precision=precision,
                        profile=BatchProfile(1, 8, 16), input_hw=(h, h), calib_batches=calib)
    assert (tmp_path / "m.engine").stat().st_size > 0 and info["precision"] == precision
