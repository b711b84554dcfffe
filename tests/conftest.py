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


#: session fixtures that each xdist worker builds for itself (the trained ones are built once for
#: all workers, :func:`helpers.fixtures.built_once`)
PER_WORKER_SESSION_FIXTURES = {"object_model"}


def _builds_per_module(item) -> bool:
    """Whether ``item`` uses a fixture that is built once per module (or per worker, like
    :data:`PER_WORKER_SESSION_FIXTURES`): its module's tests are best run by one worker."""
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {}) if info is not None else {}
    return any(d.scope == "module" or (d.scope == "session" and name in PER_WORKER_SESSION_FIXTURES)
               for name, ds in defs.items() for d in ds)


def _file_of(item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    # `make test` runs `--dist loadgroup`: a module whose tests share a module-scoped fixture (a
    # trained run, a Ray instance) is one group that one worker runs from start to end, so the
    # fixture is built once (split over two workers, or interrupted by other modules, it was built
    # again each time); every other test is balanced on its own
    grouped = {_file_of(item) for item in items if _builds_per_module(item)}
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & TRAINING_FIXTURES:
            item.add_marker(pytest.mark.trains)
        if used & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
        if _file_of(item) in grouped:
            item.add_marker(pytest.mark.xdist_group(_file_of(item)))
    if _cuda_device_present():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
