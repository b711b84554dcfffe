"""build_classifier: the model contract, input checks, seeds, and the heavy backbones (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from model_helpers import check_contract
from transfer.errors import ConfigError, WeightsUnavailableError
from transfer.models.build import build_classifier, model_info
from transfer.models.freeze import block_boundaries
from transfer.models.registry import get_backbone


def test_mobilenet_v2_contract(mnv2):
    model, info = mnv2
    check_contract(model, info, size=(32, 32), num_classes=3)
    assert info.backbone == "mobilenet_v2" and info.input_shape == (32, 32, 3)
    assert info.feature_dim == 1280 and info.num_classes == 3 and info.preprocess == "tf"
    assert info.preprocessing_layers == ("preprocess",)
    assert info.head_layers == ("features", "head_dropout", "probs")
    assert info.backbone_layers[0] == "Conv1" and info.backbone_layers[-1] == "out_relu"
    assert info.gradcam_layer == "out_relu"
    assert len(block_boundaries(info)) == get_backbone("mobilenet_v2").num_blocks
    assert sum(model.get_layer(n).count_params() for n in info.backbone_layers) == get_backbone("mobilenet_v2").params


@pytest.mark.parametrize("name,size,convs", [("arc2", 16, 2), ("arc2", 28, 2), ("arc3", 28, 3), ("arc3", 8, 3)])
def test_small_cnn_contract(name, size, convs):
    model, info = build_classifier(name, input_shape=(size, size, 3), weights="none", num_classes=10, seed=0)
    check_contract(model, info, size=(size, size), num_classes=10)
    assert info.feature_dim == 64 and info.preprocess == "unit"
    convs_found = [n for n in info.backbone_layers if model.get_layer(n).__class__.__name__ == "Conv2D"]
    assert convs_found == [f"conv{k}" for k in range(1, convs + 1)]
    for k in range(1, convs + 1):
        layer = model.get_layer(f"conv{k}")
        assert layer.filters == 64 and tuple(layer.kernel_size) == (2, 2) and layer.padding == "same"
        assert model.get_layer(f"conv{k}_drop").rate == 0.25
    assert model.get_layer("features").units == 64
    assert info.gradcam_layer == f"conv{convs}"
    assert len(block_boundaries(info)) == convs == get_backbone(name).num_blocks
    # report E layout: one 2x2 max-pool after the first conv
    assert [n for n in info.backbone_layers if "pool" in n] == ["conv1_pool"]
    if size == 28:
        n_params = sum(model.get_layer(n).count_params() for n in info.backbone_layers + ("features",))
        assert n_params == get_backbone(name).params


def test_small_cnn_refuses_imagenet():
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights"):
        build_classifier("arc2", input_shape=(28, 28, 3), weights="imagenet", num_classes=10)


@pytest.mark.parametrize("name,shape,needle", [
    ("mobilenet_v2", (31, 64, 3), "31x64"),
    ("xception", (70, 70, 3), "70x70"),
    ("arc2", (4, 4, 3), "4x4"),
])
def test_input_below_minimum_is_a_config_error(name, shape, needle):
    spec = get_backbone(name)
    with pytest.raises(ConfigError) as ei:
        build_classifier(name, input_shape=shape, weights="none", num_classes=2)
    msg = str(ei.value)
    assert name in msg and needle in msg and str(spec.min_size) in msg


@pytest.mark.parametrize("shape", [(32, 32, 1), (32, 32, 4), (32, 32), "big", (32.5, 32, 3)])
def test_bad_input_shape_is_a_config_error(shape):
    with pytest.raises(ConfigError):
        build_classifier("arc2", input_shape=shape, weights="none", num_classes=2)


@pytest.mark.parametrize("kw", [{"num_classes": 1}, {"num_classes": 2.5}, {"num_classes": 2, "dropout": 1.0},
                                {"num_classes": 2, "dropout": -0.1}, {"num_classes": 2, "dropout": "x"}])
def test_bad_head_options_are_config_errors(kw):
    with pytest.raises(ConfigError):
        build_classifier("arc2", input_shape=(16, 16, 3), weights="none", **kw)


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_classifier("lenet", input_shape=(32, 32, 3), weights="none", num_classes=2)


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=7)
    b, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=7)
    c, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=8)
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    assert len(wa) == len(wb) == 8  # conv1, conv2, features, probs
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(wa, wc))


def test_layer_names_do_not_depend_on_what_was_built_before():
    import keras

    a, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3)
    for _ in range(3):  # bump Keras's per-process auto-name counters
        keras.layers.Conv2D(2, 1)
        keras.layers.Dropout(0.1)
    b, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3)
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    # the process-wide counter is restored, so names outside our builds stay unique
    assert keras.layers.Conv2D(2, 1).name != keras.layers.Conv2D(2, 1).name


def test_dropout_rate_reaches_the_head():
    model, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, dropout=0.4)
    assert model.get_layer("head_dropout").rate == pytest.approx(0.4)


def test_model_info_of_a_built_model_matches(mnv2):
    model, info = mnv2
    again = model_info(model, "mobilenet_v2")
    assert again.backbone_layers == info.backbone_layers
    assert again.preprocessing_layers == info.preprocessing_layers
    assert (again.feature_dim, again.num_classes, again.input_shape) == (1280, 3, (32, 32, 3))


HEAVY = [("xception", 71), ("resnet50", 32), ("densenet121", 32), ("vgg16", 32), ("efficientnet_b0", 32)]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", HEAVY)
def test_heavy_backbone_contract(name, size):
    import keras

    spec = get_backbone(name)
    model, info = build_classifier(name, input_shape=(size, size, 3), weights="none", num_classes=5, seed=0)
    check_contract(model, info, size=(size, size), num_classes=5)
    assert len(block_boundaries(info)) == spec.num_blocks
    n_params = sum(model.get_layer(n).count_params() for n in info.backbone_layers + info.preprocessing_layers)
    assert n_params == spec.params
    # the layers are those of Keras's own application, in the same order, not nested
    ref = getattr(keras.applications, {"xception": "Xception", "resnet50": "ResNet50", "densenet121": "DenseNet121",
                                       "vgg16": "VGG16", "efficientnet_b0": "EfficientNetB0"}[name])(
        include_top=False, weights=None, input_shape=(size, size, 3))
    ref_classes = [type(layer).__name__ for layer in ref.layers if not isinstance(layer, keras.layers.InputLayer)]
    ours = [type(model.get_layer(n)).__name__ for n in info.preprocessing_layers + info.backbone_layers
            if not n.startswith("preprocess")]
    assert ours == ref_classes
    if name in ("densenet121", "efficientnet_b0", "xception"):
        # auto-named layers get the same names in every build
        _, info2 = build_classifier(name, input_shape=(size, size, 3), weights="none", num_classes=5)
        assert info2.backbone_layers == info.backbone_layers
