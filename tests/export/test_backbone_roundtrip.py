"""Every registered backbone (small input, random weights): Keras -> ONNX -> ONNX Runtime parity."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.models.registry import get_backbone, list_backbones

SMALL = {"arc2", "arc3", "mobilenet_v2"}


def _params():
    for name in list_backbones():
        marks = () if name in SMALL else (pytest.mark.slow,)
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_roundtrip(name, tmp_path):
    import onnxruntime as ort

    from transfer.export.onnx import export_onnx
    from transfer.models.build import build_classifier, load_model

    spec = get_backbone(name)
    size = max(32, int(spec.min_size))
    model, _ = build_classifier(name, input_shape=(size, size, 3), weights="none", num_classes=4, seed=0)
    model.save(tmp_path / "m.keras")
    model = load_model(tmp_path / "m.keras")  # what export really sees: a reloaded model
    export_onnx(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    ref = model.predict(x, verbose=0)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feats, probs = sess.run(["features", "probs"], {"image": x})
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    assert np.array_equal(probs.argmax(1), ref.argmax(1))
