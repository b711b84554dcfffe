"""Fixtures of the serve tests: one tiny real bundle per session, and real uvicorn servers on
ephemeral loopback ports that each test starts and stops."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "transfer[serve]")')
pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")
from helpers.serving import RunningServer


@pytest.fixture(scope="session")
def serve_data(shared_data) -> Path:
    return shared_data


@pytest.fixture(scope="session")
def serve_bundle(shared_bundle) -> Path:
    """arc2 at 16x16 exported with fp32 + int8 models and an rf head (:mod:`helpers.fixtures`). Do not modify: copy."""
    return shared_bundle[1].bundle_dir


@pytest.fixture
def start_server(serve_bundle):
    """``start_server(**config_fields, key=None, model=None)`` -> a :class:`RunningServer`, stopped after the test."""
    from transfer.options import make
    from transfer.serve.model import load_served_model
    from transfer.serve.serve_config import ServeConfig

    servers = []

    def start(*, key=None, model=None, wait_ready=True, **fields):
        fields.setdefault("head", "rf")
        cfg = make(ServeConfig, fields)
        m = model if model is not None else load_served_model(serve_bundle, cfg.model, cfg.security)
        s = RunningServer(m, cfg, key=key, wait_ready=wait_ready)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(start_server):
    """A server with the rf head and default batching."""
    return start_server()
