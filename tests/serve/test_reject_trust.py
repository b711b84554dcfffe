"""transfer serve with --reject (calibrated "unknown" answers) and with --trust (signed bundles only)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers.bundle_factory import known_images, make_bundle, unknown_image
from helpers.serving import RunningServer


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def _start(bundle, **fields):
    from transfer.options import make
    from transfer.serve.model import load_served_model
    from transfer.serve.serve_config import ServeConfig

    cfg = make(ServeConfig, fields)
    return RunningServer(load_served_model(bundle, cfg.model, cfg.security), cfg)


def test_reject_answers_unknown_with_the_rule(tmp_path):
    import httpx

    b = make_bundle(tmp_path / "b", unknown=True)
    s = _start(b, reject=True)
    try:
        x, _ = known_images(2, seed=7)
        files = [("image", ("a.png", _png(x[0]), "image/png")), ("image", ("b.png", _png(x[1]), "image/png")),
                 ("image", ("red.png", _png(unknown_image()), "image/png"))]
        r = httpx.post(f"{s.url}/v1/predict", files=files, timeout=30)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["decision"] for p in preds] == ["known", "known", "unknown"]
        for p in preds:
            assert p["unknown"]["score"] == "mahalanobis" and isinstance(p["unknown"]["value"], float)
        assert preds[2]["unknown"]["value"] < preds[2]["unknown"]["threshold"] <= preds[0]["unknown"]["value"]
        info = httpx.get(f"{s.url}/v1/model", timeout=10).json()
        assert info["unknown"]["rejecting"] is True and info["unknown"]["score"] == "mahalanobis"
    finally:
        s.stop()


def test_reject_needs_a_bundle_with_scores(tmp_path):
    from transfer.errors import ConfigError
    from transfer.serve.model import ModelOptions, load_served_model

    b = make_bundle(tmp_path / "plain")
    with pytest.raises(ConfigError, match="no unknown-input score"):
        load_served_model(b, ModelOptions(reject=True))
    assert load_served_model(b, ModelOptions()).detector is None


def test_trust_refuses_unsigned_bundles_and_untrusted_pickles(tmp_path):
    from transfer.bundle import UntrustedBundleError
    from transfer.errors import ConfigError, TransferError
    from transfer.serve.model import ModelOptions, TrustOptions, load_served_model
    from transfer.signing import generate_key, load_signing_key

    generate_key(tmp_path / "k")
    key = load_signing_key(tmp_path / "k")
    signed = make_bundle(tmp_path / "signed", head="rf", sign_key=key)
    unsigned = make_bundle(tmp_path / "unsigned", head="rf")
    pub = str(tmp_path / "k.pub")
    m = load_served_model(signed, ModelOptions(head="rf", head_format="pickle"), TrustOptions(trust=(pub,)))
    assert m.bundle.trusted and m.info()["trusted"] is True
    with pytest.raises(UntrustedBundleError):
        load_served_model(unsigned, ModelOptions(), TrustOptions(trust=(pub,)))
    with pytest.raises((ConfigError, TransferError), match="pickle"):
        load_served_model(unsigned, ModelOptions(head="rf", head_format="pickle"))
    assert load_served_model(unsigned, ModelOptions(head="rf", head_format="pickle"),
                      TrustOptions(trust_pickle=True)).head.name == "rf"
