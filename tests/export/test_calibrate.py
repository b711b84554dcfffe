"""export/calibrate.py: temperature inside the ONNX graph, unknown-input thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from transfer import calibration as C
from transfer.errors import ExportError


def _tiny_onnx(path, softmax=True):
    """features (N,4) -> MatMul -> [Softmax] -> probs, built with onnx.helper."""
    import onnx
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 2, (4, 3)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["image"], ["features"]),
             helper.make_node("MatMul", ["features", "w"], ["logits"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    else:  # probabilities some other way: exp / sum
        nodes += [helper.make_node("Softmax", ["logits"], ["p0"], axis=-1), helper.make_node("Identity", ["p0"], ["probs"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"image": x})[0]


@pytest.mark.parametrize("softmax", [True, False])
def test_temperature_in_the_graph_equals_the_numpy_formula(tmp_path, softmax):
    from transfer.export.calibrate import temperature_onnx

    _tiny_onnx(tmp_path / "m.onnx", softmax=softmax)
    x = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    before = _run(tmp_path / "m.onnx", x)
    rec = temperature_onnx(tmp_path / "m.onnx", tmp_path / "c.onnx", 2.5)
    assert rec == {"temperature": 2.5, "method": "logits" if softmax else "log-probs"}
    after = _run(tmp_path / "c.onnx", x)
    np.testing.assert_allclose(after, C.apply_temperature(before, 2.5), atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all()
    with pytest.raises(ExportError):
        temperature_onnx(tmp_path / "m.onnx", tmp_path / "d.onnx", 0.0)


def test_fit_unknown_thresholds_keep_the_target_share():
    from transfer.export.calibrate import fit_unknown

    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, (3, 6))
    ytr, yva = np.repeat(np.arange(3), 60), np.repeat(np.arange(3), 40)
    ftr, fva = means[ytr] + rng.normal(size=(180, 6)), means[yva] + rng.normal(size=(120, 6))
    pva = np.eye(3)[yva] * 0.8 + 0.2 / 3
    rec, arrays = fit_unknown(ftr, ytr, fva, pva, 3, accept=0.9)
    assert rec["default"] == "mahalanobis" and set(rec["scores"]) == {"mahalanobis", "msp"}
    assert rec["scores"]["mahalanobis"]["val_acceptance"] == pytest.approx(0.9, abs=0.01)
    assert arrays["means"].shape == (3, 6) and arrays["whiten"].shape == (6, 6)
    with pytest.raises(ExportError, match="classes without images"):
        fit_unknown(ftr[ytr < 2], ytr[ytr < 2], fva, pva, 3)
