"""Helpers of the model tests: random pixels and the model contract of docs/design.md."""

from __future__ import annotations

import numpy as np

from helpers.inference import forward


def pixels(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels in 0..255, float32 (N, H, W, 3)."""
    return np.random.default_rng(seed).uniform(0, 255, size=(n, h, w, 3)).astype("float32")


def check_contract(model, info, *, size, num_classes):
    """Assert the model contract of docs/design.md on a built or loaded model."""
    import keras

    h, w = size
    assert len(model.inputs) == 1 and len(model.outputs) == 1
    inp = model.get_layer("image")
    assert isinstance(inp, keras.layers.InputLayer)
    assert tuple(model.inputs[0].shape) == (None, h, w, 3)
    assert model.inputs[0].dtype == "float32"
    feats = model.get_layer("features").output
    assert len(feats.shape) == 2 and feats.shape[-1] == info.feature_dim
    assert model.layers[-1].name == "probs"
    assert tuple(model.outputs[0].shape) == (None, num_classes)
    assert model.get_layer("probs").get_config()["activation"] == "softmax"
    assert not any(isinstance(layer, keras.Model) for layer in model.layers), "nested model: not flat"
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    # backbone layers: graph order, no input / preprocessing / head
    body = list(info.backbone_layers)
    assert body == [n for n in names if n in set(body)]
    assert not set(body) & {"image", "features", "head_dropout", "probs", *info.preprocessing_layers}
    # Grad-CAM layer: a backbone layer with a spatial output; after it only pooling /
    # dropout / flatten (no more convolutions or activations)
    assert info.gradcam_layer in body
    assert len(model.get_layer(info.gradcam_layer).output.shape) == 4
    after = body[body.index(info.gradcam_layer) + 1:]
    assert all(type(model.get_layer(n)).__name__ in ("MaxPooling2D", "Dropout", "Flatten") for n in after), after
    probs = forward(model, pixels(2, h, w))
    assert probs.shape == (2, num_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
