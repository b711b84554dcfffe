"""A tiny real ONNX model with the bundle contract, built in code (tests of sessions and engines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_onnx(path: Path, hw=(8, 8), classes: int = 3) -> Path:
    """image (N,H,W,3) -> features = mean over H, W (N,3) -> probs = softmax(features @ W + b).

    Like every bundle model, ``features`` is a graph output that the head also reads.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    wgt = numpy_helper.from_array((rng.normal(size=(3, classes)) / 40).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(classes, np.float32), "B")
    nodes = [helper.make_node("ReduceMean", ["image"], ["features"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["features", "W"], ["logits0"]),
             helper.make_node("Add", ["logits0", "B"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, *hw, 3])],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 3]),
                           helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, classes])],
                          [wgt, bias])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path
