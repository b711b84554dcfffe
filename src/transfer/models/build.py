"""Build a classifier that follows the model contract, and load saved ones.

The graph is one flat functional model (docs/design.md, "The model contract")::

    Input "image" (None, H, W, 3) float32 RGB 0..255
      -> preprocessing layers ("preprocess": the backbone's own preprocess_input mode)
      -> backbone layers (keras.applications.X(input_tensor=..., include_top=False): inlined)
      -> GlobalAveragePooling2D "features"   (the small CNNs: their Dense(64) "features")
      -> Dropout "head_dropout" -> Dense(num_classes, softmax) "probs"

Preprocessing layers are built-in ``Rescaling`` ("tf", "unit"; per-channel scale and
offset for "torch"), or the weightless :class:`~transfer.models.layers.ChannelAffine`
("caffe": RGB -> BGR minus the ImageNet mean). None of them has weights, so a backbone
weights file loads exactly as into the stand-alone Keras application. They survive
``.keras`` save / load (with :func:`load_model`) and tf2onnx conversion.

Weights: ``"imagenet"`` (Keras's cache, downloaded if online), ``"none"`` (random,
``seed`` makes it reproducible) or a PATH: a Keras weights file (``.weights.h5`` or a
legacy ``.h5`` such as a downloaded no-top ImageNet file) that Keras loads into the
backbone, or a ``.keras`` model of an earlier run whose weights are copied layer by
layer by name (transfer from your own pretraining).

Where the weights come from and their checks are :mod:`transfer.models.weights`; set the
environment variable ``TRANSFER_OFFLINE=1`` to fail at once, without trying to download, when
the ImageNet weights are not in the Keras cache.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .._lazy import import_keras
from ..errors import ConfigError, ModelError, RunFolderError
from ..options import check_int
from .registry import BackboneSpec, get_backbone
from .weights import (
    CAFFE_MEAN_BGR,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    brief_error,
    build_backbone,
    copy_from_keras,
    fold_efficientnet_imagenet_scale,
    imagenet_file_for,
    resolve_weights,
)

log = logging.getLogger("transfer.models")

#: Names of the layers the builder adds after the backbone.
HEAD_LAYERS = ("features", "head_dropout", "probs")


@dataclass(frozen=True)
class BuildInfo:
    """What :func:`build_classifier` built (enough for freezing, Grad-CAM and trial.json).

    Attributes:
        backbone: registry name.
        input_shape: ``(H, W, 3)``.
        backbone_layers: names of the backbone layers in graph order (no input,
            preprocessing, pooling or head layers).
        gradcam_layer: the Grad-CAM target layer (last spatial conv / activation).
        feature_dim: width ``D`` of the ``features`` output.
        num_classes: width ``C`` of ``probs``.
        preprocess: the preprocessing mode inside the graph.
        preprocessing_layers: names of the (always frozen) preprocessing layers,
            including a backbone's own leading Rescaling / Normalization (EfficientNet).
        head_layers: names of the (always trainable) layers after the backbone.
        weights: what the weights came from: ``"imagenet"``, ``"none"`` or the path.
        copied_layers: with a ``.keras`` PATH, how many layers got weights copied.
        weights_note: one line on where the weights came from (for logs).
    """

    backbone: str
    input_shape: tuple[int, int, int]
    backbone_layers: tuple[str, ...]
    gradcam_layer: str
    feature_dim: int
    num_classes: int
    preprocess: str
    preprocessing_layers: tuple[str, ...] = ()
    head_layers: tuple[str, ...] = HEAD_LAYERS
    weights: str = "none"
    copied_layers: int | None = None
    weights_note: str | None = None


# --------------------------------------------------------------------------- checks


def _check_input_shape(spec: BackboneSpec, input_shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
        ok = len(shape) == 3 and all(float(a) == float(b) for a, b in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"{spec.name}: input_shape must be (height, width, 3), got {input_shape!r}",
            hint=f"for example ({spec.default_size}, {spec.default_size}, 3)",
        )
    h, w, c = shape
    if c != 3:
        raise ConfigError(
            f"{spec.name}: the model takes RGB images (3 channels), got {c} channels in input_shape {shape}",
            hint="images are always decoded to RGB; pass (H, W, 3)",
        )
    if min(h, w) < spec.min_size:
        raise ConfigError(
            f"{spec.name}: input size {h}x{w} is below its minimum of {spec.min_size}x{spec.min_size}",
            hint=f"use an image size of at least {spec.min_size} (its default is {spec.default_size})",
        )
    return shape


# --------------------------------------------------------------------------- graph pieces


@contextlib.contextmanager
def _fresh_layer_names():
    """Give auto-named layers (``conv2d``, ``add``, ...) the same names in every build.

    Keras numbers auto-named layers per process (``conv2d_7``); building inside a fresh
    counter makes names independent of what was built before, so weights can be copied
    by name between runs. The counter is restored afterwards.
    """
    try:  # Keras has no public API for its name counters; keras.utils.clear_session would reset everything
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover
        yield
        return
    old = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        global_state.set_global_attribute(
            "object_name_uids", old if old is not None else collections.defaultdict(int)
        )


def preprocessing_layer(mode: str):
    """The Keras layer computing ``preprocess_input`` of ``mode`` on RGB 0..255 (``None`` for "none").

    Example::

        preprocessing_layer("tf")   # Rescaling(1/127.5, offset=-1), named "preprocess"
    """
    keras = import_keras()
    if mode == "tf":
        return keras.layers.Rescaling(scale=1.0 / 127.5, offset=-1.0, name="preprocess")
    if mode == "unit":
        return keras.layers.Rescaling(scale=1.0 / 255.0, name="preprocess")
    if mode == "torch":
        # (x / 255 - mean) / std == x * (1 / (255 std)) - mean / std, per channel. A Rescaling
        # (constants created inside call) rather than Normalization, whose fixed mean /
        # variance become captured tensors that tf2onnx turns into extra graph inputs.
        scale = [1.0 / (255.0 * s) for s in IMAGENET_STD_RGB]
        offset = [-m / s for m, s in zip(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)]
        return keras.layers.Rescaling(scale=scale, offset=offset, name="preprocess")
    if mode == "caffe":
        from .layers import ChannelAffine

        return ChannelAffine(order=(2, 1, 0), scale=(1.0, 1.0, 1.0),
                             offset=tuple(-m for m in CAFFE_MEAN_BGR), name="preprocess")
    if mode == "none":
        return None
    raise ConfigError(f"unknown preprocess mode {mode!r}", hint="use tf, torch, caffe, none or unit")


def model_info(model, backbone: str, *, weights: str = "none") -> BuildInfo:
    """Describe a contract model (built here or loaded with :func:`load_model`) as a :class:`BuildInfo`.

    Args:
        model: a flat classifier with ``image`` / ``features`` / ``probs`` layers.
        backbone: its registry name (``trial.json`` records it).
        weights: recorded in the result.

    Raises:
        ConfigError: unknown backbone.
        ModelError: the model does not follow the contract.

    Example::

        info = model_info(load_model("run/trials/arc2-t000/model.keras"), "arc2")
    """
    keras = import_keras()
    spec = get_backbone(backbone)
    names = [layer.name for layer in model.layers]
    for need in ("image", "features", "probs"):
        if need not in names:
            raise ModelError(f"model {model.name!r} has no layer named {need!r}; it does not follow the model contract")
    pre: list[str] = []
    body: list[str] = []
    head: list[str] = []
    leading = True
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer.name in HEAD_LAYERS:
            head.append(layer.name)
            continue
        if leading and (
            layer.name.startswith("preprocess")
            or isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization))
        ):
            pre.append(layer.name)
            continue
        leading = False
        body.append(layer.name)
    if isinstance(model.inputs, (list, tuple)) and len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"model {model.name!r} must have one input and one output")
    shape = tuple(int(v) for v in model.inputs[0].shape[1:])
    return BuildInfo(
        backbone=spec.name,
        input_shape=shape,  # type: ignore[arg-type]
        backbone_layers=tuple(body),
        gradcam_layer=spec.gradcam_layer,
        feature_dim=int(model.get_layer("features").output.shape[-1]),
        num_classes=int(model.get_layer("probs").output.shape[-1]),
        preprocess=spec.preprocess,
        preprocessing_layers=tuple(pre),
        head_layers=tuple(head),
        weights=weights,
    )


# --------------------------------------------------------------------------- public API


def build_classifier(
    backbone: str,
    *,
    input_shape: Sequence[int] = (224, 224, 3),
    weights: str | os.PathLike | None = "imagenet",
    num_classes: int,
    dropout: float = 0.0,
    seed: int | None = None,
):
    """Build the contract classifier of ``backbone``.

    Args:
        backbone: a registered name (``transfer backbones`` lists them).
        input_shape: ``(H, W, 3)``; each side at least the backbone's ``min_size``.
        weights: ``"imagenet"``, ``"none"``, or a PATH: a ``.weights.h5`` / ``.h5``
            weights file of the backbone (loaded by Keras), or a ``.keras`` model of an
            earlier run (weights copied layer by layer by name; the head only when the
            class count matches).
        num_classes: width of the softmax (at least 2).
        dropout: dropout rate before ``probs``, in ``[0, 1)``.
        seed: ``keras.utils.set_random_seed(seed)`` before building, so the same seed
            gives the same initial weights.

    Returns:
        ``(model, info)``: the uncompiled ``keras.Model`` and its :class:`BuildInfo`.

    Raises:
        ConfigError: unknown backbone, bad input shape (below the minimum, not 3
            channels), bad ``num_classes`` or ``dropout``.
        WeightsUnavailableError: ImageNet weights not cached and not downloadable
            (names the file to place in the Keras cache), a weights file that is
            missing or does not fit, ``"imagenet"`` for a small CNN.
        ModelError: a ``.keras`` source shares no layer with this backbone.

    Example::

        model, info = build_classifier("mobilenet_v2", input_shape=(32, 32, 3),
                                       weights="none", num_classes=10, seed=0)
        info.feature_dim
        # 1280
    """
    spec = get_backbone(backbone)
    shape = _check_input_shape(spec, input_shape)
    num_classes = check_int(num_classes, "num_classes", minimum=2)
    try:
        dropout = float(dropout)
    except (TypeError, ValueError):
        dropout = float("nan")
    if not (0.0 <= dropout < 1.0):
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    kind, path = resolve_weights(spec, weights)

    keras = import_keras()
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    with _fresh_layer_names():
        image = keras.Input(shape=shape, name="image", dtype="float32")
        pre = preprocessing_layer(spec.preprocess)
        x = pre(image) if pre is not None else image
        base = build_backbone(spec, x, kind, path, shape)
        out = base.output
        if spec.pooling == "avg":
            feats = keras.layers.GlobalAveragePooling2D(name="features")(out)
        else:
            if getattr(out, "_keras_history", None) is None or out._keras_history[0].name != "features":
                raise ModelError(f"builder of {spec.name} must end with a layer named 'features'")
            feats = out
        h = keras.layers.Dropout(dropout, name="head_dropout")(feats)
        probs = keras.layers.Dense(num_classes, activation="softmax", name="probs")(h)
        model = keras.Model(image, probs, name=f"{spec.name}_classifier")

    wlabel = {"imagenet": "imagenet", "none": "none"}.get(kind, str(path))
    info = model_info(model, spec.name, weights=wlabel)
    if kind == "keras":
        report = copy_from_keras(model, load_model(path), path, backbone=info.backbone,
                                 backbone_layers=info.backbone_layers)
        info = BuildInfo(**{**info.__dict__, "copied_layers": report["copied"], "weights_note": report["note"]})
    else:
        note = {"imagenet": f"ImageNet weights ({imagenet_file_for(spec, shape)})",
                "none": "random initial weights" + (f" (seed {seed})" if seed is not None else ""),
                "file": f"weights file {path}"}[kind]
        info = BuildInfo(**{**info.__dict__, "weights_note": note})
    if kind in ("file", "keras") and fold_efficientnet_imagenet_scale(model, info.preprocessing_layers):
        info = BuildInfo(**{**info.__dict__, "weights_note": info.weights_note + (
            "; ImageNet input normalization: Keras's extra 1/sqrt(std) rescaling folded into the variance")})
    log.info("%s: %s", spec.name, info.weights_note)
    return model, info


def load_model(path: str | os.PathLike):
    """Load a ``.keras`` model written by this package (custom objects registered, ``compile=False``).

    Args:
        path: the ``.keras`` file.

    Returns:
        The ``keras.Model``.

    Raises:
        RunFolderError: the file does not exist.
        ModelError: not a ``.keras`` file, or it cannot be read (incomplete / corrupt).

    Example::

        model = load_model("runs/digits/trials/arc2-t000/model.keras")
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise RunFolderError(
            f"model file not found: {p}",
            hint="a trial's model is trials/<trial>/model.keras once it has finished; `transfer train` writes it",
        )
    if not p.name.lower().endswith(".keras"):
        raise ModelError(f"{p} is not a .keras model file", hint="pass a model saved with model.save('x.keras')")
    keras = import_keras()
    from .layers import custom_objects

    try:
        return keras.saving.load_model(str(p), compile=False, custom_objects=custom_objects(), safe_mode=True)
    except Exception as exc:
        raise ModelError(
            f"cannot load the model {p}: {brief_error(exc)}",
            hint="the file may be incomplete or corrupt; re-run the trial that wrote it",
        ) from exc


def backbone_weights(model, info: BuildInfo) -> list:
    """The weight arrays of the backbone layers, in graph order (for comparisons).

    Example::

        ws = backbone_weights(model, info)
    """
    out = []
    for name in info.backbone_layers:
        out.extend(model.get_layer(name).get_weights())
    return out


def feature_model(model):
    """A model sharing ``model``'s layers with two outputs: ``[features, probs]`` (no copy).

    Example::

        feats, probs = feature_model(model).predict(x)
    """
    keras = import_keras()
    return keras.Model(model.inputs, [model.get_layer("features").output, model.output], name=f"{model.name}_features")
