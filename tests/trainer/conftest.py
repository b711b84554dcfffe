"""Fixtures of the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.trainer import make_pattern_folder, register_tiny_bn


@pytest.fixture(scope="session")
def pattern_folder(tmp_path_factory) -> Path:
    return make_pattern_folder(tmp_path_factory.mktemp("data") / "patterns")


@pytest.fixture(scope="module")
def tiny_bn():
    """A registered backbone with BatchNormalization that builds and trains in seconds (for one module)."""
    from transfer.models import registry

    name = register_tiny_bn()
    yield name
    registry._REGISTRY.pop(name, None)
