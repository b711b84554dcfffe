"""Lazy, isolated imports of heavy or optional dependencies."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from .errors import DependencyMissingError

_EXTRA_FOR = {
    "tensorflow": "train",
    "keras": "train",
    "tf2onnx": "train",
    "onnx": "train",
    "skl2onnx": "train",
    "matplotlib": "train",
    "tensorboard": "train",
    "tensorrt": "gpu",
    "cuda": "gpu",
    "ray": "distributed",
    "pyarrow": "distributed",
    "onnxconverter_common": "train",
    "cleanlab": "train",
    "imagehash": "train",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "multipart": "serve",
    "sklearn": None,
    "onnxruntime": None,
}


def require(module: str, *, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`DependencyMissingError` with the install hint.

    Example::

        np = require("numpy")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRA_FOR.get(top)
        what = f" (needed for {purpose})" if purpose else ""
        hint = f'pip install "transfer[{extra}]"' if extra else "pip install transfer"
        raise DependencyMissingError(
            f"the Python package '{top}' is not installed{what}: {exc}", hint=hint
        ) from exc


def import_tensorflow() -> ModuleType:
    """Import TensorFlow quietly and return it.

    TensorFlow's C++ side logs oneDNN / missing-CUDA notices through absl *before* its
    log level is read, straight to file descriptor 2. Those lines are noise for a CPU
    user, so the first import runs with fd 2 pointed at /dev/null (Python exceptions
    are unaffected: they are printed after the descriptor is restored). Set
    ``TRANSFER_DEBUG=1``, or ``TF_CPP_MIN_LOG_LEVEL`` below 3, to see them. (A value of
    3 -- what this function sets, and what child processes such as Ray workers inherit --
    keeps them quiet.)
    """
    return import_quietly("tensorflow", purpose="training and export")


def import_quietly(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` -- TensorFlow, or a package that imports it first (tf2onnx) -- the way
    :func:`import_tensorflow` does: fd 2 silenced while TensorFlow is first imported.

    Raises:
        DependencyMissingError: as :func:`require`.
    """
    import sys

    if module in sys.modules:
        return sys.modules[module]
    loud = os.environ.get("TRANSFER_DEBUG") == "1" or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3").strip() != "3"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if loud or "tensorflow" in sys.modules:
        return require(module, purpose=purpose)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        return require(module, purpose=purpose)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        return require(module, purpose=purpose)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_keras() -> ModuleType:
    """Import Keras 3 on the TensorFlow backend."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import_tensorflow()
    return require("keras", purpose="training and export")
