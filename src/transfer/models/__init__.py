"""models: the backbone registry, the small CNNs, the contract classifier, freeze policies, the
split into a frozen prefix and the part that trains, and Keras -> ONNX (``onnx_convert``).

Importing ``transfer.models`` does not import TensorFlow; the build / freeze functions
import Keras when called.

Example::

    from transfer.models import build_classifier, apply_freeze
    model, info = build_classifier("arc2", input_shape=(28, 28, 3), weights="none", num_classes=10)
    apply_freeze(model, info, 1.0, train_bn=True)
"""

from __future__ import annotations

from .registry import BackboneSpec, get_backbone, list_backbones, register_backbone

__all__ = [
    "BackboneSpec", "register_backbone", "get_backbone", "list_backbones",
    "BuildInfo", "build_classifier", "load_model", "model_info", "backbone_weights", "feature_model",
    "FreezeSummary", "apply_freeze", "count_params", "block_boundaries",
]

_LAZY = {
    "BuildInfo": "build", "build_classifier": "build", "load_model": "build", "model_info": "build",
    "backbone_weights": "build", "feature_model": "build", "copy_weights_by_name": "weights",
    "FreezeSummary": "freeze", "apply_freeze": "freeze", "count_params": "freeze", "block_boundaries": "freeze",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'transfer.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
