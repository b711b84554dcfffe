"""``POST /v1/predict?cam=1`` on a real uvicorn server: the map comes back (cells and a PNG
overlay), equals the runtime's, costs are in the metrics, a bundle without maps answers 422,
and the page shows the overlay in headless Chromium."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers.bundle_factory import make_bundle
from helpers.cam_bundle import build_cam_bundle
from helpers.serving import RunningServer


@pytest.fixture(scope="module")
def cam_server(tmp_path_factory):
    from transfer.options import make
    from transfer.serve.model import load_served_model as load_model
    from transfer.serve.serve_config import ServeConfig

    run, bundle = build_cam_bundle(tmp_path_factory.mktemp("scam"), quantize="int8", head="rf")
    cfg = make(ServeConfig, {"head": "rf", "topk": 2})
    server = RunningServer(load_model(bundle, cfg.model, cfg.security), cfg)
    try:
        yield server, run, bundle
    finally:
        server.stop()


def _image(run: Path) -> Path:
    return sorted((Path(run).parent / "objects" / "c1").glob("*.png"))[0]


def test_predict_with_cam_returns_the_map(cam_server):
    from transfer.bundle import load_bundle
    from transfer.data.image import load_image
    from transfer.runtime.cam import BundleCam
    from transfer.runtime.runners import make_runner

    server, run, bundle = cam_server
    img = _image(run)
    plain = httpx.post(f"{server.url}/v1/predict", files={"image": (img.name, img.read_bytes(), "image/png")})
    assert plain.status_code == 200 and "cam" not in plain.json()["predictions"][0]
    r = httpx.post(f"{server.url}/v1/predict?cam=1", files={"image": (img.name, img.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    cam = p["cam"]
    assert cam["layer"] == "cam_conv" and cam["head"] == "network" and "cam" in p["timings_ms"]
    cells = np.array(cam["cells"])
    assert cells.shape == (24, 24) and 0 <= cells.min() and cells.max() == pytest.approx(1.0)
    png = Image.open(io.BytesIO(base64.b64decode(cam["png"])))
    assert png.format == "PNG" and min(png.size) >= 24
    # the same map the runtime computes for this image (the network's predicted class)
    b = load_bundle(bundle)
    x = load_image(img, b.input_size, recipe=b.recipe)[None]
    with make_runner(b) as runner:
        out = runner.request("feature_map").infer(x)
    c = int(out.probs.argmax())
    assert cam["class"] == b.class_names[c]
    want = BundleCam.open(b, "onnx-fp32").small(out.feature_map, np.array([c]))[0]
    assert np.abs(cells - want).max() < 1e-3
    # an explicit class; bad values are 422 with a hint
    r = httpx.post(f"{server.url}/v1/predict?cam=1&cam_class=c0", files={"image": ("a.png", img.read_bytes())})
    assert r.json()["predictions"][0]["cam"]["class"] == "c0"
    for q, word in (("cam=2", "cam must be 1 or 0"), ("cam=1&cam_class=zebra", "cam_class"),
                    ("cam_class=c0", "needs cam=1")):
        bad = httpx.post(f"{server.url}/v1/predict?{q}", files={"image": ("a.png", img.read_bytes())})
        assert bad.status_code == 422 and word in bad.json()["error"], bad.text
        assert bad.json()["hint"]
    metrics = httpx.get(f"{server.url}/metrics").text
    count = [ln for ln in metrics.splitlines() if ln.startswith("transfer_serve_cam_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 2
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["cam"] == {"available": True, "layer": "cam_conv", "cells": [24, 24]}
    params = {q["name"] for q in httpx.get(f"{server.url}/openapi.json").json()["paths"]["/v1/predict"]["post"]
              ["parameters"]}
    assert {"cam", "cam_class"} <= params


def test_bundle_without_maps_answers_422_with_a_hint(tmp_path):
    from transfer.options import make
    from transfer.serve.model import load_served_model as load_model
    from transfer.serve.serve_config import ServeConfig

    old = make_bundle(tmp_path / "old")
    cfg = make(ServeConfig, {})
    server = RunningServer(load_model(old, cfg.model, cfg.security), cfg)
    try:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
        r = httpx.post(f"{server.url}/v1/predict?cam=1", files={"image": ("a.png", buf.getvalue())})
        assert r.status_code == 422, r.text
        body = r.json()
        assert "exported before maps were added" in body["error"] and "transfer export" in body["hint"]
        ok = httpx.post(f"{server.url}/v1/predict", files={"image": ("a.png", buf.getvalue())})
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/v1/model").json()["cam"]["available"] is False
    finally:
        server.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_page_shows_the_overlay(cam_server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, run, _ = cam_server
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
              f"--user-data-dir={profile}", "--window-size=900,1100"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        drv.get(server.url + "/")
        wait = WebDriverWait(drv, 20)
        wait.until(lambda d: d.find_element(By.ID, "camrow").is_displayed())
        drv.find_element(By.ID, "cam").click()
        drv.find_element(By.ID, "file").send_keys(str(_image(run)))
        wait.until(lambda d: d.find_element(By.ID, "camfig").is_displayed())
        wait.until(lambda d: d.execute_script("const i = document.getElementById('camimg'); "
                                              "return i.complete && i.naturalWidth > 0"))
        assert "map of c" in drv.find_element(By.ID, "camcap").text
        assert "cam_conv" in drv.find_element(By.ID, "camcap").text
        drv.save_screenshot(str(tmp_path / "page_cam.png"))
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
