"""The pytest plugin of fixtures shared by every test folder (registered in ``tests/conftest.py``).

One tiny real run and one bundle per test session (per xdist worker): the export, runtime and
serve tests read the same arc2 run (16x16, trained with ``--augment flip``, the known tf2onnx
trap) and the same fp32 + int8 + RandomForest bundle of it. Tests must not modify them: copy
first (:func:`helpers.runs.copy_run`, ``shutil.copytree``). Bundles that need no training come
from :mod:`helpers.bundle_factory`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.runs import build_run, copy_run, make_pattern_folder


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """A tiny learnable image folder (3 classes of 20 patterned images)."""
    return make_pattern_folder(tmp_path_factory.mktemp("shared-data") / "patterns")


@pytest.fixture(scope="session")
def shared_run(shared_data, tmp_path_factory) -> Path:
    """A finished sweep: arc2 at 16x16, fully trainable, trained with --augment flip."""
    return build_run(shared_data, tmp_path_factory.mktemp("shared-run") / "run", augment="flip", trainable="1")


@pytest.fixture(scope="session")
def shared_bundle(shared_run, tmp_path_factory):
    """``(run, ExportResult)``: a copy of the shared run exported with fp32 + int8 models and an rf head."""
    from transfer.export.api import export_bundle

    run = copy_run(shared_run, tmp_path_factory.mktemp("shared-bundle") / "run")
    return run, export_bundle(run, head="rf", quantize="int8", progress=None)
