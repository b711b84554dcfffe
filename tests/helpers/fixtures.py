"""The pytest plugin of fixtures shared by every test folder (registered in ``tests/conftest.py``).

One tiny real run and one bundle per test session: the export, runtime and serve tests read
the same arc2 run (16x16, trained with ``--augment flip``, the known tf2onnx trap) and the same
fp32 + int8 + RandomForest bundle of it. Under pytest-xdist the first worker that needs one
builds it and the other workers wait for it and read the same folder (:func:`built_once`).
Tests must not modify them: copy first (:func:`helpers.runs.copy_run`, ``shutil.copytree``);
each worker checks at its end that the files are still those that were built. Bundles that
need no training come from :mod:`helpers.bundle_factory`.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable

import pytest

from helpers.runs import build_run, copy_run, make_pattern_folder

_DONE = ".built-once.json"


def _listing(folder: Path) -> dict[str, list[int]]:
    """Every file under ``folder`` (but the marker) with its size and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != _DONE:
            st = p.stat()
            out[str(p.relative_to(folder))] = [st.st_size, st.st_mtime_ns]
    return out


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]):
    """``(folder, value)``: ``build(folder)`` run once for the whole test session.

    Without xdist it builds into a fresh temporary folder. Under xdist every worker's temporary
    root sits in one session folder; the first worker to ask builds ``<that folder>/<name>``
    while holding a lock on it, the others wait for the lock and then read the folder and the
    pickled value it recorded. A build that failed is tried again by the next worker that asks.
    Yields, so the caller's fixture can check afterwards that nothing was changed.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        value = build(folder)
        before = _listing(folder)
    else:
        folder = tmp_path_factory.getbasetemp().parent / name
        with open(f"{folder}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
            done = folder / _DONE
            if not done.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # what a failed build left behind
                folder.mkdir(parents=True)
                value = build(folder)
                before = _listing(folder)
                (folder / "value.pickle").write_bytes(pickle.dumps(value))
                done.write_text(json.dumps(before))
            value = pickle.loads((folder / "value.pickle").read_bytes())
            before = json.loads(done.read_text())
    yield folder, value
    after = _listing(folder)
    after.pop("value.pickle", None)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"a test changed the session's shared {name} (copy it first): {changed[:10]}"


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """A tiny learnable image folder (3 classes of 20 patterned images)."""
    for folder, _ in built_once(tmp_path_factory, "shared-data", lambda d: make_pattern_folder(d / "patterns")):
        yield folder / "patterns"


@pytest.fixture(scope="session")
def shared_run(shared_data, tmp_path_factory) -> Path:
    """A finished sweep: arc2 at 16x16, fully trainable, trained with --augment flip."""
    for folder, _ in built_once(tmp_path_factory, "shared-run",
                                lambda d: build_run(shared_data, d / "run", augment="flip", trainable="1")):
        yield folder / "run"


@pytest.fixture(scope="session")
def shared_bundle(shared_run, tmp_path_factory):
    """``(run, ExportResult)``: a copy of the shared run exported with fp32 + int8 models and an rf head."""

    def build(folder: Path):
        from transfer.export.api import export_bundle

        run = copy_run(shared_run, folder / "run")
        return export_bundle(run, head="rf", quantize="int8", progress=None)

    for folder, res in built_once(tmp_path_factory, "shared-bundle", build):
        yield folder / "run", res


@pytest.fixture(scope="session", autouse=True)
def session_user_cache(tmp_path_factory):
    """The user cache of ``transfer`` (``TRANSFER_CACHE_DIR``: the audit's converted models, TensorRT
    engines) is a folder of this test session, shared by its xdist workers like :func:`built_once`'s
    folders: tests neither read nor fill the cache of the person running them, and a session
    starts empty. A test that needs a cache of its own sets the variable itself."""
    base = tmp_path_factory.getbasetemp()
    root = (base if os.environ.get("PYTEST_XDIST_WORKER") is None else base.parent) / "user-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("TRANSFER_CACHE_DIR", str(root))
    yield root
    mp.undo()
