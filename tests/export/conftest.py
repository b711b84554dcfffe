"""Fixtures of the export tests: one tiny real run (trained with augmentation) per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from analysis_helpers import build_run, copy_run, make_pattern_folder  # noqa: E402


@pytest.fixture(scope="session")
def export_data(tmp_path_factory) -> Path:
    return make_pattern_folder(tmp_path_factory.mktemp("edata") / "patterns")


@pytest.fixture(scope="session")
def aug_run(export_data, tmp_path_factory) -> Path:
    """arc2 at 16x16 trained with --augment flip (the known tf2onnx trap). Copy before writing."""
    return build_run(export_data, tmp_path_factory.mktemp("eruns") / "run", augment="flip", trainable="1")


@pytest.fixture(scope="session")
def full_bundle(aug_run, tmp_path_factory):
    """fp32 + int8 + rf head bundle of the best trial."""
    from transfer.export.api import export_bundle

    run = copy_run(aug_run, tmp_path_factory.mktemp("ebundle") / "run")
    res = export_bundle(run, head="rf", quantize="int8", progress=None)
    return run, res


@pytest.fixture
def run_copy(aug_run, tmp_path) -> Path:
    return copy_run(aug_run, tmp_path / "run")
