"""Where a backbone's weights come from, and the checks that they are what the user asked for.

* :func:`resolve_weights`: ``"imagenet"``, ``"none"`` or a PATH (a Keras weights file, or a
  ``.keras`` model of an earlier run), refused with a hint when it cannot be one.
* :func:`build_backbone`: the backbone built with them -- ImageNet weights from the Keras cache
  (:func:`keras_cache_dir`, :func:`imagenet_file_for`; downloaded if online, or refused at once
  with ``TRANSFER_OFFLINE=1``), a weights file checked to fill every layer
  (Keras only warns), or random weights.
* :func:`copy_from_keras` / :func:`copy_weights_by_name`: an earlier run's weights copied layer
  by layer by name.
* :func:`fold_efficientnet_imagenet_scale`: an EfficientNet loaded from a PATH given the input
  normalization Keras adds only for ``weights="imagenet"``.

:func:`transfer.models.build.build_classifier` calls these; Keras is imported when they run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .._lazy import import_keras
from ..errors import ModelError, WeightsUnavailableError
from .registry import BackboneSpec

#: ImageNet statistics used by Keras's ``preprocess_input`` (modes "torch" and "caffe").
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

_MOBILENET_V2_ROWS = (96, 128, 160, 192, 224)


def resolve_weights(spec: BackboneSpec, weights: Any) -> tuple[str, Path | None]:
    """What ``weights`` names: ``("imagenet"|"none"|"file"|"keras", path)``, or an error a user can act on."""
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



def build_backbone(spec: BackboneSpec, x, kind: str, path: Path | None, shape):
    """The backbone of ``spec`` on the tensor ``x`` with the weights :func:`resolve_weights` named
    (``kind``, ``path``): ImageNet from the Keras cache (or downloaded unless ``TRANSFER_OFFLINE``), a
    weights file that must fill every layer, or random weights."""
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
                    f"{cached} is missing ({brief_error(exc)})",
                    hint=hint,
                ) from exc
            raise WeightsUnavailableError(
                f"could not load the ImageNet weights of {spec.name} from {cached}: {brief_error(exc)}",
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
                f"the weights file {path} does not fit {spec.name} at input {shape[0]}x{shape[1]}: {brief_error(exc)}",
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



def brief_error(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most ``limit`` characters, for an error message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."



def fold_efficientnet_imagenet_scale(model, preprocessing_layers: Sequence[str]) -> bool:
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
    pre = [model.get_layer(n) for n in preprocessing_layers]
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



def copy_from_keras(model, source, path: Path, *, backbone: str, backbone_layers: Sequence[str]) -> dict:
    """Weights of ``source`` (the ``.keras`` model at ``path``, loaded) copied into ``model`` by
    layer name (:func:`copy_weights_by_name`); ``backbone_layers`` of ``model`` must get some.
    Returns the copy report with ``copied`` (a count) and ``note`` (one line for the logs).

    Raises:
        ModelError: the source shares no backbone layer (same name and shapes) with ``model``.
    """
    res = copy_weights_by_name(model, source)
    body = set(backbone_layers)
    n_body = sum(1 for n in res["copied"] if n in body)
    body_with_weights = [n for n in backbone_layers if model.get_layer(n).weights]
    if n_body == 0:
        raise ModelError(
            f"{path} shares no backbone layer (same name and shapes) with {backbone}: nothing to copy",
            hint=f"pass a .keras saved by an earlier run of the same backbone ({backbone})",
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
