"""TensorRT engines from the bundle's ONNX models (TensorRT 10.x and 11.x Python API).

Every engine is built from a strongly typed network: the ONNX model's own types decide
the precision, and no precision builder flag is set (TensorRT 11.0 removed them; 10.12
deprecated weak typing). So each precision has its own source model:

* fp32 from ``model.onnx``, with ``BuilderFlag.TF32`` cleared (on by default);
* fp16 from ``model.fp16.onnx`` (:mod:`transfer.export.fp16`, float32 input/outputs kept);
* int8 from a symmetric QDQ copy of ``model.onnx`` calibrated on training images with
  ONNX Runtime (:func:`prepare_int8_onnx`): explicit quantization (TensorRT 10.1 deprecated
  the implicit ``IInt8*Calibrator`` classes, 11.0 removed them), scales read from the Q/DQ nodes.

Everything that does not need a GPU (profile parsing, calibration batches, the QDQ and
fp16 models, the source-model check, the builder's settings against a recording stand-in
of the API, manifest entries, availability checks) is unit-tested; building an engine
needs an NVIDIA GPU with CUDA, ``tensorrt`` and ``cuda-python`` (``pip install
"transfer[gpu]"``, docs/gpu.md). Without them :func:`require_tensorrt` raises
:class:`~transfer.errors.TensorRTUnavailableError` (exit code 3).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ExportError
from ..fsutil import atomic_path
from ..options import one_of
from ..runtime.devices import device_info, gpu_status, require_tensorrt  # noqa: F401  (re-exported)
from .export_config import PRECISIONS, BatchProfile, parse_batch_profile  # noqa: F401  (re-exported)
from .fp16 import float16_summary
from .quantize import quantize_int8


def check_precision(precision: str) -> str:
    """One of :data:`PRECISIONS` (case-insensitive).

    Raises:
        ConfigError: ``unknown TensorRT precision 'x'; accepted: fp32, fp16, int8`` (option ``trt``).
    """
    return one_of(str(precision), PRECISIONS, "TensorRT precision", option="trt")


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

    info = quantize_int8(fp32_path, out_path, calib_batches, symmetric=True)
    summary = qdq_summary(out_path)
    if summary["quantize"] == 0 or summary["nonzero_zero_points"]:
        raise ExportError(f"the int8 model for TensorRT is not symmetric QDQ: {summary}")
    return {**info, "qdq": summary}


def network_flags(trt) -> tuple[int, bool]:
    """``create_network`` flags for a strongly typed network on TensorRT 10.x and 11.x.

    Returns:
        ``(flags, strongly_typed)``.

    TensorRT 10.x: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (enum value 1; 0 is the
    deprecated ``EXPLICIT_BATCH``) must be set, as NVIDIA's samples do:
    ``builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))``
    (NVIDIA/TensorRT ``samples/python/introductory_parser_samples/onnx_resnet50.py``).
    TensorRT 11.x: networks are always strongly typed; the flag (now value 0) is kept
    "for API compatibility but is ignored" (``include/NvInfer.h`` on the 11.1 release). If a
    later release drops the name, ``0`` is the strongly typed default.
    """
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None:
        return 0, True
    return 1 << int(flag), True


def configure_precision(trt, config, precision: str) -> dict:
    """Set what a strongly typed build needs for ``precision``; never a precision flag.

    Under strong typing the ONNX graph's own types decide the precision: fp32 from
    ``model.onnx``, fp16 from the fp16 model (:func:`transfer.export.fp16.convert_fp16`),
    int8 from the QDQ model (:func:`prepare_int8_onnx`). NVIDIA's explicit-quantization
    guide: "Use explicit quantization with Strong Typing. Precision-control build flags are
    not required and should not be specified." TensorRT 10.12 deprecated ``kFP16`` / ``kINT8``
    ("Superseded by strong typing", ``include/NvInfer.h`` release/10.12); ``BuilderFlag.FP16`` / ``INT8`` / ``BF16`` /
    ``FP8`` / ``INT4`` / ``FP4`` and ``OBEY`` / ``PREFER_PRECISION_CONSTRAINTS`` were removed
    in TensorRT 11.0 (absent from ``python/src/infer/pyCore.cpp`` on release/11.0, present on
    release/10.16; the 10.x -> 11.x Python API migration table), so none is ever set here.

    fp32 clears ``BuilderFlag.TF32``: "Allow (but not require) computations on tensors of
    type DataType::kFLOAT to use TF32 ... Enabled by default" (``include/NvInfer.h``, 10.x
    and 11.x); an fp32 engine must compute in fp32 to be verified at fp32 tolerances. fp16
    and int8 engines keep TensorRT's default for their remaining float32 layers.

    Returns:
        ``{"strongly_typed": True, "tf32": bool}`` -- what the engine was built with.
    """
    flags = getattr(trt, "BuilderFlag", None)
    tf32 = flags is not None and hasattr(flags, "TF32")
    if precision == "fp32" and tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
        tf32 = False
    elif tf32:
        tf32 = bool(config.get_flag(trt.BuilderFlag.TF32)) if hasattr(config, "get_flag") else True
    return {"strongly_typed": True, "tf32": tf32}


def check_source_model(onnx_path: str | os.PathLike, precision: str) -> dict:
    """Refuse an ONNX model whose own types do not make a ``precision`` engine.

    Under strong typing an fp32 graph builds an fp32 engine whatever it is called; this
    check is what keeps a "fp16" engine from being fp32 (or an "int8" one unquantized).

    Returns:
        the model's :func:`transfer.export.fp16.float16_summary` plus ``"qdq"``: :func:`qdq_summary`.

    Raises:
        ExportError: naming what the model holds and how to make the right one.
    """

    qdq = qdq_summary(onnx_path)
    f16 = float16_summary(onnx_path)
    half = f16["float16_initializers"] + f16["casts_to_float16"]
    if precision == "int8" and (qdq["quantize"] == 0 or qdq["nonzero_zero_points"]):
        raise ExportError(f"{onnx_path} is not a symmetric QDQ model ({qdq['quantize']} QuantizeLinear node(s), "
                          f"non-zero zero points: {qdq['nonzero_zero_points'] or 'none'}); int8 engines are built "
                          "from an explicitly quantized model",
                          hint="make one with transfer.export.tensorrt.prepare_int8_onnx")
    if precision == "fp16" and (half == 0 or qdq["quantize"]):
        raise ExportError(f"{onnx_path} holds no float16 weights or casts ({qdq['quantize']} QuantizeLinear "
                          "node(s)); a strongly typed network computes in the model's own types, so an fp16 "
                          "engine is built from the fp16 model",
                          hint="make it with transfer.export.fp16.convert_fp16 (model.fp16.onnx)")
    if precision == "fp32" and (half or qdq["quantize"]):
        raise ExportError(f"{onnx_path} is not an fp32 model ({f16['float16_initializers']} float16 weights, "
                          f"{qdq['quantize']} QuantizeLinear node(s)); fp32 engines are built from model.onnx")
    return {**f16, "qdq": qdq}


def build_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, *, precision: str,
                 profile: BatchProfile, input_hw: tuple[int, int], workspace_mb: int = 2048,
                 timing_cache: str | os.PathLike | None = None) -> dict:
    """Build and serialize a strongly typed engine with the TensorRT Python API (needs a GPU).

    One code path for TensorRT 10.x and 11.x: a strongly typed network from the ONNX parser
    (:func:`network_flags`), one optimization profile over the batch dimension, a workspace
    limit, TF32 cleared for fp32 (:func:`configure_precision`), no precision flags, and an
    optional timing cache that is read and written back. The precision is the source
    model's (:func:`check_source_model`): ``model.onnx`` for fp32, ``model.fp16.onnx``
    (:func:`transfer.export.fp16.convert_fp16`) for fp16, the symmetric QDQ model
    (:func:`prepare_int8_onnx`) for int8.

    Args:
        onnx_path: the source model for ``precision`` (see above).
        out_path: engine file to write (atomically).
        precision: ``fp32|fp16|int8``.
        profile: batch sizes of the optimization profile.
        input_hw: (H, W) of the ``image`` input.
        workspace_mb: builder workspace memory pool limit.
        timing_cache: file of a timing cache to read and update (speeds up rebuilds).

    Returns:
        ``{"precision", "batch", "workspace_mb", "strongly_typed", "tf32", "tensorrt"}``.

    Example::

        build_engine("bundle/model.fp16.onnx", "model.fp16.engine", precision="fp16",
                     profile=parse_batch_profile("1:8:32"), input_hw=(224, 224))

    Raises:
        TensorRTUnavailableError: no GPU / TensorRT.
        ExportError: wrong source model, or the parser / builder failed (their messages included).
    """

    precision = check_precision(precision)
    check_source_model(onnx_path, precision)
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = network_flags(trt)
    network = builder.create_network(flags)
    if network is None:
        raise ExportError("TensorRT could not create a network definition (see the log above)")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errs or 'no parser message'}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != ["image"]:
        raise ExportError(f"{onnx_path} has inputs {inputs}; a bundle model has exactly one, 'image'")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    h, w = input_hw
    prof = builder.create_optimization_profile()
    prof.set_shape("image", *profile.shapes(h, w))  # raises RuntimeError on inconsistent shapes
    if config.add_optimization_profile(prof) < 0:  # -1: "the input is not valid" (NvInfer.h)
        raise ExportError(f"TensorRT refused the optimization profile {profile.as_dict()} for image {h}x{w}")
    done = configure_precision(trt, config, precision)
    cache_obj = None
    if timing_cache is not None:
        tc = Path(timing_cache)
        cache_obj = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        if not config.set_timing_cache(cache_obj, ignore_mismatch=False):
            # a cache from another device or TensorRT version: start a fresh one (written back below)
            cache_obj = config.create_timing_cache(b"")
            config.set_timing_cache(cache_obj, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see the log above)")
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_obj is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(cache_obj.serialize()))
    return {"precision": precision, "batch": profile.as_dict(), "workspace_mb": workspace_mb,
            "strongly_typed": strongly_typed, "tf32": done["tf32"], "tensorrt": str(trt.__version__)}
