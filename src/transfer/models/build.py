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

Set the environment variable ``TRANSFER_OFFLINE=1`` to fail at once, without trying to
download, when the ImageNet weights are not in the Keras cache.
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
from ..errors import ConfigError, ModelError, RunFolderError, WeightsUnavailableError
from .registry import BackboneSpec, get_backbone

log = logging.getLogger("transfer.models")

#: Names of the layers the builder adds after the backbone.
HEAD_LAYERS = ("features", "head_dropout", "probs")

#: ImageNet statistics used by Keras's ``preprocess_input`` (modes "torch" and "caffe").
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

_MOBILENET_V2_ROWS = (96, 128, 160, 192, 224)


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


def _resolve_weights(spec: BackboneSpec, weights: Any) -> tuple[str, Path | None]:
    """``("imagenet"|"none"|"file"|"keras", path)``."""
    if weights is None:
        return "none", None
    text = str(weights).strip()
    if text.lower() == "imagenet":
        if not spec.pretrainable or not spec.imagenet_file:
            raise WeightsUnavailableError(
                f"{spec.name} has no ImageNet weights (weights='imagenet' is only for the Keras "
                f"applications)",
                hint="start from weights 'none' (random) or from a PATH (a weights file or an earlier run's .keras)",
                option="weights",
            )
        return "imagenet", None
    if text.lower() == "none":
        return "none", None
    path = Path(text).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file not found: {path}",
            hint="weights are 'imagenet', 'none' or the path of a .weights.h5 / .h5 weights file or a .keras model",
            option="weights",
        )
    name = path.name.lower()
    if name.endswith(".keras"):
        return "keras", path
    if name.endswith(".h5") or name.endswith(".hdf5"):
        return "file", path
    raise WeightsUnavailableError(
        f"cannot read weights from {path}: unknown file type (expected .weights.h5, .h5 or .keras)",
        hint="save weights with model.save_weights('x.weights.h5') or pass an earlier run's model.keras",
    )


def keras_cache_dir() -> Path:
    """The folder where Keras keeps downloaded weights (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    # Keras reads the same variable and default (keras.utils.get_file; no public getter)
    base = os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))
    if not os.access(base, os.W_OK):  # Keras's own fallback (file_utils.get_file)
        base = os.path.join("/tmp", ".keras")
    return Path(base) / "models"


def imagenet_file_for(spec: BackboneSpec, input_shape: Sequence[int] | None = None) -> str | None:
    """The exact Keras cache file name of the no-top ImageNet weights for this input shape.

    MobileNetV2 has one file per input size 96/128/160/192/224 and uses the 224 file
    for any other size; the others have one file.

    Example::

        imagenet_file_for(get_backbone("mobilenet_v2"), (96, 96, 3))
        # 'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5'
    """
    if spec.name == "mobilenet_v2" and input_shape is not None:
        h, w = int(input_shape[0]), int(input_shape[1])
        rows = h if (h == w and h in _MOBILENET_V2_ROWS) else 224
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    return spec.imagenet_file


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


def _call_builder(spec: BackboneSpec, x, kind: str, path: Path | None, shape):
    keras_weights = {"imagenet": "imagenet", "file": str(path) if path else None}.get(kind)
    if kind == "imagenet":
        fname = imagenet_file_for(spec, shape)
        cached = keras_cache_dir() / fname
        where = f"{cached.parent}{os.sep}"
        hint = (f"on a machine with internet run the same command once (Keras downloads {fname}), or copy "
                f"{fname} into {where}; or start from a weights file (PATH) or from 'none' (random weights)")
        if os.environ.get("TRANSFER_OFFLINE", "").strip().lower() not in ("", "0", "false", "no") and not cached.is_file():
            raise WeightsUnavailableError(
                f"ImageNet weights of {spec.name} are not in the Keras cache ({cached}) and TRANSFER_OFFLINE is set",
                hint=hint,
            )
        try:
            return spec.builder(x, keras_weights)
        except Exception as exc:  # Keras raises a bare Exception on a failed download
            if not cached.is_file():
                raise WeightsUnavailableError(
                    f"ImageNet weights of {spec.name} are not in the Keras cache and could not be downloaded: "
                    f"{cached} is missing ({_short(exc)})",
                    hint=hint,
                ) from exc
            raise WeightsUnavailableError(
                f"could not load the ImageNet weights of {spec.name} from {cached}: {_short(exc)}",
                hint="the file may be incomplete: delete it and retry online, or start from a weights file (PATH)",
            ) from exc
    if kind == "file":
        hint = (f"pass the no-top weights of {spec.name} (e.g. saved by keras.applications with "
                "include_top=False, or the ImageNet '..._notop.h5' file); to start from an earlier "
                "run pass its trials/<trial>/model.keras")
        try:
            base = spec.builder(x, keras_weights)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"the weights file {path} does not fit {spec.name} at input {shape[0]}x{shape[1]}: {_short(exc)}",
                hint=hint,
            ) from exc
        not_loaded = _layers_not_in_file(base, path)
        if not_loaded:
            raise WeightsUnavailableError(
                f"the weights file {path} does not fit {spec.name} at input {shape[0]}x{shape[1]}: "
                f"{len(not_loaded)} layers got no weights from it (e.g. {', '.join(not_loaded[:4])})",
                hint=hint,
            )
        return base
    return spec.builder(x, None)


def _layers_not_in_file(base, path: Path) -> list[str]:
    """Layers of ``base`` whose weights are not all arrays stored in the h5 file ``path``.

    Keras 3 only warns when a ``.weights.h5`` file does not match the model and leaves
    the layers it could not fill with random weights; this check turns that into an
    error. It compares values: every weight array of the model must be one of the
    file's datasets (same shape and bytes).
    """
    import hashlib

    import h5py
    import numpy as np

    def key(a) -> tuple:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
        return a.shape, hashlib.sha1(a.tobytes()).hexdigest()

    stored: set = set()

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiub":
            stored.add(key(obj[()]))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    bad = []
    for layer in base.layers:
        if any(key(w) not in stored for w in layer.get_weights()):
            bad.append(layer.name)
    return bad


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    try:
        dropout = float(dropout)
    except (TypeError, ValueError):
        dropout = float("nan")
    if not (0.0 <= dropout < 1.0):
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    kind, path = _resolve_weights(spec, weights)

    keras = import_keras()
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    with _fresh_layer_names():
        image = keras.Input(shape=shape, name="image", dtype="float32")
        pre = preprocessing_layer(spec.preprocess)
        x = pre(image) if pre is not None else image
        base = _call_builder(spec, x, kind, path, shape)
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
        report = _copy_from_keras(model, info, path)
        info = BuildInfo(**{**info.__dict__, "copied_layers": report["copied"], "weights_note": report["note"]})
    else:
        note = {"imagenet": f"ImageNet weights ({imagenet_file_for(spec, shape)})",
                "none": "random initial weights" + (f" (seed {seed})" if seed is not None else ""),
                "file": f"weights file {path}"}[kind]
        info = BuildInfo(**{**info.__dict__, "weights_note": note})
    if kind in ("file", "keras") and _fold_efficientnet_imagenet_scale(model, info):
        info = BuildInfo(**{**info.__dict__, "weights_note": info.weights_note + (
            "; ImageNet input normalization: Keras's extra 1/sqrt(std) rescaling folded into the variance")})
    log.info("%s: %s", spec.name, info.weights_note)
    return model, info


def _fold_efficientnet_imagenet_scale(model, info: BuildInfo) -> bool:
    """Give an EfficientNet loaded from a PATH the input normalization of ``weights="imagenet"``.

    Keras's EfficientNet adds a ``Rescaling(1/sqrt(std))`` after its ``Normalization``
    only when built with ``weights="imagenet"`` (keras-team/keras, tensorflow#49930); the
    ImageNet statistics live in the weights file. Built with a PATH (the downloaded
    ImageNet file, or an earlier ImageNet-started run), the graph lacks that layer. When
    the loaded statistics are ImageNet's (variance = std**2), fold the factor into the
    variance (``var * std``), which computes the same function. Returns True if it did.
    """
    import numpy as np

    keras = import_keras()
    pre = [model.get_layer(n) for n in info.preprocessing_layers]
    norms = [layer for layer in pre if isinstance(layer, keras.layers.Normalization)
             and getattr(layer, "adapt_variance", None) is not None]
    if len(norms) != 1 or len(pre) != 2:  # the ImageNet graph has rescaling, normalization, rescaling_1
        return False
    norm = norms[0]
    mean = np.asarray(norm.adapt_mean.numpy(), dtype=np.float64).ravel()
    var = np.asarray(norm.adapt_variance.numpy(), dtype=np.float64).ravel()
    std = np.asarray(IMAGENET_STD_RGB)
    if var.shape != (3,) or not (np.allclose(var, std**2, rtol=1e-2) and np.allclose(mean, IMAGENET_MEAN_RGB, rtol=1e-2)):
        return False
    norm.adapt_variance.assign((var * np.sqrt(var)).astype(norm.adapt_variance.dtype))
    norm.finalize_state()
    return True


def copy_weights_by_name(target, source, *, only: Sequence[str] | None = None) -> dict:
    """Copy weights from ``source`` into ``target`` for every layer with the same name and shapes.

    Args:
        target: the model receiving weights.
        source: the model giving them.
        only: restrict to these target layer names.

    Returns:
        ``{"copied": [names], "shape_mismatch": [names], "missing": [names]}`` over the
        target layers that have weights.

    Example::

        copy_weights_by_name(new_model, old_model)["copied"][:2]
        # ['Conv1', 'bn_Conv1']
    """
    src = {layer.name: layer for layer in source.layers if layer.weights}
    wanted = set(only) if only is not None else None
    copied, mismatch, missing = [], [], []
    for layer in target.layers:
        if not layer.weights or (wanted is not None and layer.name not in wanted):
            continue
        s = src.get(layer.name)
        if s is None:
            missing.append(layer.name)
            continue
        sw, tw = s.get_weights(), layer.get_weights()
        if len(sw) != len(tw) or any(a.shape != b.shape for a, b in zip(sw, tw)):
            mismatch.append(layer.name)
            continue
        layer.set_weights(sw)
        copied.append(layer.name)
    return {"copied": copied, "shape_mismatch": mismatch, "missing": missing}


def _copy_from_keras(model, info: BuildInfo, path: Path) -> dict:
    source = load_model(path)
    res = copy_weights_by_name(model, source)
    body = set(info.backbone_layers)
    n_body = sum(1 for n in res["copied"] if n in body)
    body_with_weights = [n for n in info.backbone_layers if model.get_layer(n).weights]
    if n_body == 0:
        raise ModelError(
            f"{path} shares no backbone layer (same name and shapes) with {info.backbone}: nothing to copy",
            hint=f"pass a .keras saved by an earlier run of the same backbone ({info.backbone})",
        )
    head = [n for n in res["copied"] if n not in body]
    note = (f"copied weights of {len(res['copied'])} layers from {path} "
            f"({n_body}/{len(body_with_weights)} backbone layers with weights"
            f"{', head: ' + ','.join(head) if head else ', head not copied'})")
    if res["shape_mismatch"]:
        note += f"; shapes differ, kept fresh: {', '.join(res['shape_mismatch'][:8])}"
    if "probs" in res["shape_mismatch"]:
        note += " (class count differs)"
    return {**res, "copied": len(res["copied"]), "note": note}


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
            f"cannot load the model {p}: {_short(exc)}",
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

