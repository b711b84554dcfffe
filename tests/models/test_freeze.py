"""Freeze policies on a known model (mobilenet_v2 at 32x32, fraction 0.3) and the BN rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_helpers import pixels
from transfer.errors import ConfigError, ModelError
from transfer.models.build import build_classifier
from transfer.models.freeze import apply_freeze, block_boundaries, count_params, cut_index


@pytest.fixture(scope="module")
def model_info():
    return build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="none", num_classes=3, seed=0)


def _is_bn(layer):
    return type(layer).__name__ == "BatchNormalization"


def _sizes(model, names):
    return [sum(int(math.prod(w.shape)) for w in model.get_layer(n).weights) for n in names]


def _expected(model, info, start, train_bn=False):
    """Trainable / non-trainable counts computed independently from the layer list."""
    names = list(info.backbone_layers)
    tr = 0
    for n in names[start:]:
        layer = model.get_layer(n)
        if _is_bn(layer):
            if train_bn:
                tr += 2 * layer.gamma.shape[0]  # gamma + beta; moving stats never trainable
        else:
            tr += sum(int(math.prod(w.shape)) for w in layer.weights)
    head = sum(int(math.prod(w.shape)) for w in model.get_layer("probs").weights)
    total = sum(int(math.prod(w.shape)) for w in model.weights)
    return tr + head, total - tr - head


def _check_flags(model, info, start, train_bn=False):
    names = list(info.backbone_layers)
    for n in names[:start]:
        assert model.get_layer(n).trainable is False, n
    for n in names[start:]:
        layer = model.get_layer(n)
        assert layer.trainable is (train_bn or not _is_bn(layer)), n
    assert model.get_layer("preprocess").trainable is False
    for n in ("features", "head_dropout", "probs"):
        assert model.get_layer(n).trainable is True


def test_by_layers_unfreezes_the_last_round_fraction_n(model_info):
    model, info = model_info
    n = len(info.backbone_layers)
    assert n == 153
    s = apply_freeze(model, info, 0.3)
    k = 46  # round(0.3 * 153) = round(45.9)
    start = n - k
    assert (s.trainable_layers, s.total_layers, s.cut_at) == (k, n, info.backbone_layers[start])
    assert s.cut_at == "block_12_expand_BN"
    _check_flags(model, info, start)
    assert (s.trainable_params, s.non_trainable_params) == _expected(model, info, start)
    assert (s.trainable_params, s.non_trainable_params) == count_params(model)
    assert s.frozen_bn == sum(1 for x in info.backbone_layers[start:] if _is_bn(model.get_layer(x)))


def test_by_params_unfreezes_whole_layers_until_the_fraction_is_reached(model_info):
    model, info = model_info
    names = list(info.backbone_layers)
    sizes = _sizes(model, names)
    total = sum(sizes)
    s = apply_freeze(model, info, 0.3, by="params")
    start = names.index(s.cut_at)
    assert sum(sizes[start:]) >= 0.3 * total  # at least the fraction ...
    assert sum(sizes[start + 1:]) < 0.3 * total  # ... and not one layer more than needed
    assert s.cut_at == "block_16_project"
    _check_flags(model, info, start)
    assert (s.trainable_params, s.non_trainable_params) == _expected(model, info, start)
    assert s.trainable_layers == len(names) - start == 5


def test_by_blocks_unfreezes_the_last_blocks(model_info):
    model, info = model_info
    bounds = block_boundaries(info)
    assert len(bounds) == 18 and bounds[0] == 0
    starts = [info.backbone_layers[b] for b in bounds]
    assert starts[:3] == ["Conv1", "expanded_conv_depthwise", "block_1_expand"]
    assert starts[-1] == "block_16_expand"
    s = apply_freeze(model, info, 0.3, by="blocks")
    nb = 5  # round(0.3 * 18) = round(5.4)
    start = bounds[-nb]
    assert s.cut_at == info.backbone_layers[start] == "block_12_expand"
    assert (s.trainable_blocks, s.total_blocks) == (nb, 18)
    _check_flags(model, info, start)
    assert (s.trainable_params, s.non_trainable_params) == _expected(model, info, start)


def test_train_bn_makes_batchnorm_trainable(model_info):
    model, info = model_info
    s = apply_freeze(model, info, 0.3, train_bn=True)
    start = len(info.backbone_layers) - 46
    _check_flags(model, info, start, train_bn=True)
    assert s.frozen_bn == 0
    assert (s.trainable_params, s.non_trainable_params) == _expected(model, info, start, train_bn=True)


def test_zero_and_one(model_info):
    model, info = model_info
    s0 = apply_freeze(model, info, 0.0)
    assert s0.cut_at is None and s0.trainable_layers == 0
    assert s0.trainable_params == 1280 * 3 + 3  # the head only
    for by in ("layers", "params", "blocks"):
        s1 = apply_freeze(model, info, 1.0, by=by, train_bn=True)
        assert s1.cut_at == "Conv1" and s1.trainable_layers == 153
        # everything but BN moving statistics
        bn_stats = sum(2 * model.get_layer(n).gamma.shape[0] for n in info.backbone_layers
                       if _is_bn(model.get_layer(n)))
        assert s1.non_trainable_params == bn_stats


@pytest.mark.parametrize("fraction", [-0.1, 1.5, "x", None, True, float("nan")])
def test_bad_fraction_is_a_config_error(model_info, fraction):
    model, info = model_info
    with pytest.raises(ConfigError, match="between 0 and 1"):
        apply_freeze(model, info, fraction)


def test_bad_by_is_a_config_error(model_info):
    model, info = model_info
    with pytest.raises(ConfigError, match="layers, params, blocks"):
        apply_freeze(model, info, 0.3, by="weights")


def test_info_of_another_model_is_a_model_error(model_info, arc2):
    model, _ = model_info
    _, arc_info = arc2
    with pytest.raises(ModelError):
        apply_freeze(model, arc_info, 0.5)


def test_small_cnn_blocks_and_rounding(arc2):
    model, info = arc2
    assert info.backbone_layers == ("conv1", "conv1_pool", "conv1_drop", "conv2", "conv2_drop", "flatten")
    assert block_boundaries(info) == [0, 3]
    assert cut_index(model, info, 0.5, by="blocks") == 3  # round(0.5 * 2) = 1 block: conv2
    assert cut_index(model, info, 0.5, by="layers") == 3  # half-up: round(0.5 * 6) = 3
    assert cut_index(model, info, 0.25, by="layers") == 4  # round(1.5) = 2 -> last 2 layers
    s = apply_freeze(model, info, 0.5, by="blocks")
    assert model.get_layer("conv1").trainable is False and model.get_layer("conv2").trainable is True
    assert s.trainable_params == 16448 + model.get_layer("features").count_params() + 64 * 4 + 4


def test_frozen_batchnorm_statistics_survive_a_real_epoch():
    import keras

    model, info = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="none", num_classes=2, seed=1)
    apply_freeze(model, info, 0.3)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    start = len(info.backbone_layers) - 46
    bn_in_cut = [n for n in info.backbone_layers[start:] if _is_bn(model.get_layer(n))]
    conv_in_cut = [n for n in info.backbone_layers[start:] if type(model.get_layer(n)).__name__ == "Conv2D"]
    frozen_conv = [n for n in info.backbone_layers[:start] if type(model.get_layer(n)).__name__ == "Conv2D"]
    before = {n: [w.copy() for w in model.get_layer(n).get_weights()] for n in bn_in_cut + conv_in_cut + frozen_conv}
    probs_bias = model.get_layer("probs").bias.numpy().copy()
    x = pixels(8, 32, 32, seed=2)
    y = np.array([0, 0, 0, 1] * 2)  # unbalanced: the head's bias gets a non-zero gradient
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert bn_in_cut and conv_in_cut and frozen_conv
    for n in bn_in_cut + frozen_conv:
        for a, b in zip(before[n], model.get_layer(n).get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=f"{n} changed although frozen")
    # the epoch really updated the model (the head's bias gets a direct gradient; with random
    # weights and BN in inference mode the deep activations are too small to move the convs
    # visibly), and the convs of the cut are among the weights the optimizer updates
    assert not np.array_equal(probs_bias, model.get_layer("probs").bias.numpy())
    trainable = {id(w) for w in model.trainable_weights}
    assert all(id(model.get_layer(n).kernel) in trainable for n in conv_in_cut)
    assert not any(id(w) in trainable for n in bn_in_cut + frozen_conv for w in model.get_layer(n).weights)

    # contrast: with train_bn the same layers' moving statistics do move
    apply_freeze(model, info, 0.3, train_bn=True)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    n = bn_in_cut[-1]
    mean_before = model.get_layer(n).moving_mean.numpy().copy()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert not np.array_equal(mean_before, model.get_layer(n).moving_mean.numpy())
