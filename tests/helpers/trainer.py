"""Helpers of the trainer tests: a tiny, learnable image folder built in code."""

from __future__ import annotations

import functools
from pathlib import Path

from helpers import images

#: 16 images per class unless told otherwise
make_pattern_folder = functools.partial(images.make_pattern_folder, per_class=16)


def base_overrides(data: Path, out: Path, **kw) -> dict:
    """Tiny, fast sweep options (arc2 at 16x16, random weights, 2 epochs)."""
    d = {"data": str(data), "out": str(out), "backbones": "arc2", "trainable": "0,1",
         "weights": "none", "epochs": 2, "image_size": 16, "batch_size": 16, "patience": 0,
         "workers": 2, "lr": 3e-3}
    d.update(kw)
    return d


def tiny_bn_builder(input_tensor, weights):
    """Two conv + BatchNormalization + ReLU blocks: a backbone with BatchNorm that trains in seconds."""
    import keras

    x = input_tensor
    for k, (ch, stride) in enumerate(((8, 1), (16, 2)), 1):
        x = keras.layers.Conv2D(ch, 3, strides=stride, padding="same", name=f"b{k}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"b{k}_bn")(x)
        x = keras.layers.ReLU(name=f"b{k}_relu")(x)
    model = keras.Model(keras.utils.get_source_inputs(input_tensor), x, name="tiny_bn")
    if weights is not None:
        model.load_weights(weights)
    return model


def register_tiny_bn() -> str:
    """Register ``tiny_bn`` (pooled like the Keras applications); returns its name."""
    from transfer.models.registry import BackboneSpec, register_backbone

    register_backbone(BackboneSpec(name="tiny_bn", builder=tiny_bn_builder, default_size=16, min_size=8,
                                   preprocess="unit", gradcam_layer="b2_relu", block_pattern=r"^(b\d+)_",
                                   imagenet_file=None, pretrainable=False, num_blocks=2,
                                   params=224 + 32 + 1168 + 64,  # conv + BatchNorm of the two blocks
                                   description="test backbone with BatchNorm"), replace=True)
    return "tiny_bn"
