"""Shared test setup: quiet TensorFlow, the `gpu` marker skips without a CUDA device, and the
fixtures every folder shares (:mod:`helpers.fixtures`: one session-wide run and bundle)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PYTHONHASHSEED", "0")
# numpy's OpenBLAS on one thread in every test process (and the processes the tests start): its
# idle threads spin after each call, and beside cores + 1 xdist workers and TensorFlow's own pools
# that spinning is CPU the suite loses (3 full runs: 4:28 with it set, 4:44 and 4:41 without;
# docs/test_durations.md). Set here, before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

pytest_plugins = ["helpers.fixtures"]


def _cuda_device_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


#: fixtures that train a model (once per session or per test): a test asking for one is marked `trains`
TRAINING_FIXTURES = {"shared_run", "shared_bundle", "aug_run", "full_bundle", "rt_bundle", "serve_bundle",
                     "tiny_run", "explain_run", "run_copy", "object_model"}
#: fixtures that start a real HTTP server: a test asking for one is marked `server`
SERVER_FIXTURES = {"server", "start_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & TRAINING_FIXTURES:
            item.add_marker(pytest.mark.trains)
        if used & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
    if _cuda_device_present():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
