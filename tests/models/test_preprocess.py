"""In-graph preprocessing equals keras.applications.<module>.preprocess_input, survives
.keras save / load and tf2onnx conversion."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.inference import forward
from model_helpers import pixels
from transfer.fsutil import atomic_path
from transfer.models.build import build_classifier, load_model, preprocessing_layer
from transfer.models.registry import get_backbone

# mode -> the keras.applications module whose preprocess_input it reproduces
MODULES = {"tf": ["mobilenet_v2", "xception"], "torch": ["densenet"], "caffe": ["vgg16", "resnet50"]}


def _pre_model(mode, h=9, w=7):
    import keras

    x = keras.Input((h, w, 3), name="image")
    return keras.Model(x, preprocessing_layer(mode)(x))


@pytest.mark.parametrize("mode", ["tf", "torch", "caffe"])
def test_layer_equals_keras_preprocess_input(mode):
    import keras

    img = pixels(3, 9, 7, seed=1)
    ours = forward(_pre_model(mode), img)
    for module in MODULES[mode]:
        ref = getattr(keras.applications, module).preprocess_input(img.copy())
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4, err_msg=f"{mode} vs {module}")
    if mode == "caffe":  # channel order really is swapped (not just a mean shift)
        np.testing.assert_allclose(ours[..., 0], img[..., 2] - 103.939, atol=1e-4)


def test_unit_mode_is_x_over_255():
    img = pixels(2, 9, 7, seed=2)
    np.testing.assert_allclose(forward(_pre_model("unit"), img), img / 255.0, rtol=1e-6)


def test_none_mode_has_no_layer():
    assert preprocessing_layer("none") is None


def test_mobilenet_v2_classifier_preprocesses_like_keras(mnv2):
    import keras

    model, info = mnv2
    img = pixels(2, 32, 32, seed=3)
    sub = keras.Model(model.inputs, model.get_layer("preprocess").output)
    np.testing.assert_allclose(forward(sub, img),
                               keras.applications.mobilenet_v2.preprocess_input(img.copy()), atol=1e-6)
    assert info.preprocess == get_backbone("mobilenet_v2").preprocess == "tf"


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet50", 32), ("densenet121", 32), ("vgg16", 32), ("xception", 71),
                                       ("efficientnet_b0", 32)])
def test_heavy_classifier_preprocesses_like_keras(name, size):
    import keras

    spec = get_backbone(name)
    model, info = build_classifier(name, input_shape=(size, size, 3), weights="none", num_classes=2)
    img = pixels(2, size, size, seed=4)
    ref = getattr(keras.applications, spec.keras_module).preprocess_input(img.copy())
    if spec.preprocess == "none":
        # EfficientNet: preprocess_input is the identity and the image goes straight into
        # the application's own Rescaling / Normalization layers
        np.testing.assert_array_equal(ref, img)
        first = model.get_layer(info.preprocessing_layers[0])
        assert type(first).__name__ == "Rescaling" and first.input.name == model.inputs[0].name
        return
    sub = keras.Model(model.inputs, model.get_layer("preprocess").output)
    np.testing.assert_allclose(forward(sub, img), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["tf", "torch", "caffe", "unit"])
def test_preprocessing_survives_keras_save_and_load(mode, tmp_path):
    import keras

    x = keras.Input((8, 8, 3), name="image")
    y = preprocessing_layer(mode)(x)
    y = keras.layers.Conv2D(2, 1, name="c")(y)
    model = keras.Model(x, y)
    path = tmp_path / "m.keras"
    with atomic_path(path) as tmp:
        model.save(tmp)
    again = load_model(path)
    img = pixels(2, 8, 8, seed=5)
    np.testing.assert_allclose(forward(again, img), forward(model, img), atol=1e-6)
    pre = again.get_layer("preprocess")
    assert type(pre).__name__ == ("ChannelAffine" if mode == "caffe" else "Rescaling")
    assert pre.weights == [], "preprocessing must be weightless so backbone weight files load unchanged"


@pytest.mark.parametrize("mode", ["tf", "torch", "caffe", "unit"])
def test_preprocessing_converts_to_onnx(mode, tmp_path):
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    model = _pre_model(mode, 6, 6)
    spec = (tf.TensorSpec((None, 6, 6, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    img = pixels(4, 6, 6, seed=6)
    got = sess.run(None, {sess.get_inputs()[0].name: img})[0]
    np.testing.assert_allclose(got, forward(model, img), rtol=1e-5, atol=1e-4)


def _to_onnx_and_compare(model, size, tmp_path):
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    img = pixels(3, size, size, seed=11)
    np.testing.assert_allclose(sess.run(None, {"image": img})[0], forward(model, img), rtol=1e-4, atol=1e-5)


def test_small_cnn_classifier_converts_to_onnx(arc2, tmp_path):
    model, _ = arc2
    _to_onnx_and_compare(model, 16, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "densenet121", "efficientnet_b0"])
def test_classifier_converts_to_onnx(name, tmp_path):
    model, _ = build_classifier(name, input_shape=(32, 32, 3), weights="none", num_classes=3, seed=0)
    _to_onnx_and_compare(model, 32, tmp_path)


@pytest.mark.slow
def test_efficientnet_from_an_imagenet_style_file_normalizes_like_imagenet(tmp_path):
    """Keras adds Rescaling(1/sqrt(std)) only for weights="imagenet"; a PATH must match it."""
    import keras

    src, info = build_classifier("efficientnet_b0", input_shape=(32, 32, 3), weights="none", num_classes=2, seed=0)
    norm = src.get_layer("normalization")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    norm.adapt_mean.assign(mean.astype("float32"))
    norm.adapt_variance.assign((std ** 2).astype("float32"))  # what Keras's ImageNet file holds
    norm.finalize_state()
    path = tmp_path / "efficientnetb0_notop.weights.h5"
    src.save_weights(str(path))
    model, info = build_classifier("efficientnet_b0", input_shape=(32, 32, 3), weights=str(path), num_classes=2)
    assert "folded" in info.weights_note
    img = pixels(2, 32, 32, seed=12)
    got = forward(keras.Model(model.inputs, model.get_layer("normalization").output), img)
    want = ((img / 255.0 - mean) / std) / np.sqrt(std)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # a random-start file (identity normalization) is left alone
    plain, _ = build_classifier("efficientnet_b0", input_shape=(32, 32, 3), weights="none", num_classes=2, seed=0)
    p2 = tmp_path / "plain.weights.h5"
    plain.save_weights(str(p2))
    _, info2 = build_classifier("efficientnet_b0", input_shape=(32, 32, 3), weights=str(p2), num_classes=2)
    assert "folded" not in info2.weights_note
