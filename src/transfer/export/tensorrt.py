"""TensorRT engines from the bundle's ONNX model (TensorRT 10 Python API).

fp32 / fp16 engines are built from ``model.onnx``; int8 engines use explicit quantization
(TensorRT 10.1 deprecated the implicit ``IInt8*Calibrator`` classes): a symmetric QDQ
copy of the model calibrated on training images with ONNX Runtime
(:func:`prepare_int8_onnx`), whose scales TensorRT reads from the Q/DQ nodes.

Everything that does not need a GPU (profile parsing, calibration batches, the QDQ
model, manifest entries, availability checks) is plain Python and unit-tested; building
an engine needs an NVIDIA GPU with CUDA and the ``tensorrt`` package
(``pip install "transfer[gpu]"``). Without them :func:`require_tensorrt` raises
:class:`~transfer.errors.TensorRTUnavailableError` (exit code 3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ConfigError
from ..runtime.devices import device_info, gpu_status, require_tensorrt  # noqa: F401  (re-exported)

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

    Example::

        parse_batch_profile("1:8:32")
        # BatchProfile(min=1, opt=8, max=32)
    """
    parts = [p.strip() for p in str(text).split(":")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or min(nums) < 1 or not nums[0] <= nums[1] <= nums[2]:
        raise ConfigError(f"invalid batch profile {text!r}; accepted: MIN:OPT:MAX positive integers with "
                          "MIN <= OPT <= MAX (e.g. 1:8:32), or one batch size", option="batch")
    return BatchProfile(*nums)


def check_precision(precision: str) -> str:
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ConfigError(f"invalid TensorRT precision {precision!r}; accepted: {', '.join(PRECISIONS)}",
                          option="trt")
    return p


def engine_entry(file: str, precision: str, profile: BatchProfile, device: dict) -> dict:
    """The manifest's ``models`` entry of an engine (what the runtime checks before loading)."""
    return {"file": file, "precision": precision, "runtime": "tensorrt", "inputs": {"image": "image"},
            "outputs": {"features": "features", "probs": "probs"}, "batch": profile.as_dict(), **device}


def qdq_summary(onnx_path: str | os.PathLike) -> dict:
    """Count QuantizeLinear / DequantizeLinear nodes and non-zero zero points of an ONNX model.

    TensorRT builds int8 engines from explicitly quantized (QDQ) models whose zero points
    are all 0 (symmetric int8); this checks a model before it is handed to the builder.

    Returns:
        ``{"quantize": n, "dequantize": n, "nonzero_zero_points": [initializer names]}``.

    Example::

        qdq_summary("model.trt-int8.onnx")["nonzero_zero_points"]
        # []
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    inits = {i.name: i for i in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    nonzero = []
    for n in q + dq:
        if len(n.input) > 2 and n.input[2] in inits:
            if np.any(numpy_helper.to_array(inits[n.input[2]]) != 0):
                nonzero.append(n.input[2])
    return {"quantize": len(q), "dequantize": len(dq), "nonzero_zero_points": sorted(set(nonzero))}


def prepare_int8_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                      calib_batches: Iterable[np.ndarray]) -> dict:
    """The explicitly quantized model a TensorRT int8 engine is built from (no GPU needed).

    TensorRT 10.1 deprecated its implicit-quantization calibrators
    (``IInt8EntropyCalibrator2`` ...) in favour of explicit quantization: a QDQ ONNX model
    with symmetric int8 scales. This calibrates one with ONNX Runtime on ``calib_batches``
    (training images) and checks that every zero point is 0.

    Returns:
        the quantization record of :func:`transfer.export.quantize.quantize_int8` plus
        ``"qdq"``: :func:`qdq_summary`.

    Raises:
        ExportError: quantization failed or produced an asymmetric / unquantized graph.
    """
    from ..errors import ExportError
    from .quantize import quantize_int8

    info = quantize_int8(fp32_path, out_path, calib_batches, symmetric=True)
    summary = qdq_summary(out_path)
    if summary["quantize"] == 0 or summary["nonzero_zero_points"]:
        raise ExportError(f"the int8 model for TensorRT is not symmetric QDQ: {summary}")
    return {**info, "qdq": summary}


def build_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, *, precision: str,
                 profile: BatchProfile, input_hw: tuple[int, int], workspace_mb: int = 2048,
                 timing_cache: str | os.PathLike | None = None) -> dict:
    """Build and serialize an engine with the TensorRT Python API (needs a GPU).

    Explicit batch network from the ONNX parser, one optimization profile over the batch
    dimension, workspace limit, fp16 flag, optional timing cache reuse. For ``int8`` the
    ONNX model must be explicitly quantized (:func:`prepare_int8_onnx`): TensorRT reads
    the scales from its Q/DQ nodes (INT8 + FP16 flags so the unquantized layers may run
    in fp16).

    Args:
        onnx_path: ``model.onnx`` (fp32 / fp16) or the symmetric QDQ model (int8).
        out_path: engine file to write.
        precision: ``fp32|fp16|int8``.
        profile: batch sizes of the optimization profile.
        input_hw: (H, W) of the ``image`` input.
        workspace_mb: builder workspace memory pool limit.
        timing_cache: file of a timing cache to read and update (speeds up rebuilds).

    Returns:
        ``{"precision", "batch", "workspace_mb"}``.

    Example::

        build_engine("bundle/model.onnx", "model.fp16.engine", precision="fp16",
                     profile=parse_batch_profile("1:8:32"), input_hw=(224, 224))

    Raises:
        TensorRTUnavailableError: no GPU / TensorRT.
        ExportError: the parser or the builder failed (their messages included).
    """
    from ..errors import ExportError

    precision = check_precision(precision)
    trt = require_tensorrt()
    if precision == "int8" and qdq_summary(onnx_path)["quantize"] == 0:
        raise ExportError(f"{onnx_path} has no QuantizeLinear node; int8 engines are built from an explicitly "
                          "quantized model", hint="make one with transfer.export.tensorrt.prepare_int8_onnx")
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
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the Q/DQ nodes (explicit quantization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see the log above)")
    from ..fsutil import atomic_path

    with atomic_path(out_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_obj is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(cache_obj.serialize()))
    return {"precision": precision, "batch": profile.as_dict(), "workspace_mb": workspace_mb}
