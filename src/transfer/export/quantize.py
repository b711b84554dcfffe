"""Static int8 quantization of the ONNX model for CPUs, calibrated on training images."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .._lazy import require
from ..data.stream import decode_batches
from ..errors import ExportError
from ..progress import ProgressLike, as_progress


def calibration_batches(paths: Sequence[str | os.PathLike], size: tuple[int, int], *, count: int = 512,
                        batch: int = 32, seed: int = 0, progress: ProgressLike = None,
                        recipe: dict | None = None) -> Iterator[np.ndarray]:
    """Yield float32 (n, H, W, 3) batches of up to ``count`` images (a seeded sample of ``paths``).

    Files that cannot be decoded are skipped (they were reported when the dataset was
    indexed); the others are decoded by :func:`transfer.data.stream.decode_batches`, like
    every image of the package, and packed into full batches. ``progress`` shows a bar.

    Raises:
        ExportError: no image at all could be read.

    Example::

        next(calibration_batches(paths, (32, 32), count=8, batch=4)).shape    # (4, 32, 32, 3)
    """
    if count <= 0 or batch <= 0:
        raise ExportError(f"calibration needs a positive image count and batch (got {count}, {batch})")
    paths = list(paths)
    order = np.random.default_rng(seed).permutation(len(paths))[: min(count, len(paths))]
    buf = np.zeros((0, size[0], size[1], 3), np.float32)
    used = 0
    with as_progress(progress).bar(len(order), "calibration images", unit="img") as bar:
        for pb in decode_batches([paths[i] for i in order], size, batch=batch, recipe=recipe):
            bar.update(len(pb.items))
            buf = np.concatenate([buf, pb.x])
            while len(buf) >= batch:
                used += batch
                yield buf[:batch]
                buf = buf[batch:]
        if len(buf):
            used += len(buf)
            yield buf
    if used == 0:
        raise ExportError(f"none of the {len(order)} calibration images could be read")


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, batches, *,
                  input_name: str = "image", per_channel: bool = True, symmetric: bool = False,
                  float_layers: int = 0) -> dict:
    """Static QDQ int8 quantization with ONNX Runtime.

    Runs ORT's recommended pre-processing (shape inference + graph optimization), then
    ``quantize_static`` with MinMax calibration over ``batches``.

    Args:
        fp32_path / out_path: the fp32 model and the int8 model to write.
        batches: iterable of float32 (n, H, W, 3) calibration batches (see
            :func:`calibration_batches`).
        per_channel: per-channel weight scales.
        symmetric: ``False`` (CPU default): u8 asymmetric activations, s8 weights.
            ``True``: s8 symmetric activations and weights (all zero points 0), the
            explicit-quantization form TensorRT 10 builds int8 engines from (its implicit
            calibrators are deprecated since 10.1).
        float_layers: keep the first ``float_layers`` compute layers (Conv, MatMul, Gemm, in
            graph order) in float: the first layers are the most sensitive to quantization.

    Returns:
        ``{"format": "QDQ", "activations", "weights", "symmetric", "per_channel", "calibration",
        "calibration_images"}``.

    Raises:
        ExportError: quantization failed, or no calibration batch was given.

    Example::

        quantize_int8("model.onnx", "model.int8.onnx", calibration_batches(paths, (32, 32)))
    """
    q = require("onnxruntime.quantization", purpose="int8 quantization")
    batches = iter(batches)
    seen = {"images": 0}

    class _Reader(q.CalibrationDataReader):
        def get_next(self):
            b = next(batches, None)
            if b is None:
                return None
            seen["images"] += len(b)
            return {input_name: b}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception:  # pre-processing is an optimization; fall back to the plain model
            src = Path(fp32_path)
        excluded = _first_compute_nodes(src, float_layers)
        try:
            q.quantize_static(
                str(src), str(out_path), _Reader(),
                quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                activation_type=q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                calibrate_method=q.CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else None,
                nodes_to_exclude=excluded,
            )
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    if seen["images"] == 0:
        raise ExportError("int8 quantization got no calibration image", hint="check the run's splits/train.csv")
    return {"format": "QDQ", "activations": "int8" if symmetric else "uint8", "weights": "int8",
            "symmetric": symmetric, "per_channel": per_channel,
            "calibration": "minmax", "calibration_images": seen["images"], "float_nodes": excluded}


def _first_compute_nodes(model_path: Path, n: int) -> list[str]:
    """Names of the first ``n`` Conv / MatMul / Gemm nodes of a model, in graph order."""
    if n <= 0:
        return []
    onnx = require("onnx", purpose="int8 quantization")
    g = onnx.load(str(model_path), load_external_data=False).graph
    return [node.name for node in g.node if node.name and node.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose")][:n]
