"""Split a contract model into its frozen prefix and the part that trains.

A freeze at fraction ``f`` (:func:`transfer.models.freeze.apply_freeze`) leaves the first
layers of the backbone frozen. Their output never changes while the trial trains, so it
can be computed once per image (the trainer caches it) and the trial only runs the rest.
A :class:`Cut` names that boundary:

* ``prefix``: the preprocessing layers and the frozen backbone layers (graph order; a
  prefix in graph order holds every layer its layers read from);
* ``frontier``: the layers of the prefix (or the ``image`` input) whose outputs the rest
  reads -- with residual connections several tensors cross the boundary (MobileNetV2 cut
  inside block 12 reads ``block_12_expand`` and ``block_11_add``).

The models built here share their layers (and weights) with the contract model: training
the suffix trains the contract model, which is what is saved. The prefix always runs in
inference mode: stored BatchNormalization statistics, Dropout and stochastic depth off
(EfficientNet's stochastic depth is Dropout layers, which a frozen ``trainable`` flag
does not switch off).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import import_keras, import_tensorflow


@dataclass(frozen=True)
class Cut:
    """Where a contract model splits into a frozen prefix and the part that trains.

    Attributes:
        prefix: names of the prefix layers, in graph order (the ``image`` input excluded).
        frontier: names of the layers (or ``"image"``) whose outputs the rest reads, in
            graph order.
        shapes: the per-image shape of each frontier output.
        label: a short name: the first layer after the cut, or ``"features"`` when the
            prefix ends with the pooled features.
        backbone_depth: backbone layers in the prefix.
    """

    prefix: tuple[str, ...]
    frontier: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    label: str
    backbone_depth: int = 0

    @property
    def depth(self) -> int:
        """Layers in the prefix (a deeper cut freezes more)."""
        return len(self.prefix)

    @property
    def has_backbone(self) -> bool:
        """False when the prefix is the weightless preprocessing only (nothing worth caching)."""
        return self.backbone_depth > 0

    @property
    def floats_per_image(self) -> int:
        n = 0
        for s in self.shapes:
            k = 1
            for d in s:
                k *= int(d)
            n += k
        return n


def _inputs_of(layer) -> list:
    keras = import_keras()
    return list(keras.tree.flatten(layer.input))


def find_cut(model, info, *, through_features: bool = False) -> Cut:
    """The cut of a model whose ``trainable`` flags are set (:func:`apply_freeze`).

    The prefix is the preprocessing plus the backbone layers before the first one whose
    ``trainable`` flag is set; when the whole backbone is frozen and the ``features`` layer has no weights
    (global average pooling), the pooled features are the frontier. With
    ``through_features`` the prefix runs through ``features`` whatever its flags (the
    pooled features of the initial model, where a linear probe is fitted).

    Example::

        apply_freeze(model, info, 0.3)
        cut = find_cut(model, info)   # cut.label == "block_12_expand_BN" for mobilenet_v2 at 96 px
    """
    body = list(info.backbone_layers)
    # a frozen BatchNormalization right at the cut (kept in inference mode) runs in the prefix
    first = len(body) if through_features else next(
        (i for i, n in enumerate(body) if model.get_layer(n).trainable), len(body))
    prefix = list(info.preprocessing_layers) + body[:first]
    label = body[first] if first < len(body) else "features"
    feats = model.get_layer("features")
    if first == len(body) and (through_features or not feats.weights):
        prefix.append("features")
    return _cut(model, prefix, label, first)


def pixel_cut(image_size: tuple[int, int]) -> Cut:
    """The cut before every layer: the frontier is the decoded ``image`` itself (the
    pixels of a trial whose whole backbone trains, decoded once instead of every epoch)."""
    h, w = (int(v) for v in image_size)
    return Cut(prefix=(), frontier=("image",), shapes=((h, w, 3),), label="pixels", backbone_depth=0)


def _cut(model, prefix: list[str], label: str, backbone_depth: int) -> Cut:
    inside = set(prefix) | {"image"}
    producer = {id(layer.output): layer.name for layer in model.layers}
    frontier: list[str] = []
    for layer in model.layers:
        if layer.name in inside:
            continue
        for t in _inputs_of(layer):
            src = producer.get(id(t))
            if src in inside and src not in frontier:
                frontier.append(src)
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    frontier.sort(key=order.__getitem__)
    shapes = tuple(tuple(int(d) for d in model.get_layer(n).output.shape[1:]) for n in frontier)
    ordered = tuple(sorted(prefix, key=order.__getitem__))
    return Cut(prefix=ordered, frontier=tuple(frontier), shapes=shapes, label=label, backbone_depth=backbone_depth)


def inference_function(model):
    """``model(x, training=False)`` as one ``tf.function`` traced once for any batch size,
    its outputs as a list. ``predict_on_batch`` traces the model again for every new batch
    shape (the last, shorter batch of each split): seconds each for a large backbone.

    Example::

        run = inference_function(prefix_model(model, cut))
        outputs = run(images)          # float32 arrays, one per model input
    """
    tf = import_tensorflow()
    specs = [tf.TensorSpec((None, *(int(d) for d in t.shape[1:])), tf.float32) for t in model.inputs]

    @tf.function(input_signature=specs)
    def run(*xs):
        out = model(list(xs) if len(xs) > 1 else xs[0], training=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return run


def _outputs(model, names):
    return [model.get_layer(n).output for n in names]


def prefix_model(model, cut: Cut):
    """``image`` -> the frontier outputs (a list, one per frontier layer)."""
    keras = import_keras()
    return keras.Model(model.inputs, _outputs(model, cut.frontier), name=f"prefix_{cut.label}")


def suffix_model(model, cut: Cut):
    """The frontier outputs -> ``probs``: the part of the model that trains."""
    keras = import_keras()
    return keras.Model(_outputs(model, cut.frontier), model.outputs, name=f"suffix_{cut.label}")


def features_model(model, cut: Cut):
    """The frontier outputs -> the pooled ``features`` (the pixels' frontier is the ``image`` input).

    Raises:
        ValueError: the cut's frontier is the pooled features themselves (nothing to run).
    """
    keras = import_keras()
    if cut.frontier == ("features",):
        raise ValueError("the frontier is the pooled features: there is nothing to run")
    inputs = list(model.inputs) if cut.frontier == ("image",) else _outputs(model, cut.frontier)
    return keras.Model(inputs, model.get_layer("features").output, name=f"features_{cut.label}")


def bridge_model(model, shallow: Cut, deep: Cut):
    """A shallower cut's frontier -> a deeper cut's frontier outputs that are not already in it.

    Returns ``(model or None, computed names)``; the deeper frontier's other names are
    copied from the shallower one (an unchanged skip connection).
    """
    keras = import_keras()
    if not set(shallow.prefix) <= set(deep.prefix):
        raise ValueError(f"cut {deep.label} is not deeper than cut {shallow.label}")
    computed = [n for n in deep.frontier if n not in shallow.frontier]
    if not computed:
        return None, []
    return keras.Model(_outputs(model, shallow.frontier), _outputs(model, computed),
                       name=f"bridge_{shallow.label}_{deep.label}"), computed


def training_model(model, cut: Cut):
    """The model a trial trains on images: the prefix in inference mode, then the suffix.

    Keras passes a model's ``training`` flag down to every layer that takes one, nested
    models included (a nested ``prefix(x, training=False)`` would still run in training
    mode inside ``fit``); the prefix is therefore wrapped in a layer whose ``call`` takes
    no ``training`` argument and always runs it in inference mode. Without a backbone
    layer in the prefix (everything trainable) it is ``model`` itself.
    """
    if not cut.has_backbone:
        return model
    keras = import_keras()
    prefix, suffix = prefix_model(model, cut), suffix_model(model, cut)
    image = keras.Input(shape=model.inputs[0].shape[1:], name="image")
    frozen = _inference_layer(prefix)(image)
    return keras.Model(image, suffix(frozen if isinstance(frozen, list) else [frozen]), name=f"train_{cut.label}")


def _inference_layer(prefix):
    keras = import_keras()

    class FrozenPrefix(keras.layers.Layer):
        """Runs the frozen prefix in inference mode whatever mode the model trains in."""

        def __init__(self, model, **kwargs):
            super().__init__(trainable=False, name="frozen_prefix", **kwargs)
            self.prefix = model

        def call(self, x):  # no `training` argument: Keras cannot switch this to training mode
            return self.prefix(x, training=False)

        def compute_output_spec(self, x):
            return self.prefix.compute_output_spec(x)

    return FrozenPrefix(prefix)
