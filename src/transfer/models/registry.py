"""The backbone registry: one frozen :class:`BackboneSpec` per name.

A spec says everything the rest of the package needs to know about a backbone without
building it: the Keras constructor, default and minimum input size, its own
``preprocess_input`` mode (implemented as layers inside the graph, see
:mod:`transfer.models.build`), the Grad-CAM target layer, the regular expression that
finds its blocks (for ``--freeze-by blocks``) and the file name of its no-top ImageNet
weights in the Keras cache.

Importing this module does not import TensorFlow: builders import Keras when called.

Example::

    from transfer.models.registry import get_backbone, list_backbones
    "mobilenet_v2" in list_backbones()
    # True
    get_backbone("mobilenet_v2").preprocess
    # 'tf'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from .._lazy import import_keras
from ..errors import ConfigError
from . import small

#: Preprocessing modes a spec may name (what the in-graph preprocessing layers compute
#: from RGB pixels in 0..255):
#:
#: * ``tf``    -- ``x / 127.5 - 1`` (Keras ``preprocess_input`` mode "tf")
#: * ``torch`` -- ``(x / 255 - mean) / std`` with the ImageNet mean / std (mode "torch")
#: * ``caffe`` -- RGB -> BGR, minus the ImageNet BGR mean, no scaling (mode "caffe")
#: * ``none``  -- nothing: the backbone normalizes inside itself (EfficientNet)
#: * ``unit``  -- ``x / 255`` (the small CNNs)
PREPROCESS_MODES = ("tf", "torch", "caffe", "none", "unit")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything known about one backbone, without building it.

    Attributes:
        name: registry key, e.g. ``"mobilenet_v2"``.
        builder: ``builder(input_tensor, weights) -> keras.Model`` where ``input_tensor``
            is the output of the preprocessing layers and ``weights`` is ``None``,
            ``"imagenet"`` or a weights-file path. The returned model's layers are built
            on ``input_tensor`` (inlined into the caller's graph, not nested) and its
            ``output`` is the last spatial feature map -- or, when ``pooling`` is
            ``"none"``, a rank-2 tensor from a layer named ``features``.
        default_size: input side used when the user gives none.
        min_size: smallest input side the backbone accepts.
        preprocess: one of :data:`PREPROCESS_MODES`.
        gradcam_layer: name of the last spatial conv / activation layer.
        block_pattern: regex on layer names; its first group names the block.
        imagenet_file: Keras cache file name of the no-top ImageNet weights (``None``:
            no pretrained weights exist).
        pretrainable: ``False`` when ``weights="imagenet"`` is impossible.
        description: one line for ``transfer backbones``.
        pooling: ``"avg"`` (a ``GlobalAveragePooling2D`` named ``features`` is added) or
            ``"none"`` (the builder already ends with the ``features`` layer).
        num_blocks: number of blocks ``block_pattern`` finds (shown without building;
            a test checks it against a real build).
        params: parameters of everything but the head at ``default_size`` (the
            backbone, its own normalization layers, and for the small CNNs their Dense
            ``features``); shown without building, checked by a test.
        keras_module: the ``keras.applications`` module whose ``preprocess_input`` the
            in-graph preprocessing reproduces (``None`` for the small CNNs).
    """

    name: str
    builder: Callable
    default_size: int
    min_size: int
    preprocess: str
    gradcam_layer: str
    block_pattern: str
    imagenet_file: str | None
    pretrainable: bool
    description: str
    pooling: str = "avg"
    num_blocks: int | None = None
    params: int | None = None
    keras_module: str | None = None

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS_MODES:
            raise ConfigError(
                f"backbone {self.name!r}: unknown preprocess mode {self.preprocess!r}",
                hint=f"use one of: {', '.join(PREPROCESS_MODES)}",
            )
        if self.pooling not in ("avg", "none"):
            raise ConfigError(f"backbone {self.name!r}: pooling must be 'avg' or 'none', got {self.pooling!r}")
        if not (1 <= int(self.min_size) <= int(self.default_size)):
            raise ConfigError(
                f"backbone {self.name!r}: need 1 <= min_size <= default_size, got {self.min_size} / {self.default_size}"
            )


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec | None = None, /, *, replace: bool = False, **fields_):
    """Register a backbone under ``spec.name`` and return the spec.

    Two forms: ``register_backbone(BackboneSpec(...))``, or as a decorator of a builder
    function, ``@register_backbone(name="mine", default_size=64, ...)`` (every field but
    ``builder``), which returns the builder unchanged.

    Args:
        spec: the spec to register.
        replace: allow replacing a different spec of the same name.
        **fields_: the spec fields, for the decorator form.

    Returns:
        The registered spec (or, in the decorator form, a decorator).

    Raises:
        ConfigError: the name is taken by a different spec and ``replace`` is False.

    Example::

        register_backbone(BackboneSpec(name="tiny", builder=my_builder, default_size=32,
            min_size=8, preprocess="unit", gradcam_layer="conv2", block_pattern=r"^(conv\\d+)",
            imagenet_file=None, pretrainable=False, description="my CNN"))
    """
    if spec is None:
        def deco(builder):
            register_backbone(BackboneSpec(builder=builder, **fields_), replace=replace)
            return builder

        return deco
    if not isinstance(spec, BackboneSpec):
        raise ConfigError(f"register_backbone expects a BackboneSpec, got {type(spec).__name__}")
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ConfigError(
            f"a backbone named {spec.name!r} is already registered",
            hint="pick another name or pass replace=True",
        )
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted.

    Example::

        list_backbones()[:2]
        # ['arc2', 'arc3']
    """
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under ``name`` (case-insensitive, ``-`` same as ``_``).

    Raises:
        ConfigError: unknown name; the message lists the registered ones.

    Example::

        get_backbone("MobileNet-V2").name
        # 'mobilenet_v2'
    """
    key = str(name).strip().lower().replace("-", "_")
    spec = _REGISTRY.get(key)
    if spec is None:
        raise ConfigError(
            f"unknown backbone {name!r}; known: {', '.join(list_backbones())}",
            hint="`transfer backbones` lists them with sizes and preprocessing",
        )
    return spec


def spec_fields() -> list[str]:
    """Field names of :class:`BackboneSpec` (for tables)."""
    return [f.name for f in fields(BackboneSpec)]


# --------------------------------------------------------------------------- Keras applications


def _keras_app(attr: str) -> Callable:
    """A builder calling ``keras.applications.<attr>(include_top=False, input_tensor=...)``."""

    def builder(input_tensor, weights):
        keras = import_keras()
        return getattr(keras.applications, attr)(include_top=False, weights=weights, input_tensor=input_tensor)

    builder.__name__ = builder.__qualname__ = f"keras_applications_{attr}"
    builder.__doc__ = f"keras.applications.{attr}(include_top=False, weights=weights, input_tensor=input_tensor)"
    return builder


#: The Keras applications, one row each: name, keras.applications attribute, default / minimum
#: size, preprocess mode, Grad-CAM layer, block pattern, no-top ImageNet file, blocks,
#: parameters (backbone at the default size), keras.applications module, description.
_APP_ROWS = (
    ("xception", "Xception", 299, 71, "tf", "block14_sepconv2_act", r"^(block\d+)_", "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", 14, 20_861_480, "xception", "Xception (depthwise-separable convs, 14 blocks)"),
    ("resnet50", "ResNet50", 224, 32, "caffe", "conv5_block3_out", r"^(conv\d+_block\d+)_", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", 17, 23_587_712, "resnet50", "ResNet-50 (stem + 16 bottleneck blocks)"),
    ("densenet121", "DenseNet121", 224, 32, "torch", "relu", r"^(conv\d+_block\d+|pool\d+)_", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", 62, 7_037_504, "densenet", "DenseNet-121 (58 dense layers + 3 transitions)"),
    ("vgg16", "VGG16", 224, 32, "caffe", "block5_conv3", r"^(block\d+)_", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", 5, 14_714_688, "vgg16", "VGG-16 (13 convs in 5 blocks)"),
    ("mobilenet_v2", "MobileNetV2", 224, 32, "tf", "out_relu", r"^(expanded_conv|block_\d+)_", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", 18, 2_257_984, "mobilenet_v2", "MobileNetV2 1.0 (stem + 17 inverted-residual blocks); small and fast"),
    ("efficientnet_b0", "EfficientNetB0", 224, 32, "none", "top_activation", r"^(block\d[a-z])_", "efficientnetb0_notop.h5", 17, 4_049_571, "efficientnet", "EfficientNet-B0 (stem + 16 MBConv blocks; normalizes inside the model)"),
)

for _name, _attr, _size, _min, _pre, _cam, _blocks_re, _file, _blocks, _params, _module, _desc in _APP_ROWS:
    register_backbone(BackboneSpec(
        name=_name, builder=_keras_app(_attr), default_size=_size, min_size=_min, preprocess=_pre,
        gradcam_layer=_cam, block_pattern=_blocks_re, imagenet_file=_file, pretrainable=True, description=_desc,
        num_blocks=_blocks, params=_params, keras_module=_module,
    ))

# --------------------------------------------------------------------------- the small CNNs

# params at 28x28x3: conv1 3*4*64+64=832, conv2 64*4*64+64=16448, (conv3 16448),
# features 14*14*64*64+64=802880
ARC2 = register_backbone(BackboneSpec(
    name="arc2", builder=small.build_arc2, default_size=28, min_size=8, preprocess="unit",
    gradcam_layer="conv2", block_pattern=r"^(conv\d+)", imagenet_file=None, pretrainable=False,
    description="small Fashion-MNIST CNN: conv64-2x2, maxpool, dropout, conv64-2x2, dropout, FC64",
    pooling="none", num_blocks=2, params=832 + 16_448 + 802_880,
))

ARC3 = register_backbone(BackboneSpec(
    name="arc3", builder=small.build_arc3, default_size=28, min_size=8, preprocess="unit",
    gradcam_layer="conv3", block_pattern=r"^(conv\d+)", imagenet_file=None, pretrainable=False,
    description="arc2 with one more conv64-2x2 + dropout",
    pooling="none", num_blocks=3, params=832 + 2 * 16_448 + 802_880,
))
