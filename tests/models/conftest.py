"""Fixtures of the model tests: small real models built once per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def mnv2():
    from transfer.models.build import build_classifier

    return build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="none", num_classes=3, seed=0)


@pytest.fixture(scope="module")
def arc2():
    from transfer.models.build import build_classifier

    return build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=4, seed=0)
