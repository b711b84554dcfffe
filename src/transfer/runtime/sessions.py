"""ONNX Runtime sessions: the one place they are made (execution providers, threads, spinning).

Every session of the package comes from here: a bundle's model (:func:`make_session`, behind
:class:`~transfer.runtime.runners.OrtRunner`), a classical head's graph (the same, spinning
off), and the light session that only reads a file's inputs, outputs and metadata
(:func:`light_session`, for ``transfer verify``'s graph checks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, DependencyMissingError
from ..fsutil import sha256_file, user_cache_dir
from .predict_config import ModelOptions, check_value

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
    value = requested if isinstance(requested, str) else ",".join(str(r) for r in requested)
    return [r.strip() for r in check_value(ModelOptions, "providers", value).split(",")]


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


def physical_cores(cpus: Sequence[int] | None = None, *, sysfs: str | os.PathLike = "/sys/devices/system/cpu") -> int:
    """Physical cores among ``cpus`` (default: the CPUs this process may run on).

    Hyper-threads of one core share its ``(physical_package_id, core_id)`` in Linux's sysfs
    topology; they are counted once. Where the topology cannot be read (non-Linux, a
    restricted container) every logical CPU counts as a core.

    Example::

        physical_cores()  # 8 on an 8-core / 16-thread machine
    """
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = Path(sysfs) / f"cpu{c}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def default_threads() -> int:
    """Intra-op threads when none are asked for (the one rule of ``infer``, ``serve``, ``bench``
    and export verification): the physical cores this process may use, less one, at least one.

    Physical cores, as ONNX Runtime counts them for its own default (``intra_op_num_threads =
    0``: ``onnxruntime/core/util/thread_utils.cc``; "by default, ort will create one thread on
    each of your physical cores", microsoft/onnxruntime#12819), but counted on the CPUs this
    process may run on (``taskset``, a container's cpuset; ONNX Runtime counts the machine's:
    microsoft/onnxruntime#29510, #8313): one inference thread per hyper-thread only adds
    contention. Less one, because a model never runs alone here: ``transfer infer`` decodes
    the next batches in its ``--workers`` threads meanwhile, ``transfer serve`` reads, decodes
    and answers requests. Measured on 2 cores (docs/benchmarks.md, "ONNX Runtime threads"): one
    thread served 1.8x (arc2) and 1.6x (MobileNetV2) the answers/s of two spinning threads and
    ran ``transfer infer`` on MobileNetV2 1.4x faster at two thirds of the CPU per image. A
    cgroup CPU quota without a cpuset is not seen.
    """
    return max(1, physical_cores() - 1)


#: the GPU execution providers whose options make_session sets
CUDA, TENSORRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"


def ort_trt_cache_dir(model_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps the engines and timing cache it builds for a model.

    Outside the bundle: a bundle's files are hashed and may be read-only, and its folder
    is replaced by ``transfer export --force``. One folder per model content (the first 16
    hex digits of its SHA-256) under ``root`` (default ``$TRANSFER_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/transfer``, else ``~/.cache/transfer``), ``ort-trt/<hash>/``. ONNX
    Runtime keys the engine files inside it by graph, compute capability and TensorRT
    version itself.
    """

    return Path(user_cache_dir() if root is None else root) / "ort-trt" / sha256_file(model_path)[:16]


def provider_options(provider: str, model_path: str | os.PathLike | None = None, *, device_id: int = 0,
                     fp16: bool = False, tf32: bool = False, cache_dir: str | os.PathLike | None = None) -> dict:
    """The options ``make_session`` gives one execution provider (strings, as ONNX Runtime parses them).

    * ``CUDAExecutionProvider``: ``device_id``; ``use_tf32`` = 0 unless ``tf32`` (ONNX
      Runtime enables TF32 for float32 GEMM / convolutions by default -- ``use_tf32{true}``
      in ``cuda_execution_provider_info.h`` -- which makes an "fp32" run differ from fp32).
    * ``TensorrtExecutionProvider``: ``device_id``; ``trt_fp16_enable`` when ``fp16`` (off
      by default: an fp32 model stays fp32); ``trt_engine_cache_enable`` with
      ``trt_engine_cache_path`` and ``trt_timing_cache_enable`` with
      ``trt_timing_cache_path`` in :func:`ort_trt_cache_dir` (or ``cache_dir``), so the
      engine is built once per model and machine instead of at every session.
    * any other provider: no options.

    Option names as ONNX Runtime parses them (microsoft/onnxruntime
    ``onnxruntime/core/providers/{cuda,tensorrt}/*_execution_provider_info.cc``).

    Example::

        provider_options("TensorrtExecutionProvider", "bundle/model.onnx", fp16=True)
    """
    if provider == CUDA:
        return {"device_id": str(int(device_id)), "use_tf32": "1" if tf32 else "0"}
    if provider == TENSORRT:
        opts = {"device_id": str(int(device_id)), "trt_fp16_enable": "True" if fp16 else "False"}
        folder = Path(cache_dir) if cache_dir is not None else ort_trt_cache_dir(model_path)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # an unwritable home: run, only without reusing engines
            import logging

            logging.getLogger(__name__).warning("TensorRT engine cache disabled: cannot create %s (%s)", folder, exc)
            return {**opts, "trt_engine_cache_enable": "False", "trt_timing_cache_enable": "False"}
        return {**opts, "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder),
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(folder)}
    return {}


def make_session(path: str | os.PathLike, providers: Sequence[str] | str | None = None, *,
                 threads: int | None = None, provider_options: dict | Sequence[dict] | None = None,
                 device_id: int = 0, fp16: bool = False, spinning: bool = True):
    """An ``InferenceSession`` with full graph optimization; returns ``(session, provider that runs)``.

    Args:
        path: the ONNX model.
        providers: see :func:`choose_providers`.
        threads: intra-op threads (default :func:`default_threads`: the physical cores).
        provider_options: overrides of the options :func:`provider_options` gives each
            provider: a dict ``{provider name or alias: {option: value}}`` (merged over the
            defaults) or a list aligned with the chosen providers (used as given).
        device_id / fp16: passed to :func:`provider_options` (GPU providers only).
        spinning: whether idle intra-op threads spin for the next piece of work
            (``session.intra_op.allow_spinning``). ONNX Runtime spins by default, which
            is fastest for back-to-back calls; ``False`` for calls with gaps between them
            on cores other threads need (a server's event loop and decoding, a head's short
            call after the model).

    Raises:
        ConfigError: a provider is unavailable, ``threads`` < 1, or ``provider_options``
        names a provider that is not used.

    Example::

        sess, used = make_session("bundle/model.onnx", "cuda", provider_options={"cuda": {"device_id": 1}})
    """
    ort = _ort()
    threads = check_value(ModelOptions, "threads", threads)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or default_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provs = choose_providers(providers)
    opts = _options_for(provs, path, provider_options, device_id=device_id, fp16=fp16)
    sess = ort.InferenceSession(str(Path(path)), so, providers=provs, provider_options=opts)
    return sess, sess.get_providers()[0]


def light_session(path: str | os.PathLike):
    """A CPU session with graph optimizations off and one thread: enough to read a file's inputs,
    outputs and metadata (:func:`transfer.onnx_facts.facts_of_session`), e.g. to check a
    bundle's graphs against its manifest without running them."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _options_for(provs: list[str], path, overrides, **kw) -> list[dict]:
    if overrides is not None and not isinstance(overrides, dict):
        given = [dict(o or {}) for o in overrides]
        if len(given) != len(provs):
            raise ConfigError(f"{len(given)} provider option sets for {len(provs)} providers ({', '.join(provs)})")
        return [{k: str(v) for k, v in o.items()} for o in given]
    out = [provider_options(p, path, **kw) for p in provs]
    for name, extra in (overrides or {}).items():
        full = provider_name(name, provs)
        if full not in provs:
            raise ConfigError(f"options for {name!r}, which is not among the providers used ({', '.join(provs)})")
        out[provs.index(full)].update({k: str(v) for k, v in (extra or {}).items()})
    return out
