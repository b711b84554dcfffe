"""TensorRT engines from the bundle's ONNX model (TensorRT 10 Python API).

Everything that does not need a GPU (profile parsing, calibration batches, manifest
entries, availability checks) is plain Python and unit-tested; building an engine needs
an NVIDIA GPU with CUDA and the ``tensorrt`` package (``pip install "transfer[gpu]"``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ConfigError, TensorRTUnavailableError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch sizes: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def shapes(self, h: int, w: int, c: int = 3) -> tuple[tuple, tuple, tuple]:
        return (self.min, h, w, c), (self.opt, h, w, c), (self.max, h, w, c)

    def as_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def parse_batch_profile(text: str) -> BatchProfile:
    """``"1:8:32"`` -> BatchProfile(1, 8, 32); ``"8"`` -> (8, 8, 8).

    Raises:
        ConfigError: not 1 or 3 positive integers with min <= opt <= max.

    Example:
        >>> parse_batch_profile("1:8:32")
        BatchProfile(min=1, opt=8, max=32)
    """
    parts = [p.strip() for p in str(text).split(":")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or min(nums) < 1 or not nums[0] <= nums[1] <= nums[2]:
        raise ConfigError(f"invalid --batch {text!r}; accepted: MIN:OPT:MAX positive integers with "
                          "MIN <= OPT <= MAX (e.g. 1:8:32), or one batch size")
    return BatchProfile(*nums)


def check_precision(precision: str) -> str:
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ConfigError(f"invalid --trt {precision!r}; accepted: {', '.join(PRECISIONS)}")
    return p


def gpu_status() -> tuple[bool, str]:
    """(available, reason): is there an NVIDIA GPU with CUDA and an importable tensorrt?"""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False, "nvidia-smi not found (no NVIDIA driver on this machine)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi failed: {exc}"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return False, f"nvidia-smi lists no GPU: {(out.stderr or out.stdout).strip()[:200]}"
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt package is not installed ({exc}); pip install \"transfer[gpu]\""
    return True, out.stdout.strip().splitlines()[0]


def require_tensorrt():
    """Import tensorrt or raise TensorRTUnavailableError (exit code 3) saying why."""
    ok, reason = gpu_status()
    if not ok:
        raise TensorRTUnavailableError(
            f"TensorRT needs an NVIDIA GPU with CUDA; none was found: {reason}",
            hint="the ONNX part of the bundle was written and verified; build engines on the GPU machine "
                 "with `transfer export RUN --trt fp16` there",
        )
    import tensorrt as trt

    return trt


def device_info() -> dict:
    """GPU name and compute capability of device 0 plus the TensorRT version (GPU only)."""
    trt = require_tensorrt()
    name, cc = "unknown", "unknown"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        first = q.stdout.strip().splitlines()[0]
        name, cc = [s.strip() for s in first.split(",")[:2]]
    except Exception:
        pass
    return {"gpu": name, "compute_capability": cc, "tensorrt": trt.__version__}


def engine_entry(file: str, precision: str, profile: BatchProfile, device: dict) -> dict:
    """The manifest's ``models`` entry of an engine (what the runtime checks before loading)."""
    return {"file": file, "precision": precision, "runtime": "tensorrt", "inputs": {"image": "image"},
            "outputs": {"features": "features", "probs": "probs"}, "batch": profile.as_dict(), **device}


def _make_calibrator(trt, batches: Iterable[np.ndarray], batch_size: int, cache_file: Path):
    """An IInt8EntropyCalibrator2 fed with host batches (padded to the calibration batch size)."""
    from cuda import cudart  # cuda-python, part of the gpu extra

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self._it = iter(batches)
            self._dev = None

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            b = next(self._it, None)
            if b is None:
                return None
            if len(b) < batch_size:
                b = np.concatenate([b, np.repeat(b[-1:], batch_size - len(b), axis=0)])
            b = np.ascontiguousarray(b, dtype=np.float32)
            if self._dev is None:
                err, self._dev = cudart.cudaMalloc(b.nbytes)
            cudart.cudaMemcpy(self._dev, b.ctypes.data, b.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
            return [int(self._dev)]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return Calibrator()


def build_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, *, precision: str,
                 profile: BatchProfile, input_hw: tuple[int, int], workspace_mb: int = 2048,
                 calib_batches: Iterable[np.ndarray] | None = None, timing_cache: str | os.PathLike | None = None) -> dict:
    """Build and serialize an engine with the TensorRT Python API (needs a GPU).

    Explicit batch network from the ONNX parser, one optimization profile over the batch
    dimension, workspace limit, fp16 / int8 flags (int8 calibrated with ``calib_batches``),
    optional timing cache reuse.

    Raises:
        TensorRTUnavailableError: no GPU / TensorRT.
        ExportError: the parser or the builder failed (their messages included).
    """
    from ..errors import ExportError

    precision = check_precision(precision)
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    h, w = input_hw
    prof = builder.create_optimization_profile()
    prof.set_shape("image", *profile.shapes(h, w))
    config.add_optimization_profile(prof)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    cache_obj = None
    if timing_cache is not None:
        tc = Path(timing_cache)
        cache_obj = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        config.set_timing_cache(cache_obj, ignore_mismatch=False)
    if precision == "int8":
        if calib_batches is None:
            raise ExportError("int8 engines need calibration images")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(prof)
        config.int8_calibrator = _make_calibrator(trt, calib_batches, profile.opt,
                                                  Path(str(out_path) + ".calib.cache"))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see the log above)")
    Path(out_path).write_bytes(bytes(serialized))
    if cache_obj is not None:
        Path(timing_cache).write_bytes(bytes(cache_obj.serialize()))
    return {"precision": precision, "batch": profile.as_dict(), "workspace_mb": workspace_mb}
