"""Fixtures of the runtime tests: the session's shared run and bundle (:mod:`helpers.fixtures`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def rt_data(shared_data) -> Path:
    return shared_data


@pytest.fixture(scope="session")
def rt_bundle(shared_bundle):
    """(run folder, bundle folder) with fp32 + int8 models and an rf head. Do not modify: copy."""
    run, res = shared_bundle
    return run, res.bundle_dir
