"""The runner interface on real ONNX Runtime: lifecycle, input and output checks, timing, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.tiny_models import tiny_onnx
from transfer.errors import ConfigError
from transfer.runtime.runner_base import Outputs, Runner, infer_batches
from transfer.runtime.runners import OrtRunner


@pytest.fixture
def model(tmp_path) -> Path:
    return tiny_onnx(tmp_path / "model.onnx")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)


def test_lifecycle_activates_once_per_session_and_releases(model):
    checked = []
    r = OrtRunner(model, "cpu", check=checked.append)
    assert not r.active and r.session is None and not checked  # nothing made before activation
    out = r.infer(pixels(2))  # used without `with`: activates on the first batch
    assert r.active and len(checked) == 1 and checked[0] is r.session
    assert out.features.shape == (2, 3) and out.probs.shape == (2, 3) and r.input_hw == (8, 8)
    r.infer(pixels(3))
    assert len(checked) == 1 and r.calls == 2 and r.last_seconds > 0 and r.total_seconds >= r.last_seconds
    r.deactivate()
    assert not r.active and r.session is None
    r.deactivate()  # idempotent
    with r:
        r.infer(pixels(1))
        assert len(checked) == 2  # a new session: checked again before it runs
    assert not r.active and r.provider == "CPUExecutionProvider"


def test_a_failing_check_refuses_the_session(model):
    def refuse(session):
        raise ConfigError("not the model the manifest describes")

    r = OrtRunner(model, "cpu", check=refuse)
    with pytest.raises(ConfigError, match="not the model"):
        r.infer(pixels(1))
    assert not r.active


def test_inputs_are_checked_and_uint8_equals_float(model):
    with OrtRunner(model, "cpu") as r:
        with pytest.raises(ConfigError, match=r"takes images of shape \(N, 8, 8, 3\); got \(2, 8, 9, 3\)"):
            r.infer(np.zeros((2, 8, 9, 3), np.float32))
        with pytest.raises(ConfigError, match=r"got \(8, 8, 3\)"):
            r.infer(np.zeros((8, 8, 3), np.float32))
        with pytest.raises(ConfigError, match="uint8 or float32"):
            r.infer(np.zeros((1, 8, 8, 3), bool))
        x = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
        np.testing.assert_array_equal(r.infer(x).probs, r.infer(x.astype(np.float32)).probs)
        np.testing.assert_allclose(r.infer(x.astype(np.float64)).features, r.infer(x).features, rtol=1e-6)
        empty = r.infer(np.zeros((0, 8, 8, 3), np.float32))
        assert empty.features.shape == (0, 3) and empty.probs.shape == (0, 3) and len(empty) == 0


def test_batches_give_the_outputs_of_one_call(model):
    x = pixels(10)
    with OrtRunner(model, "cpu") as r:
        whole = r.infer(x)
        parts = infer_batches(r, x, batch=4)
        assert r.calls == 1 + 3
    np.testing.assert_allclose(parts.probs, whole.probs, rtol=1e-6)
    np.testing.assert_allclose(parts.features, whole.features, rtol=1e-6)
    # feature_map is an output a runner fetches only when asked (runner.request): this graph has none
    assert set(parts.arrays()) == {"features", "probs"} and set(Outputs.names()) == {"features", "probs", "feature_map"}


class Wrong(Runner):
    """A backend that answers one row too few."""

    def _activate(self):
        pass

    def _deactivate(self):
        pass

    def _infer(self, x):
        return {"features": np.zeros((len(x) - 1, 3), np.float32), "probs": np.zeros((len(x), 3), np.float32),
                "logits": np.zeros((len(x), 3), np.float32)}  # not an output of the contract: ignored


def test_outputs_without_a_row_per_image_are_refused():
    r = Wrong("wrong", "nowhere", "x", input_hw=(8, 8))
    with pytest.raises(ConfigError, match=r"wrong returned outputs of shapes \{'features': \(1, 3\)\} for 2"):
        r.infer(pixels(2))
