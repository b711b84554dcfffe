"""Custom Keras layers of the model contract (registered for ``.keras`` loading).

Only one: :class:`ChannelAffine`, the weightless layer that implements the "caffe"
preprocessing (RGB -> BGR, minus the ImageNet BGR mean) inside the graph, where Keras's
built-in layers cannot reorder channels. It has no variables, so weight files of the
backbone load unchanged (Keras matches weights by layer order), and it converts to ONNX
as ``Gather`` + ``Mul`` + ``Add``.

Importing this module imports Keras; :func:`transfer.models.build.load_model` imports it
before loading, which registers the layer.
"""

from __future__ import annotations

from .._lazy import import_keras

keras = import_keras()


@keras.saving.register_keras_serializable(package="transfer", name="ChannelAffine")
class ChannelAffine(keras.layers.Layer):
    """``y[..., c] = x[..., order[c]] * scale[c] + offset[c]`` on the last axis; no weights.

    Args:
        order: source channel of each output channel, e.g. ``(2, 1, 0)`` for RGB -> BGR.
        scale: per-output-channel factor.
        offset: per-output-channel offset (added after scaling).

    Example::

        caffe = ChannelAffine(order=(2, 1, 0), scale=(1, 1, 1),
                              offset=(-103.939, -116.779, -123.68), name="preprocess")
    """

    def __init__(self, order=(0, 1, 2), scale=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0), **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.order = tuple(int(i) for i in order)
        self.scale = tuple(float(s) for s in scale)
        self.offset = tuple(float(o) for o in offset)
        n = len(self.order)
        if len(self.scale) != n or len(self.offset) != n or sorted(self.order) != list(range(n)):
            raise ValueError(
                f"ChannelAffine: order must be a permutation of 0..{n - 1} and scale/offset have {n} "
                f"values; got order={self.order}, scale={self.scale}, offset={self.offset}"
            )

    def build(self, input_shape):
        if input_shape[-1] is not None and int(input_shape[-1]) != len(self.order):
            raise ValueError(f"ChannelAffine expects {len(self.order)} channels, got shape {tuple(input_shape)}")
        self.built = True

    def call(self, inputs):
        ops = keras.ops
        x = ops.take(inputs, list(self.order), axis=-1)
        if any(s != 1.0 for s in self.scale):
            x = x * ops.convert_to_tensor(self.scale, dtype=x.dtype)
        return x + ops.convert_to_tensor(self.offset, dtype=x.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"order": list(self.order), "scale": list(self.scale), "offset": list(self.offset)})
        return config


def custom_objects() -> dict:
    """The package's custom Keras objects, for ``keras.saving.load_model(custom_objects=...)``."""
    return {"ChannelAffine": ChannelAffine, "transfer>ChannelAffine": ChannelAffine}
