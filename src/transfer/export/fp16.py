"""The fp16 ONNX model a bundle ships next to ``model.onnx`` (and TensorRT fp16 engines are built from).

TensorRT 11 builds every network strongly typed and removed ``BuilderFlag.FP16``: an engine
runs in fp16 only where the ONNX graph itself is fp16 (NVIDIA/TensorRT ``include/NvInfer.h``:
"The network is always strongly typed"; the 10.x -> 11.x migration table: ``BuilderFlag.FP16``
-> "Strong typing"). So the fp16 model is made here, at export, with a maintained converter:
onnxconverter-common's ``float16.convert_float_to_float16(model, keep_io_types=True)``. The
graph's input ``image`` and outputs ``features`` / ``probs`` stay float32 (Cast nodes at the
edges), so every runtime feeds and reads it exactly like ``model.onnx``.

One fix-up is applied before conversion: a graph output that other nodes also consume
(the model contract's ``features``, read by the ``probs`` head) gets its own Identity node.
Without it onnxconverter-common 1.16 rewires the output through a float32 Cast but leaves
the internal consumer on the now-float32 tensor, and the model fails to load ("Type parameter
(T) of Optype (MatMul) bound to different types (tensor(float) and tensor(float16))", seen
on every bundle model here).

The converted model is verified like the other precisions (:func:`verify_fp16`): run by ONNX
Runtime on the verification images and compared with ``model.onnx`` (accuracy drop limit,
finite outputs, float32 I/O). ONNX Runtime's CPU provider computes some fp16 operators in
float32 internally (its Softmax output sums to 1 within 6e-7 even at 1,000 classes), so
that check bounds what the conversion itself changes (weights rounded to fp16, clamped
values); a GPU's fp16 arithmetic is checked where it runs, on the engine built from this
model (``transfer export --trt fp16`` verifies it against ONNX fp32).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .._lazy import require
from ..errors import DependencyMissingError, ExportError
from ..fsutil import atomic_path
from ..runtime.runners import OrtRunner
from .verify import accuracy_check, run_all

#: model contract names (docs/design.md)
INPUT, OUTPUTS = "image", ("features", "probs")
_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16


def _onnx():
    return require("onnx", purpose="the fp16 ONNX model")


def _converter():
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise DependencyMissingError(f"onnxconverter-common is not installed (needed for the fp16 ONNX model): {exc}",
                                     hint='pip install "transfer[train]"') from exc
    return float16


def _split_consumed_outputs(model) -> list[str]:
    """Give every graph output that nodes also read its own Identity producer (in place).

    Returns the names of the outputs that were split.
    """
    helper = _onnx().helper
    outputs = {o.name for o in model.graph.output}
    consumed = sorted(outputs & {i for n in model.graph.node for i in n.input})
    for name in consumed:
        internal = f"{name}__fp16_internal"
        for node in model.graph.node:
            for k, o in enumerate(node.output):
                if o == name:
                    node.output[k] = internal
            for k, i in enumerate(node.input):
                if i == name:
                    node.input[k] = internal
        model.graph.node.append(helper.make_node("Identity", [internal], [name], name=f"{name}__output"))
    return consumed


def _dtype_name(onnx, elem_type: int) -> str:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except Exception:  # noqa: BLE001 - undefined / non-numpy element types
        return f"onnx type {elem_type}"


def float16_summary(path: str | os.PathLike) -> dict:
    """What precision an ONNX model really computes in (no session is built).

    Returns:
        ``{"float16_initializers": n, "float32_initializers": n, "casts_to_float16": n,
        "io": {name: "float32" | "float16" | ...}}``.
    """
    onnx = _onnx()
    m = onnx.load(str(path), load_external_data=False)
    inits = [i.data_type for i in m.graph.initializer]
    casts = sum(1 for n in m.graph.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i == _FLOAT16 for a in n.attribute))
    io = {v.name: _dtype_name(onnx, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)}
    return {"float16_initializers": inits.count(_FLOAT16), "float32_initializers": inits.count(_FLOAT),
            "casts_to_float16": casts, "io": io}


def convert_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike, *,
                 op_block_list: Sequence[str] | None = None) -> dict:
    """Write the fp16 copy of a bundle's ``model.onnx`` (float32 input and outputs kept).

    Args:
        fp32_path: the verified fp32 ``model.onnx``.
        out_path: where to write ``model.fp16.onnx`` (atomically).
        op_block_list: op types to keep in float32 (default: onnxconverter-common's list,
            e.g. ``Resize``, ``TopK``, ``Range``).

    Returns:
        ``{"converter": "onnxconverter-common 1.16.0", "keep_io_types": True,
        "split_outputs": [...], "clamped_values": n, **float16_summary}``; ``clamped_values``
        counts the weights outside fp16's range that the converter clamped (its warnings).

    Raises:
        ExportError: the converted graph is not valid ONNX, has no float16 weights, or its
        input/outputs are not float32.
    """
    onnx = _onnx()
    float16 = _converter()
    import onnxconverter_common

    model = onnx.load(str(fp32_path))
    split = _split_consumed_outputs(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m16 = float16.convert_float_to_float16(model, keep_io_types=True,
                                               op_block_list=list(op_block_list) if op_block_list else None)
    try:
        onnx.checker.check_model(m16)
    except Exception as exc:  # noqa: BLE001 - onnx raises its own ValidationError types
        raise ExportError(f"the fp16 conversion of {fp32_path} is not a valid ONNX model: {exc}") from exc

    with atomic_path(out_path) as tmp:
        onnx.save(m16, str(tmp))
    summary = float16_summary(out_path)
    io = summary["io"]
    bad_io = {k: v for k, v in io.items() if (k == INPUT or k in OUTPUTS) and v != "float32"}
    if summary["float16_initializers"] == 0 or bad_io or INPUT not in io:
        Path(out_path).unlink(missing_ok=True)
        raise ExportError(f"the fp16 conversion of {fp32_path} is not usable: {summary['float16_initializers']} "
                          f"float16 weights, non-float32 input/outputs {bad_io or 'none'}")
    clamped = sum(1 for w in caught if "truncated" in str(w.message))
    return {"converter": f"onnxconverter-common {onnxconverter_common.__version__}", "keep_io_types": True,
            "split_outputs": split, "clamped_values": clamped, **summary}


def verify_fp16(fp32_path: str | os.PathLike, fp16_path: str | os.PathLike, x: np.ndarray,
                labels: Sequence[int], *, max_accuracy_drop: float = 0.01, batch: int = 64) -> dict:
    """Verify the fp16 model against fp32 on real images, with ONNX Runtime on the CPU.

    The same check as int8 (:func:`transfer.export.verify.accuracy_check`: accuracy drop
    <= ``max_accuracy_drop``, finite probabilities), plus the features' largest difference
    relative to their scale (recorded, so a reader sees how far fp16 moved them).

    Args:
        fp32_path / fp16_path: the two models (same inputs and outputs).
        x: (N, H, W, 3) float32 verification images, RGB 0..255.
        labels: their true classes.

    Returns:
        the accuracy-check dict (``passed``, ``accuracy_drop``, ``top1_agreement``,
        ``max_abs_diff`` ...) plus ``features_max_rel_diff``.

    Example::

        v = verify_fp16(b / "model.onnx", b / "model.fp16.onnx", x, y)
        v["passed"], v["accuracy_drop"]
    """

    fp32, fp16 = run_all([OrtRunner(fp32_path, "cpu"), OrtRunner(fp16_path, "cpu", name="onnxruntime-fp16")], x, batch)
    f32, p32, f16, p16 = fp32.features, fp32.probs, fp16.features, fp16.probs
    if f16.dtype != np.float32 or p16.dtype != np.float32:
        raise ExportError(f"{fp16_path} returns {f16.dtype}/{p16.dtype}, not float32 outputs")
    v = accuracy_check(p32, p16, labels, max_accuracy_drop=max_accuracy_drop, reference_name="onnx-fp32")
    scale = float(np.max(np.abs(f32))) or 1.0
    v["features_max_rel_diff"] = float(np.max(np.abs(f32.astype(np.float64) - f16)) / scale)
    v["passed"] = bool(v["passed"] and np.all(np.isfinite(f16)))
    return v
