"""The two small CNNs of the Fashion-MNIST experiments (28x28 grey images, 10 classes): ``arc2`` and ``arc3``.

``arc2``: Conv2D(64, 2x2, relu, same) -> MaxPool(2) -> Dropout(.25) -> Conv2D(64, 2x2,
relu, same) -> Dropout(.25) -> Flatten -> Dense(64, relu) named ``features``. ``arc3``
adds one more Conv2D(64, 2x2) + Dropout(.25). The classifier head (``head_dropout`` ->
``probs``) is added by :func:`transfer.models.build.build_classifier`, as for every
backbone. Pixels are scaled to 0..1 in the graph (preprocess mode ``unit``).

Registered in :mod:`transfer.models.registry` (this module only builds). There are no
pretrained weights: ``weights="imagenet"`` is refused; ``"none"`` is a
random start; a PATH is a weights file or an earlier run's ``.keras``.

For freezing, the backbone is ``conv1`` .. ``flatten``; the Dense ``features`` plays the
part of the pooling layer and, like it, is always trainable.

Layer names: ``conv1``, ``conv1_pool``, ``conv1_drop``, ``conv2``, ``conv2_drop``
(``conv3``, ``conv3_drop``), ``flatten``, ``features``. Blocks are ``conv<k>``.
"""

from __future__ import annotations

from .._lazy import import_keras


def _small_cnn(input_tensor, weights, *, convs: int, name: str):
    keras = import_keras()
    layers = keras.layers
    x = input_tensor
    for k in range(1, convs + 1):
        x = layers.Conv2D(64, (2, 2), padding="same", activation="relu", name=f"conv{k}")(x)
        if k == 1:
            x = layers.MaxPooling2D(2, name=f"conv{k}_pool")(x)
        x = layers.Dropout(0.25, name=f"conv{k}_drop")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="features")(x)
    model = keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def build_arc2(input_tensor, weights=None):
    """The small CNN "Arc2" on ``input_tensor`` (see the module docstring)."""
    return _small_cnn(input_tensor, weights, convs=2, name="arc2")


def build_arc3(input_tensor, weights=None):
    """The small CNN "Arc3": Arc2 with a third Conv2D(64, 2x2) + Dropout(.25)."""
    return _small_cnn(input_tensor, weights, convs=3, name="arc3")
