"""A bundle is loaded and checked once: from the command line to the first model call, `transfer
serve` and `transfer infer` call into the bundle modules (transfer/bundle.py and its parts
bundle_format.py, bundle_schema.py, bundle_claims.py, bundle_write.py) at most three times (the
load, then one graph check per session: the model's and the head's), counted with a profiler on
every thread."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import transfer.bundle
import transfer.bundle_claims
import transfer.bundle_format
import transfer.bundle_schema
import transfer.bundle_write
from helpers.bundle_factory import make_bundle
from transfer.cli import cli

#: the files of the bundle format: a call from one into another is part of the same entry
BUNDLE_FILES = frozenset(m.__file__ for m in (transfer.bundle, transfer.bundle_claims, transfer.bundle_format,
                                              transfer.bundle_schema, transfer.bundle_write))


class BundleEntries:
    """A profile function recording each call from outside the bundle modules into them (calls among them, and
    through generated code such as a dataclass ``__init__``, are part of the same entry), up to the
    first call of a runner's ``infer``."""

    def __init__(self):
        self.names: list[str] = []
        self.at_first_model_call: list[str] | None = None

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if self.at_first_model_call is None and code.co_name == "infer" and "self" in frame.f_locals:
            if any(k.__name__ == "Runner" for k in type(frame.f_locals["self"]).__mro__):
                self.at_first_model_call = list(self.names)
        if code.co_filename not in BUNDLE_FILES:
            return
        caller = frame.f_back
        while caller is not None and caller.f_code.co_filename.startswith("<"):
            caller = caller.f_back
        if caller is None or caller.f_code.co_filename not in BUNDLE_FILES:
            self.names.append(code.co_name)

    def run(self, args: list[str]):
        sys.setprofile(self)
        threading.setprofile(self)
        try:
            return CliRunner().invoke(cli, args)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)


class FirstRequestServer:
    """Stands in for uvicorn: instead of listening, the first request's model call."""

    def __init__(self, app, config, on_signal):
        self.app = app

    def run(self, sockets):
        model = self.app.state.transfer.model
        model.predict(np.zeros((1, *model.size, 3), np.uint8))


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "b", head="rf", unknown=True)


@pytest.mark.parametrize("extra", [[], ["--head", "rf", "--reject"]])
def test_serve_enters_bundle_py_at_most_three_times(bundle, monkeypatch, extra):
    import transfer.serve.server as server

    monkeypatch.setattr(server, "make_server", FirstRequestServer)
    entries = BundleEntries()
    r = entries.run(["serve", str(bundle), "--port", "0", "-q", *extra])
    assert r.exit_code == 0, r.output
    got = entries.at_first_model_call
    assert got is not None, "no model call"
    assert len(got) <= 3, got
    assert got.count("load_bundle") == 1 and got.count("check_model_graph") == 1  # loaded once, graph checked
    assert got.count("check_head_graph") == (1 if extra else 0)


@pytest.mark.parametrize("extra", [[], ["--head", "rf", "--reject"]])
def test_infer_enters_bundle_py_at_most_three_times(bundle, tmp_path, extra):
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(img)
    entries = BundleEntries()
    r = entries.run(["infer", str(bundle), str(img), "-q", *extra])
    assert r.exit_code == 0, r.output
    got = entries.at_first_model_call
    assert got is not None and len(got) <= 3, got
    assert got.count("load_bundle") == 1 and got.count("check_model_graph") == 1
    assert got.count("check_head_graph") == (1 if extra else 0)
