"""Which layer of a Keras model a class-activation map explains, and where its cells sit on the input.

The model is a flat contract model (docs/design.md), so every layer with a 4-D spatial output
(``(None, h, w, k)``) can be explained (:func:`spatial_layers`). The target layer
(:func:`resolve_layer`): ``--layer``, else the trial's ``gradcam_layer``, unless that layer's map
has fewer than :data:`MIN_MAP_SIDE` cells on its shorter side at this input size (MobileNetV2's
``out_relu`` is 2 x 2 at 64 px: four quadrants cannot say where a shape is); then the last layer
that has them (padding layers excluded). :func:`layer_geometry` reads from the graph where the
layer's cells are centred on the input, so maps upsample exactly (:func:`transfer.maps.upsample`);
Grad-CAM on Keras (:mod:`transfer.analysis.gradcam`) and a bundle's maps
(:mod:`transfer.export.cam_export`) both use it. TensorFlow is imported inside the functions.

Example::

    from transfer.analysis.cam_layers import layer_geometry, resolve_layer
    layer = resolve_layer(model, None, default="conv2", fine=True).name
    layer_geometry(model, layer)      # ((2.0, 2.5), (2.0, 2.5)) for arc2 at 32 px
"""

from __future__ import annotations

from .._lazy import import_keras
from ..errors import ModelError

#: a default target layer whose map has fewer cells than this on its shorter side is replaced
MIN_MAP_SIDE = 6


# --------------------------------------------------------------------------- layers


def spatial_layers(model) -> list[str]:
    """Names of the layers whose output is 4-D ``(None, h, w, k)`` (Grad-CAM candidates), graph order.

    Example::

        spatial_layers(model)[-2:]    # ['conv2', 'conv2_drop'] for arc2
    """
    keras = import_keras()
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # layer used more than once / no output
            continue
        if len(shape) == 4:
            out.append(layer.name)
    return out


def map_side(model, name: str) -> int:
    """Cells on the shorter side of a layer's map."""
    shape = model.get_layer(name).output.shape
    return min(int(shape[1] or 0), int(shape[2] or 0))


def _fine_enough(model, preferred: str) -> str:
    """``preferred``, or the last spatial layer after none of the padding layers whose map has
    at least :data:`MIN_MAP_SIDE` cells a side when ``preferred``'s has fewer."""
    keras = import_keras()
    if map_side(model, preferred) >= MIN_MAP_SIDE:
        return preferred
    cands = [n for n in spatial_layers(model)
             if not isinstance(model.get_layer(n), (keras.layers.ZeroPadding2D, keras.layers.Cropping2D))
             and map_side(model, n) >= MIN_MAP_SIDE]
    return cands[-1] if cands else preferred


def resolve_layer(model, name: str | None = None, *, default: str | None = None, fine: bool = False):
    """The target layer: ``name``, else ``default`` (the registry's), else the last spatial layer.

    With ``fine`` and no ``name``, a default whose map has fewer than :data:`MIN_MAP_SIDE`
    cells on its shorter side is replaced by the last (non-padding) layer that has them.

    Raises:
        ModelError: the model has no layer of that name, or its output is not 4-D
            spatial; the message names the candidate layers.

    Example::

        resolve_layer(model, "conv2").name    # 'conv2'
    """
    cands = spatial_layers(model)
    if not cands:
        raise ModelError(f"model {model.name!r} has no layer with a spatial (4-D) output to explain")
    shown = ", ".join(cands[-12:]) + (f" (and {len(cands) - 12} earlier)" if len(cands) > 12 else "")
    want = name or default
    if not want or (name is None and want not in {layer.name for layer in model.layers}):
        # no default, or a stale one: the last spatial layer
        return model.get_layer(_fine_enough(model, cands[-1]) if fine else cands[-1])
    names = {layer.name for layer in model.layers}
    if want not in names:
        raise ModelError(
            f"the model has no layer named {want!r}",
            hint=f"pick a layer that has a spatial output, e.g. one of: {shown}", option="layer",
        )
    if want not in cands:
        shape = tuple(model.get_layer(want).output.shape)
        raise ModelError(
            f"layer {want!r} has output shape {shape}, not a spatial map (None, h, w, channels); "
            f"Grad-CAM needs a convolutional layer",
            hint=f"pick one of: {shown}", option="layer",
        )
    if fine and name is None:
        want = _fine_enough(model, want)
    return model.get_layer(want)


# --------------------------------------------------------------------------- geometry


def _axis_step(op, axis: int, size_in: int) -> tuple[float, float] | None:
    """``(s, o)`` of one layer along one axis: output cell ``r`` is centred on input index ``s * r + o``;
    ``None`` when the layer changes the size in a way this does not know."""
    keras = import_keras()
    L = keras.layers
    if isinstance(op, L.ZeroPadding2D):
        return 1.0, -float(op.padding[axis][0])
    if isinstance(op, L.Cropping2D):
        return 1.0, float(op.cropping[axis][0])
    if isinstance(op, (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.MaxPooling2D, L.AveragePooling2D)) \
            and not isinstance(op, L.Conv2DTranspose):
        k = op.pool_size[axis] if hasattr(op, "pool_size") else op.kernel_size[axis]
        d = op.dilation_rate[axis] if hasattr(op, "dilation_rate") else 1
        s = op.strides[axis]
        k_eff = (k - 1) * d + 1
        pad_before = 0
        if op.padding == "same":  # TensorFlow's: the extra row / column goes after
            out = -(-size_in // s)
            pad_before = max((out - 1) * s + k_eff - size_in, 0) // 2
        return float(s), (k_eff - 1) / 2 - pad_before
    return None


def layer_geometry(model, layer_name: str):
    """Where the cells of a layer's map sit on the input (:data:`transfer.maps.Geometry`), from the graph.

    Walks from the layer back to the input through its first inputs, composing each
    convolution's and pooling's stride and offset (``valid`` convolutions shrink the map, and
    TensorFlow's ``same`` padding with stride 2 puts the extra row after: MobileNetV2's cells
    at stride 8 are centred 3.5 px lower and further right than an even tiling would put
    them). Layers that keep the spatial size (normalization, activations, adds, 1x1 and
    stride-1 odd ``same`` convolutions) change nothing.

    Returns:
        ``((a_y, b_y), (a_x, b_x))``: cell ``r`` is centred at input coordinate ``a * r + b``
        (pixel ``p`` spans ``[p, p + 1)``); ``None`` when a layer on the way is not understood
        (the map then tiles the input evenly).

    Example::

        layer_geometry(arc2_at_32px, "conv2")     # ((2.0, 2.5), (2.0, 2.5))
    """
    keras = import_keras()
    op = model.get_layer(layer_name)
    axes = [[1.0, 0.0], [1.0, 0.0]]  # input index of cell r = a * r + b, per axis
    seen = 0
    while not isinstance(op, keras.layers.InputLayer):
        seen += 1
        if seen > 10_000:
            return None
        inp = op.input[0] if isinstance(op.input, (list, tuple)) else op.input
        out_shape, in_shape = tuple(op.output.shape), tuple(inp.shape)
        if len(in_shape) != 4 or len(out_shape) != 4:
            return None
        for axis in (0, 1):
            step = _axis_step(op, axis, int(in_shape[1 + axis]))
            if step is None:
                if out_shape[1 + axis] != in_shape[1 + axis]:
                    return None
                continue
            s, o = step
            a, b = axes[axis]
            axes[axis] = [s * a, s * b + o]
        op = inp._keras_history.operation
    return tuple((float(a), float(b) + 0.5) for a, b in axes)


__all__ = ["MIN_MAP_SIDE", "layer_geometry", "map_side", "resolve_layer", "spatial_layers"]
