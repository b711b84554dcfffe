"""Fixtures of the serve tests: one tiny real bundle per session, and real uvicorn servers on
ephemeral loopback ports that each test starts and stops."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "transfer[serve]")')
pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from analysis_helpers import build_run, make_pattern_folder  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_helpers import RunningServer  # noqa: E402,F401  (tests import it from serve_helpers)


@pytest.fixture(scope="session")
def serve_data(tmp_path_factory) -> Path:
    return make_pattern_folder(tmp_path_factory.mktemp("sdata") / "patterns")


@pytest.fixture(scope="session")
def serve_bundle(serve_data, tmp_path_factory) -> Path:
    """arc2 at 16x16 exported with fp32 + int8 models and an rf head. Do not modify: copy."""
    from transfer.export.api import export_bundle

    run = build_run(serve_data, tmp_path_factory.mktemp("sruns") / "run", trainable="1")
    return export_bundle(run, head="rf", quantize="int8", progress=None).bundle_dir


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
