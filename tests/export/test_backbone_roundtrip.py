"""Every registered backbone (small input, random weights): Keras -> ONNX -> ONNX Runtime parity,
then the ONNX model as a hashed bundle, reloaded and run by the runtime."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.inference import forward
from transfer.models.registry import get_backbone, list_backbones

SMALL = {"arc2", "arc3", "mobilenet_v2"}


def _params():
    for name in list_backbones():
        marks = () if name in SMALL else (pytest.mark.slow,)
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_roundtrip(name, tmp_path):
    import onnxruntime as ort

    from transfer.models.onnx_convert import export_onnx
    from transfer.models.build import build_classifier, load_model

    spec = get_backbone(name)
    size = max(32, int(spec.min_size))
    model, _ = build_classifier(name, input_shape=(size, size, 3), weights="none", num_classes=4, seed=0)
    model.save(tmp_path / "m.keras")
    model = load_model(tmp_path / "m.keras")  # what export really sees: a reloaded model
    export_onnx(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    ref = forward(model, x)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feats, probs = sess.run(["features", "probs"], {"image": x})
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    assert np.array_equal(probs.argmax(1), ref.argmax(1))

    # reload: the model in a bundle (hashes, manifest) loaded and run by the TensorFlow-free runtime
    from transfer.bundle import load_bundle
    from transfer.bundle_write import new_manifest, write_bundle
    from transfer.errors import TamperedBundleError
    from transfer.export.verify import parity_check
    from transfer.runtime.runners import make_runner

    b = tmp_path / "bundle"
    b.mkdir()
    (tmp_path / "m.onnx").rename(b / "model.onnx")
    write_bundle(b, new_manifest(
        class_names=["a", "b", "c", "d"], input_size=(size, size), feature_dim=int(feats.shape[1]), backbone=name,
        opset=17, source={"run": None, "trial": None},
        models={"onnx-fp32": {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime"}}),
        {"onnx-fp32": parity_check(ref, probs, None, atol=1e-4, min_agreement=1.0, reference_name="Keras")})
    out = make_runner(load_bundle(b), "onnxruntime", "cpu").infer(x)
    f2, p2 = out.features, out.probs
    np.testing.assert_allclose(p2, probs, atol=1e-6)
    assert f2.shape == (3, int(load_bundle(b).manifest["feature_dim"]))
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(TamperedBundleError, match="model.onnx"):
        load_bundle(b)
