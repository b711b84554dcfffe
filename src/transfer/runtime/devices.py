"""The NVIDIA side of the runtime: is there a GPU with CUDA and TensorRT, and which one.

Imported lazily by the TensorRT runner and by the exporter's engine builder; nothing here
imports TensorFlow. Without a GPU every function fails with
:class:`~transfer.errors.TensorRTUnavailableError` (exit code 3) saying why.
"""

from __future__ import annotations

import shutil
import subprocess

from ..errors import TensorRTUnavailableError


def gpu_status() -> tuple[bool, str]:
    """(available, reason): is there an NVIDIA GPU with CUDA and an importable tensorrt?"""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False, "nvidia-smi not found (no NVIDIA driver on this machine)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi failed: {exc}"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return False, f"nvidia-smi lists no GPU: {(out.stderr or out.stdout).strip()[:200]}"
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt package is not installed ({exc}); pip install \"transfer[gpu]\""
    return True, out.stdout.strip().splitlines()[0]


def require_tensorrt():
    """Import tensorrt or raise TensorRTUnavailableError (exit code 3) saying why."""
    ok, reason = gpu_status()
    if not ok:
        raise TensorRTUnavailableError(
            f"TensorRT needs an NVIDIA GPU with CUDA; none was found: {reason}",
            hint="TensorRT engines are built and run on NVIDIA machines (pip install \"transfer[gpu]\"); "
                 "ONNX Runtime runs the bundle anywhere",
        )
    import tensorrt as trt

    return trt


def device_info() -> dict:
    """GPU name and compute capability of device 0 plus the TensorRT version (GPU only)."""
    trt = require_tensorrt()
    name, cc = "unknown", "unknown"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        first = q.stdout.strip().splitlines()[0]
        name, cc = [s.strip() for s in first.split(",")[:2]]
    except Exception:
        pass
    return {"gpu": name, "compute_capability": cc, "tensorrt": trt.__version__}
