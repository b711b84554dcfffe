"""Fixtures of the analysis tests: one tiny real run folder per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis_helpers import build_run, make_pattern_folder


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory) -> Path:
    return make_pattern_folder(tmp_path_factory.mktemp("adata") / "patterns")


@pytest.fixture(scope="session")
def tiny_run(pattern_data, tmp_path_factory) -> Path:
    """A finished sweep (trials arc2-t000, arc2-t100). Tests must not modify it: copy it first."""
    return build_run(pattern_data, tmp_path_factory.mktemp("aruns") / "run")
