"""The backbone registry: one frozen :class:`BackboneSpec` per name.

A spec says everything the rest of the package needs to know about a backbone without
building it: the Keras constructor, default and minimum input size, its own
``preprocess_input`` mode (implemented as layers inside the graph, see
:mod:`transfer.models.build`), the Grad-CAM target layer, the regular expression that
finds its blocks (for ``--freeze-by blocks``) and the file name of its no-top ImageNet
weights in the Keras cache.

Importing this module does not import TensorFlow: builders import Keras when called.

Example:
    >>> from transfer.models.registry import get_backbone, list_backbones
    >>> "mobilenet_v2" in list_backbones()
    True
    >>> get_backbone("mobilenet_v2").preprocess
    'tf'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

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

    Example:
        >>> register_backbone(BackboneSpec(name="tiny", builder=my_builder, default_size=32,
        ...     min_size=8, preprocess="unit", gradcam_layer="conv2", block_pattern=r"^(conv\\d+)",
        ...     imagenet_file=None, pretrainable=False, description="my CNN"))  # doctest: +SKIP
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

    Example:
        >>> list_backbones()[:2]
        ['arc2', 'arc3']
    """
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under ``name`` (case-insensitive, ``-`` same as ``_``).

    Raises:
        ConfigError: unknown name; the message lists the registered ones.

    Example:
        >>> get_backbone("MobileNet-V2").name
        'mobilenet_v2'
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
        from .._lazy import import_keras

        keras = import_keras()
        return getattr(keras.applications, attr)(include_top=False, weights=weights, input_tensor=input_tensor)

    builder.__name__ = builder.__qualname__ = f"keras_applications_{attr}"
    builder.__doc__ = f"keras.applications.{attr}(include_top=False, weights=weights, input_tensor=input_tensor)"
    return builder


_APPS = (
    BackboneSpec(
        name="xception", builder=_keras_app("Xception"), default_size=299, min_size=71, preprocess="tf",
        gradcam_layer="block14_sepconv2_act", block_pattern=r"^(block\d+)_",
        imagenet_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5", pretrainable=True,
        description="Xception (depthwise-separable convs, 14 blocks); report D",
        num_blocks=14, params=20_861_480, keras_module="xception",
    ),
    BackboneSpec(
        name="resnet50", builder=_keras_app("ResNet50"), default_size=224, min_size=32, preprocess="caffe",
        gradcam_layer="conv5_block3_out", block_pattern=r"^(conv\d+_block\d+)_",
        imagenet_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", pretrainable=True,
        description="ResNet-50 (stem + 16 bottleneck blocks); reports A-C",
        num_blocks=17, params=23_587_712, keras_module="resnet50",
    ),
    BackboneSpec(
        name="densenet121", builder=_keras_app("DenseNet121"), default_size=224, min_size=32, preprocess="torch",
        gradcam_layer="relu", block_pattern=r"^(conv\d+_block\d+|pool\d+)_",
        imagenet_file="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", pretrainable=True,
        description="DenseNet-121 (58 dense layers + 3 transitions); reports A, B",
        num_blocks=62, params=7_037_504, keras_module="densenet",
    ),
    BackboneSpec(
        name="vgg16", builder=_keras_app("VGG16"), default_size=224, min_size=32, preprocess="caffe",
        gradcam_layer="block5_conv3", block_pattern=r"^(block\d+)_",
        imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", pretrainable=True,
        description="VGG-16 (13 convs in 5 blocks); reports A, B",
        num_blocks=5, params=14_714_688, keras_module="vgg16",
    ),
    BackboneSpec(
        name="mobilenet_v2", builder=_keras_app("MobileNetV2"), default_size=224, min_size=32, preprocess="tf",
        gradcam_layer="out_relu", block_pattern=r"^(expanded_conv|block_\d+)_",
        imagenet_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", pretrainable=True,
        description="MobileNetV2 1.0 (stem + 17 inverted-residual blocks); small and fast",
        num_blocks=18, params=2_257_984, keras_module="mobilenet_v2",
    ),
    BackboneSpec(
        name="efficientnet_b0", builder=_keras_app("EfficientNetB0"), default_size=224, min_size=32,
        preprocess="none", gradcam_layer="top_activation", block_pattern=r"^(block\d[a-z])_",
        imagenet_file="efficientnetb0_notop.h5", pretrainable=True,
        description="EfficientNet-B0 (stem + 16 MBConv blocks; normalizes inside the model)",
        num_blocks=17, params=4_049_571, keras_module="efficientnet",
    ),
)

for _spec in _APPS:
    register_backbone(_spec)

# --------------------------------------------------------------------------- the small CNNs

# params at 28x28x3: conv1 3*4*64+64=832, conv2 64*4*64+64=16448, (conv3 16448),
# features 14*14*64*64+64=802880
ARC2 = register_backbone(BackboneSpec(
    name="arc2", builder=small.build_arc2, default_size=28, min_size=8, preprocess="unit",
    gradcam_layer="conv2", block_pattern=r"^(conv\d+)", imagenet_file=None, pretrainable=False,
    description="report E 'Arc2': conv64-2x2, maxpool, dropout, conv64-2x2, dropout, FC64",
    pooling="none", num_blocks=2, params=832 + 16_448 + 802_880,
))

ARC3 = register_backbone(BackboneSpec(
    name="arc3", builder=small.build_arc3, default_size=28, min_size=8, preprocess="unit",
    gradcam_layer="conv3", block_pattern=r"^(conv\d+)", imagenet_file=None, pretrainable=False,
    description="report E 'Arc3': Arc2 with one more conv64-2x2 + dropout",
    pooling="none", num_blocks=3, params=832 + 2 * 16_448 + 802_880,
))
