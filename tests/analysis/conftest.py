"""Fixtures of the analysis tests: tiny real run folders and an object-finding model, one per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.explain import train_object_model
from helpers.fixtures import built_once
from helpers.runs import build_run, copy_run


@pytest.fixture(scope="session")
def pattern_data(shared_data) -> Path:
    """The session's shared pattern folder (:func:`helpers.fixtures.shared_data`), under the name
    the analysis tests use. Tests must not modify it: copy it first."""
    return shared_data


@pytest.fixture(scope="session")
def tiny_run(pattern_data, tmp_path_factory) -> Path:
    """A finished sweep (trials arc2-t000, arc2-t100). Tests must not modify it: copy it first."""
    for folder, _ in built_once(tmp_path_factory, "aruns", lambda d: build_run(pattern_data, d / "run")):
        yield folder / "run"


@pytest.fixture(scope="session")
def explain_run(pattern_data, tmp_path_factory) -> Path:
    """A finished run for Grad-CAM, resolution and report: arc2 at 16x16, frozen (t000) and fully
    trainable (t100), 3 classes, 3 epochs. Tests must not modify it: use ``run_copy``."""
    for folder, _ in built_once(tmp_path_factory, "explain", lambda d: build_run(pattern_data, d / "run", epochs=3)):
        yield folder / "run"


@pytest.fixture()
def run_copy(explain_run, tmp_path) -> Path:
    """A private copy of the explain run (tests that write into it do not disturb the others)."""
    return copy_run(explain_run, tmp_path / "run")


@pytest.fixture(scope="session")
def object_model():
    """A small CNN with global average pooling that finds a red or blue 4x4 square (val acc ~1)."""
    model, acc = train_object_model()
    assert acc >= 0.9, f"the object model did not learn (val accuracy {acc:.2f})"
    return model


@pytest.fixture()
def every_progress_line(monkeypatch):
    """Progress bars given a line callable report every update (not every 10 s), so a test can
    act on the line of the first batch."""
    import transfer.progress

    monkeypatch.setattr(transfer.progress, "LINE_INTERVAL", 0.0)


@pytest.fixture(scope="module", autouse=True)
def audits_convert_in_this_process():
    """The audits of these tests convert their models in a thread of the test's process
    (``audit_engine.CONVERT_IN = "process"``), as a process with TensorFlow loaded may ask for: one
    TensorFlow import per worker instead of one per audit, and the same choice whatever ran
    before. Module-scoped and autouse, so it is in place before the modules' own audits (module
    fixtures). The tests of the child process (what ``transfer data audit`` uses) ask for it."""
    from transfer.analysis import audit_engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit_engine, "CONVERT_IN", "process")
        yield
