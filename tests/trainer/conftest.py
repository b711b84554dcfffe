"""Fixtures of the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_helpers import make_pattern_folder


@pytest.fixture(scope="session")
def pattern_folder(tmp_path_factory) -> Path:
    return make_pattern_folder(tmp_path_factory.mktemp("data") / "patterns")
