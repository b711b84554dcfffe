"""Classifier heads at serving time: the network's softmax, a classical head as ONNX or pickle."""

from __future__ import annotations

import os

import numpy as np

from ..bundle import Bundle, UntrustedBundleError
from ..errors import BundleError, ConfigError, TamperedBundleError
from ..fsutil import sha256_file
from .predict_config import ModelOptions, check_value
from .sessions import make_session


class Head:
    """``probs = head(features, network_probs)``."""

    name = "network"

    def __call__(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return probs


class OnnxHead(Head):
    """A skl2onnx head run by ONNX Runtime: no scikit-learn needed, and no code in the file.

    Args:
        path: the head's ONNX graph (input ``features``, output ``probabilities`` by default).
        name: the head's name (``rf``).
        check: called with the session before it runs (a bundle's head: its graph against the manifest).
    """

    def __init__(self, path: str | os.PathLike, name: str, *, input: str = "features", output: str = "probabilities",
                 check=None):
        # a head is a short call after the model: idle threads that spin for work afterwards cost
        # ~9 ms of CPU per call at low load (measured in transfer serve) for no speed
        self.session, _ = make_session(path, "cpu", spinning=False)
        if check is not None:
            check(self.session)
        self.input, self.output, self.name = input, output, name

    @classmethod
    def of_bundle(cls, bundle: Bundle, name: str) -> "OnnxHead":
        """The bundle's head ``name``, its graph checked against the manifest on the session that runs it."""
        entry = bundle.heads[name]
        return cls(bundle.paths[entry["onnx"]], name, input=entry.get("input", "features"),
                   output=entry.get("output", "probabilities"),
                   check=lambda session: bundle.check_head_graph(name, session))

    def __call__(self, features, probs):
        return self.session.run([self.output], {self.input: features.astype(np.float32)})[0]


class PickleHead(Head):
    """The pickled scikit-learn head. A pickle runs code when it is loaded, so it is unpickled
    only from a bundle signed by a trusted key, or when the caller says it trusts the bundle
    (``trust_pickle``), and only from bytes whose SHA-256 matches the manifest again."""

    def __init__(self, bundle: Bundle, name: str, *, trust_pickle: bool = False):
        entry = bundle.heads[name]
        check_pickle_trust(bundle, name, trust_pickle)
        path = bundle.paths[entry["pickle"]]
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


def check_pickle_trust(bundle: Bundle, name: str, trust_pickle: bool = False) -> None:
    """Refuse to unpickle head ``name`` unless the bundle is signed by a trusted key or the
    caller trusts it explicitly.

    Raises:
        UntrustedBundleError: naming why and the safe alternatives.
    """
    if bundle.trusted or trust_pickle:
        return
    why = (f"it is signed by {bundle.signer}, but no trusted keys are configured" if bundle.signer
           else "the bundle is not signed by a trusted key")
    raise UntrustedBundleError(
        f"refusing to unpickle head {name!r} of {bundle.path}: a pickle runs code when it is loaded, and {why}",
        hint="run the head's ONNX form (the same head, no code in it), or trust the bundle: sign it "
             "(`transfer export RUN --sign KEY`) and trust its public key (`--trust KEY.pub` or TRANSFER_TRUST), "
             "or, if you know where it came from, allow it explicitly (`transfer infer ... --trust-pickle`)",
        option="head_format")


def check_head(bundle: Bundle, name: str | None, fmt: str = "onnx", *, trust_pickle: bool = False) -> None:
    """Refuse a head or format the bundle cannot serve, without loading anything (a pickle that
    may not be unpickled included).

    Raises:
        BundleError: no such head, or it was exported without the asked form.
        UntrustedBundleError: a pickle from a bundle that is not trusted.
        ConfigError: unknown format.
    """
    fmt = check_value(ModelOptions, "head_format", fmt)
    if not name or name == "network":
        return
    entry = bundle.heads.get(name) or bundle.head_entry(name)  # head_entry: the error naming the heads there are
    if not entry.get(fmt):
        raise BundleError(f"head {name!r} of bundle {bundle.path} has no {fmt} form",
                          hint=f"run its {'pickle' if fmt == 'onnx' else 'onnx'} form", option="head_format")
    if fmt == "pickle":
        check_pickle_trust(bundle, name, trust_pickle)


def make_head(bundle: Bundle, name: str | None = None, fmt: str = "onnx", *, trust_pickle: bool = False) -> Head:
    """``network`` (default) or a bundled classical head in ``onnx`` or ``pickle`` form.

    A pickle is unpickled only when the bundle is :attr:`~transfer.bundle.Bundle.trusted`
    (signed by a trusted key) or ``trust_pickle`` is set.

    Raises:
        BundleError: the bundle has no such head.
        UntrustedBundleError: a pickle from a bundle that is not trusted.
        TamperedBundleError: the head's graph is not what the manifest says.
        ConfigError: unknown format.
    """
    check_head(bundle, name, fmt, trust_pickle=trust_pickle)
    if not name or name == "network":
        return Head()
    if fmt == "onnx":
        return OnnxHead.of_bundle(bundle, name)
    return PickleHead(bundle, name, trust_pickle=trust_pickle)


__all__ = ["Head", "OnnxHead", "PickleHead", "check_head", "check_pickle_trust", "make_head", "BundleError"]
