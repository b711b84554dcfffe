"""Classifier heads at serving time: the network's softmax, a classical head as ONNX or pickle."""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, ConfigError, TamperedBundleError
from ..fsutil import sha256_file


class Head:
    """``probs = head(features, network_probs)``."""

    name = "network"

    def __call__(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return probs


class OnnxHead(Head):
    """A skl2onnx head run by ONNX Runtime: no scikit-learn needed."""

    def __init__(self, bundle: Bundle, name: str):
        import onnxruntime as ort

        entry = bundle.head_entry(name)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(bundle.file(entry["onnx"])), so, providers=["CPUExecutionProvider"])
        self.input, self.output = entry.get("input", "features"), entry.get("output", "probabilities")
        self.name = name

    def __call__(self, features, probs):
        return self.session.run([self.output], {self.input: features.astype(np.float32)})[0]


class PickleHead(Head):
    """The pickled scikit-learn head, unpickled only after its SHA-256 matches the manifest."""

    def __init__(self, bundle: Bundle, name: str):
        entry = bundle.head_entry(name)
        path = bundle.file(entry["pickle"])
        expected = bundle.manifest["files"][entry["pickle"]]["sha256"]
        if sha256_file(path) != expected:  # re-checked here: the pickle is code, never trust it stale
            raise TamperedBundleError(f"{path}: SHA-256 does not match the manifest; refusing to unpickle it",
                                      hint="re-export the bundle")
        try:
            import pickle

            import sklearn  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"the pickled head needs scikit-learn ({exc})",
                              hint="pip install scikit-learn, or run the head's ONNX form (no scikit-learn needed)",
                              option="head_format") from exc
        with open(path, "rb") as fh:
            self.est = pickle.load(fh)
        self.name = name

    def __call__(self, features, probs):
        return np.asarray(self.est.predict_proba(features.astype(np.float32)), dtype=np.float32)


def check_head(bundle: Bundle, name: str | None, fmt: str = "onnx") -> None:
    """Refuse a head or format the bundle cannot serve, without loading anything.

    Raises:
        BundleError: no such head, or it was exported without the asked form.
        ConfigError: unknown format.
    """
    if fmt not in ("onnx", "pickle"):
        raise ConfigError(f"invalid head format {fmt!r}; accepted: onnx, pickle", option="head_format")
    if not name or name == "network":
        return
    entry = bundle.head_entry(name)
    if not entry.get(fmt):
        raise BundleError(f"head {name!r} of bundle {bundle.path} has no {fmt} form",
                          hint=f"run its {'pickle' if fmt == 'onnx' else 'onnx'} form", option="head_format")


def make_head(bundle: Bundle, name: str | None = None, fmt: str = "onnx") -> Head:
    """``network`` (default) or a bundled classical head in ``onnx`` or ``pickle`` form.

    Raises:
        BundleError: the bundle has no such head.
        ConfigError: unknown format.
    """
    check_head(bundle, name, fmt)
    if not name or name == "network":
        return Head()
    if fmt == "onnx":
        return OnnxHead(bundle, name)
    return PickleHead(bundle, name)


__all__ = ["Head", "OnnxHead", "PickleHead", "check_head", "make_head", "BundleError"]
