"""Fixtures of the runtime tests: one tiny real run and its exported bundle per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from analysis_helpers import build_run, make_pattern_folder  # noqa: E402


@pytest.fixture(scope="session")
def rt_data(tmp_path_factory) -> Path:
    return make_pattern_folder(tmp_path_factory.mktemp("rdata") / "patterns")


@pytest.fixture(scope="session")
def rt_bundle(rt_data, tmp_path_factory):
    """(run folder, bundle folder) with fp32 + int8 models and an rf head. Do not modify: copy."""
    from transfer.export.api import export_bundle

    run = build_run(rt_data, tmp_path_factory.mktemp("rruns") / "run", trainable="1")
    res = export_bundle(run, head="rf", quantize="int8", progress=None)
    return run, res.bundle_dir
