"""The NVIDIA side of the runtime: is there a GPU with CUDA and TensorRT, and which one.

Imported lazily by the TensorRT runner and by the exporter's engine builder; nothing here
imports TensorFlow. Without a GPU every function fails with
:class:`~transfer.errors.TensorRTUnavailableError` (exit code 3) saying why.

The GPU's identity comes from the CUDA runtime (``cudaGetDevice`` +
``cudaGetDeviceProperties``), not from ``nvidia-smi``: the runtime sees only the devices
``CUDA_VISIBLE_DEVICES`` leaves visible and numbers them as the process does, so the name
and compute capability recorded in a manifest are those of the GPU the engine was built on.

cuda-python 12 and 13 both work. Read against NVIDIA/cuda-python
(``cuda_bindings/cuda/bindings/runtime.pyx.in``, its ``_example_helpers/helper_cuda.py``)
and checked on the installed wheels 12.9.10 and 13.4.4:

* every ``cudart`` call returns a tuple ``(cudaError_t, *values)``; ``int(err) == 0`` is
  success (``cudaError_t`` is an ``IntEnum`` in 12.x and a ``FastEnum`` int subclass in 13.x);
* ``cudaGetErrorString(err)`` itself returns ``(cudaSuccess, bytes)``;
* ``cudaGetDeviceProperties(dev)`` returns ``(err, cudaDeviceProp)`` whose ``name`` is
  ``bytes`` (a NUL-padded ``char[256]``) and ``major`` / ``minor`` ints;
* ``cuda.bindings.runtime`` exists from cuda-python 12.6 on; ``from cuda import cudart``
  works up to 12.x (deprecated there with a ``FutureWarning``) and was removed in 13.0.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import TensorRTUnavailableError, TransferError

INSTALL_HINT = ("TensorRT engines are built and run on NVIDIA machines (pip install \"transfer[gpu]\", see "
                "docs/gpu.md); ONNX Runtime runs the bundle anywhere")


class CudaError(TransferError):
    """A CUDA runtime or TensorRT call failed; the message names the call and CUDA's own text."""


def import_cudart():
    """The CUDA runtime bindings of cuda-python 13 or 12.

    ``cuda.bindings.runtime`` first (cuda-python >= 12.6, the only name in 13.x), then the
    legacy ``cuda.cudart`` (cuda-python 12.0-12.5; removed in 13.0).

    Raises:
        TensorRTUnavailableError: neither module can be imported.
    """
    try:
        from cuda.bindings import runtime as cudart
        return cudart
    except ImportError as exc:
        first = exc
    try:
        from cuda import cudart  # cuda-python < 12.6 only
        return cudart
    except ImportError:
        raise TensorRTUnavailableError(
            f"cuda-python is not installed (neither cuda.bindings.runtime nor cuda.cudart can be imported: {first})",
            hint=INSTALL_HINT) from None


def error_string(cudart, err) -> str:
    """CUDA's description of ``err`` (``cudaGetErrorString``), e.g. ``'out of memory'``."""
    try:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    except Exception:  # noqa: BLE001 - the code is still worth reporting
        text = "unknown CUDA error"
    return f"{text} (cudaError {int(err)})"


def cuda_call(cudart, call: str, result: Any, error: Callable[..., TransferError] = CudaError):
    """Check one cuda-python result tuple and return its value(s).

    Args:
        cudart: the runtime module (:func:`import_cudart`).
        call: the CUDA function's name, for the message.
        result: what the call returned: ``(err,)``, ``(err, value)`` or ``(err, v1, v2, ...)``.
        error: the TransferError class to raise.

    Returns:
        ``None``, the single value, or the tuple of values.

    Raises:
        CudaError (or ``error``): ``err`` is not ``cudaSuccess``; names ``call`` and the CUDA text.

    Example::

        ptr = cuda_call(cudart, "cudaMalloc", cudart.cudaMalloc(nbytes))
    """
    if not isinstance(result, tuple) or not result:
        raise error(f"{call} returned {result!r}, not a (cudaError_t, ...) tuple; is this cuda-python?")
    err, values = result[0], result[1:]
    if int(err) != 0:
        raise error(f"{call} failed: {error_string(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _unavailable(message: str) -> TensorRTUnavailableError:
    return TensorRTUnavailableError(message, hint=INSTALL_HINT)


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(value).strip()


def cuda_device(cudart=None, device: int | None = None) -> dict:
    """Identity of the current (or given) CUDA device from the CUDA runtime.

    Returns:
        ``{"index": n, "gpu": name, "compute_capability": "8.6", "count": visible devices}``.

    Raises:
        TensorRTUnavailableError: cuda-python missing, no driver, or no visible device
        (with CUDA's own reason, e.g. "CUDA driver version is insufficient ...").
    """
    cudart = cudart or import_cudart()
    unavailable = _unavailable
    try:
        result = cudart.cudaGetDeviceCount()
    except RuntimeError as exc:  # cuda-python <= 12.5 raises "Failed to dlopen libcuda.so.1" without a driver
        raise TensorRTUnavailableError(f"the CUDA runtime cannot start: {exc}", hint=INSTALL_HINT) from None
    count = cuda_call(cudart, "cudaGetDeviceCount", result, unavailable)
    if not count:
        raise TensorRTUnavailableError("the CUDA runtime sees no device (check CUDA_VISIBLE_DEVICES)",
                                       hint=INSTALL_HINT)
    if device is None:
        device = cuda_call(cudart, "cudaGetDevice", cudart.cudaGetDevice(), unavailable)
    elif not 0 <= int(device) < int(count):
        raise TensorRTUnavailableError(f"CUDA device {device} does not exist; {count} device(s) are visible "
                                       "(numbered from 0 after CUDA_VISIBLE_DEVICES)", hint=INSTALL_HINT)
    props = cuda_call(cudart, "cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(int(device)), unavailable)
    return {"index": int(device), "gpu": _text(props.name),
            "compute_capability": f"{int(props.major)}.{int(props.minor)}", "count": int(count)}


def gpu_status() -> tuple[bool, str]:
    """(available, reason): is there a CUDA device and an importable ``tensorrt``?

    The CUDA runtime answers (cuda-python), so a container without ``nvidia-smi`` but
    with a driver counts, and ``CUDA_VISIBLE_DEVICES=""`` does not.
    """
    try:
        dev = cuda_device()
    except TensorRTUnavailableError as exc:
        return False, exc.message
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt package is not installed ({exc}); pip install \"transfer[gpu]\""
    return True, f"{dev['gpu']} (compute {dev['compute_capability']}, device {dev['index']} of {dev['count']})"


def require_tensorrt():
    """Import tensorrt or raise TensorRTUnavailableError (exit code 3) saying why."""
    try:
        cuda_device()
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(f"TensorRT needs an NVIDIA GPU with CUDA; none was found: {exc.message}",
                                       hint=INSTALL_HINT) from None
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(f"TensorRT needs the tensorrt package, which is not installed ({exc})",
                                       hint=INSTALL_HINT) from None
    return trt


def device_info(device: int | None = None) -> dict:
    """GPU name and compute capability of the current CUDA device plus the TensorRT version.

    These three are what a manifest's engine entry records and what the runtime compares
    before it loads an engine (engines are specific to a GPU architecture and a TensorRT
    version).

    Raises:
        TensorRTUnavailableError: no GPU, driver, cuda-python or tensorrt.
    """
    trt = require_tensorrt()
    dev = cuda_device(device=device)
    return {"gpu": dev["gpu"], "compute_capability": dev["compute_capability"], "tensorrt": trt.__version__}
