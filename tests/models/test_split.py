"""Splitting a contract model at a freeze cut: frozen prefix, frontier, trainable suffix."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.inference import forward
from transfer.models.build import build_classifier
from transfer.models.freeze import apply_freeze
from transfer.models.split import bridge_model, find_cut, prefix_model, suffix_model, training_model


@pytest.fixture(scope="module")
def mobilenet():
    return build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="none", num_classes=3, seed=0)


def _x(n=4, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def test_a_cut_inside_a_residual_block_has_two_frontier_tensors(mobilenet):
    model, info = mobilenet
    apply_freeze(model, info, 0.3, train_bn=True)
    cut = find_cut(model, info)
    # the trainable part starts inside block 12 and reads the expand conv and block 11's sum
    assert cut.label == "block_12_expand_BN" and cut.frontier == ("block_11_add", "block_12_expand")
    assert [s[-1] for s in cut.shapes] == [96, 576] and cut.has_backbone
    x = _x()
    whole = forward(model, x)
    split = forward(suffix_model(model, cut), forward(prefix_model(model, cut), x))
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)


def test_the_frozen_prefix_runs_through_weightless_pooling_and_a_deeper_cut_is_bridged(mobilenet):
    model, info = mobilenet
    apply_freeze(model, info, 0.5, train_bn=True)
    shallow = find_cut(model, info)
    apply_freeze(model, info, 0.0)
    pooled = find_cut(model, info)
    assert pooled.frontier == ("features",) and pooled.label == "features" and pooled.shapes == ((1280,),)
    bridge, names = bridge_model(model, shallow, pooled)
    assert names == ["features"]
    x = _x()
    via = forward(bridge, forward(prefix_model(model, shallow), x))
    direct = forward(prefix_model(model, pooled), x)
    np.testing.assert_allclose(via, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not deeper"):
        bridge_model(model, pooled, shallow)


def test_everything_trainable_has_no_prefix_worth_caching(mobilenet):
    model, info = mobilenet
    apply_freeze(model, info, 1.0, train_bn=True)
    cut = find_cut(model, info)
    assert not cut.has_backbone and training_model(model, cut) is model


def test_small_cnn_at_zero_keeps_its_dense_features_trainable():
    model, info = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=0)
    apply_freeze(model, info, 0.0)
    assert find_cut(model, info).frontier == ("flatten",)
    # the linear probe's features are the Dense 'features' output of the initial model
    assert find_cut(model, info, through_features=True).frontier == ("features",)


def test_frozen_stochastic_depth_is_off_while_the_rest_trains():
    """EfficientNet's stochastic depth is Dropout layers inside the backbone. A frozen
    ``trainable`` flag does not switch Dropout off, so training the flat model ran the
    frozen prefix with random drops (its features varied between calls). The model a trial
    trains runs the prefix in inference mode."""
    import keras

    model, info = build_classifier("efficientnet_b0", input_shape=(32, 32, 3), weights="none", num_classes=3,
                                   dropout=0.0, seed=0)
    apply_freeze(model, info, 0.0)
    x = _x()
    features = keras.Model(model.inputs, model.get_layer("features").output)
    scale = float(np.abs(features(x, training=False).numpy()).max())
    # a head that turns feature differences into visible probability differences
    kernel = np.random.default_rng(1).normal(size=(info.feature_dim, 3)).astype("float32")
    kernel *= 3 / (scale * np.sqrt(info.feature_dim))  # logits of order 1
    model.get_layer("probs").set_weights([kernel, np.zeros(3, "float32")])
    reference = model(x, training=False).numpy()
    # the bug: the flat model in training mode drops frozen units, so what the head sees varies
    assert np.abs(model(x, training=True).numpy() - reference).max() > 0.01
    train = training_model(model, find_cut(model, info))
    for _ in range(2):  # head dropout is 0: nothing random is left in the part that trains
        np.testing.assert_allclose(train(x, training=True).numpy(), reference, rtol=1e-4, atol=1e-5)
