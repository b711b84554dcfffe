"""ONNX Runtime sessions: execution provider choice, threads, and what actually runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, DependencyMissingError

#: preference order when nothing is asked for
PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
           "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - base dependency
        raise DependencyMissingError(f"onnxruntime is not installed: {exc}", hint="pip install transfer") from exc
    return ort


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (``onnxruntime-gpu`` adds CUDA/TensorRT)."""
    return list(_ort().get_available_providers())


def choose_providers(requested: Sequence[str] | str | None = None) -> list[str]:
    """The providers to use, best first.

    Args:
        requested: ``None`` (TensorRT > CUDA > CPU among those available) or names /
            aliases (``cpu``, ``cuda``, ``tensorrt``) in order.

    Raises:
        ConfigError: a requested provider is unknown or not available in this build.

    Example::

        choose_providers("cpu")
        # ['CPUExecutionProvider']
    """
    avail = available_providers()
    if requested is None or requested == "" or requested == []:
        return [p for p in PREFERRED if p in avail] or avail
    out = []
    for r in _items(requested):
        name = provider_name(r, avail)
        if name in out:
            continue  # "cpu,cpu": once
        if name not in avail:
            hint = ("install the GPU build alone: pip uninstall -y onnxruntime onnxruntime-gpu && "
                    "pip install onnxruntime-gpu (see the README, Install)"
                    if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else None)
            raise ConfigError(f"execution provider {r!r} is not available; this onnxruntime offers: {', '.join(avail)}",
                              hint=hint)
        out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")  # fallback for ops the GPU providers do not take
    return out


def _items(requested: Sequence[str] | str) -> list[str]:
    items = [r.strip() for r in requested.split(",")] if isinstance(requested, str) else [str(r).strip() for r in requested]
    if not all(items):
        raise ConfigError(f"invalid providers list {requested!r}: an empty name", hint="e.g. cuda,cpu",
                          option="providers")
    return items


def provider_name(short: str, avail: Sequence[str] = ()) -> str:
    """ONNX Runtime's name for ``short``: an alias (``cpu``, ``cuda``, ``tensorrt``), a
    provider's name without ``ExecutionProvider`` (``Azure``, ``OpenVINO``; any case), or a
    full name.

    Example::

        provider_name("cuda"), provider_name("azure", ["AzureExecutionProvider"])
        # ('CUDAExecutionProvider', 'AzureExecutionProvider')
    """
    low = short.lower()
    if low in ALIASES:
        return ALIASES[low]
    for a in avail:
        if a.lower() in (low, low + "executionprovider"):
            return a
    return short if short.endswith("ExecutionProvider") else f"{short}ExecutionProvider"


def check_provider_names(requested: Sequence[str] | str | None) -> None:
    """Syntax-only check of ``--providers`` (for a driver whose workers may have other builds).

    Raises:
        ConfigError: an empty name.
    """
    if requested:
        _items(requested)


def default_threads() -> int:
    """Intra-op threads: every core the process may use (ORT's own default)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def make_session(path: str | os.PathLike, providers: Sequence[str] | str | None = None, *,
                 threads: int | None = None):
    """An ``InferenceSession`` with full graph optimization; returns ``(session, provider that runs)``.

    Example::

        sess, used = make_session("bundle/model.onnx", "cpu")
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or default_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    provs = choose_providers(providers)
    sess = ort.InferenceSession(str(Path(path)), so, providers=provs)
    return sess, sess.get_providers()[0]
