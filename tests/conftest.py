"""Shared test setup: quiet TensorFlow, the `gpu` marker skips without a CUDA device."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PYTHONHASHSEED", "0")


def _cuda_device_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pytest_collection_modifyitems(config, items):
    if _cuda_device_present():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
