"""Fixtures of the export tests: the session's shared run and bundle (:mod:`helpers.fixtures`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.runs import copy_run


@pytest.fixture(scope="session")
def export_data(shared_data) -> Path:
    return shared_data


@pytest.fixture(scope="session")
def aug_run(shared_run) -> Path:
    """arc2 at 16x16 trained with --augment flip (the known tf2onnx trap). Copy before writing."""
    return shared_run


@pytest.fixture(scope="session")
def full_bundle(shared_bundle):
    """(run, ExportResult): fp32 + int8 + rf head bundle of the best trial."""
    return shared_bundle


@pytest.fixture
def run_copy(aug_run, tmp_path) -> Path:
    return copy_run(aug_run, tmp_path / "run")
