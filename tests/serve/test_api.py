"""The HTTP API on a real uvicorn server with a real bundle, through a real HTTP client."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import threading
import time

import httpx
import numpy as np
from PIL import Image


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _files(data_dir, n=None):
    files = sorted(p for p in data_dir.rglob("*.png"))
    return files[:n] if n else files


def _assert_error(r: httpx.Response, status: int, *words: str):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) >= {"error", "hint"}, body
    assert isinstance(body["error"], str) and body["error"]
    for w in words:
        assert w in body["error"].lower(), (w, body["error"])
    return body


def _good(url, data_dir):
    """One good request; it must succeed (used after every bad one)."""
    f = _files(data_dir, 1)[0]
    r = httpx.post(f"{url}/v1/predict", files={"image": (f.name, f.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["status"] == 200


def test_served_rows_equal_transfer_infer_rows(server, serve_bundle, serve_data, tmp_path):
    """Same files, same classes and probabilities (within 1e-6) as `transfer infer --head rf`."""
    from transfer.runtime.infer import infer

    files = _files(serve_data)
    out = tmp_path / "p.csv"
    infer(serve_bundle, [str(f) for f in files], out=out, topk=3, head="rf")
    import csv

    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    with httpx.Client(base_url=server.url) as c:
        multi = c.post("/v1/predict?topk=3", files=[("image", (f.name, f.read_bytes(), "image/png")) for f in files[:30]])
        assert multi.status_code == 200
        served = multi.json()["predictions"]
        for f in files[30:]:  # the rest one by one, as raw bodies
            r = c.post("/v1/predict?topk=3", content=f.read_bytes(), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            served += r.json()["predictions"]
    assert len(served) == len(files) == 60
    for f, s in zip(files, served):
        ref = rows[str(f)]
        ref_prob = {ref[f"class{k}"]: float(ref[f"prob{k}"]) for k in (1, 2, 3)}
        assert s["status"] == 200 and len(s["top"]) == 3
        for k, t in enumerate(s["top"], 1):
            assert abs(t["prob"] - float(ref[f"prob{k}"])) <= 1e-6  # infer writes 6 decimals
            # the same class at each rank; another one only where two classes tie within 1e-6
            assert t["class"] == ref[f"class{k}"] or abs(ref_prob[t["class"]] - float(ref[f"prob{k}"])) <= 1e-6
    assert multi.json()["bundle_id"].startswith("sha256:") and multi.json()["head"] == "rf"


def test_concurrent_requests_share_model_calls(start_server, serve_data):
    """16 clients at once: images of different requests ride in one batch, answers unchanged."""
    server = start_server(max_wait_ms=50)
    files = _files(serve_data, 32)
    with httpx.Client(base_url=server.url) as c:
        alone = [c.post("/v1/predict", files={"image": (f.name, f.read_bytes())}).json()["predictions"][0]
                 for f in files]

    def one(f):
        return httpx.post(f"{server.url}/v1/predict", files={"image": (f.name, f.read_bytes())}).json()["predictions"][0]

    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, files))
    assert max(p["batch_size"] for p in together) > 1
    for a, p in zip(alone, together):
        assert [t["class"] for t in p["top"]] == [t["class"] for t in a["top"]]
        assert np.allclose([t["prob"] for t in p["top"]], [t["prob"] for t in a["top"]], atol=1e-6)
    m = httpx.get(f"{server.url}/metrics").text
    calls = float(next(l.split()[-1] for l in m.splitlines() if l.startswith("transfer_serve_batch_size_count")))
    images = float(next(l.split()[-1] for l in m.splitlines() if l.startswith("transfer_serve_batch_size_sum")))
    assert calls < images  # fewer model calls than images


def test_each_bad_input_gets_its_status_and_the_next_good_request_succeeds(start_server, serve_data):
    server = start_server(max_pixels=100_000, max_body_mb=0.05, max_images=3)
    url = f"{server.url}/v1/predict"
    good = _files(serve_data, 1)[0].read_bytes()
    cases = [
        ("empty body", lambda: httpx.post(url, content=b""), 400, "no body"),
        ("text body", lambda: httpx.post(url, content=b"hello, not an image"), 415, "not an image"),
        ("truncated", lambda: httpx.post(url, content=good[: len(good) // 2], headers={"content-type": "image/png"}),
         400, "truncated"),
        ("bomb", lambda: httpx.post(url, content=_png(np.zeros((400, 400, 3), np.uint8))), 413, "absurd dimensions"),
        ("big body", lambda: httpx.post(url, content=b"\0" * 60_000), 413, "too large"),
        ("big chunked body", lambda: httpx.post(url, content=iter([b"\0" * 20_000] * 4)), 413, "too large"),
        ("form without boundary", lambda: httpx.post(url, content=b"abc",
                                                     headers={"content-type": "multipart/form-data"}), 422, "malformed"),
        ("form with a bad part", lambda: httpx.post(url, content=b"--x\r\nbad header line\r\n\r\nabc\r\n--x--\r\n",
                                                    headers={"content-type": "multipart/form-data; boundary=x"}), 422,
         "malformed"),
        ("form without files", lambda: httpx.post(
            url, content=b'--x\r\nContent-Disposition: form-data; name="image"\r\n\r\ncat.jpg\r\n--x--\r\n',
            headers={"content-type": "multipart/form-data; boundary=x"}), 422, "no file"),
        ("too many images", lambda: httpx.post(url, files=[("image", ("a.png", good))] * 4), 422, "too many"),
        ("json", lambda: httpx.post(url, json={"image": "abc"}), 415, "json"),
        ("bad topk", lambda: httpx.post(url + "?topk=0", content=good), 422, "topk"),
        ("unknown route", lambda: httpx.get(f"{server.url}/v2/predict"), 404, "not found"),
        ("wrong method", lambda: httpx.get(url), 405, "not allowed"),
    ]
    for name, send, status, word in cases:
        r = send()
        _assert_error(r, status, word)
        _good(server.url, serve_data)


def test_one_bad_image_fails_only_its_own_entry(server, serve_data):
    f = _files(serve_data, 2)
    r = httpx.post(f"{server.url}/v1/predict", files=[
        ("image", (f[0].name, f[0].read_bytes())), ("image", ("notes.txt", b"plain text")),
        ("image", ("half.png", f[1].read_bytes()[: len(f[1].read_bytes()) // 2])), ("image", (f[1].name, f[1].read_bytes()))])
    assert r.status_code == 200
    p = r.json()["predictions"]
    assert [e["status"] for e in p] == [200, 415, 400, 200]
    assert [e["name"] for e in p] == [f[0].name, "notes.txt", "half.png", f[1].name]
    assert "not an image" in p[1]["error"] and p[1]["hint"] and "top" not in p[1]
    assert p[0]["top"] and p[3]["top"]


def test_api_key(start_server, serve_data, tmp_path):
    key = "k3y-" + "x" * 28
    log = tmp_path / "access.log"
    server = start_server(key=key.encode(), access_log=str(log))
    f = _files(serve_data, 1)[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong-key-000000000000"}, {"Authorization": key},
                    {"Authorization": "Basic " + key}):
        for method, path in (("POST", "/v1/predict"), ("GET", "/v1/model")):
            r = httpx.request(method, server.url + path, content=f if method == "POST" else None, headers=headers)
            _assert_error(r, 401, "api key")
            assert r.headers["www-authenticate"] == "Bearer"
            assert key not in r.text
    ok = httpx.post(f"{server.url}/v1/predict", content=f, headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and key not in ok.text
    assert httpx.get(f"{server.url}/v1/model", headers={"Authorization": f"Bearer {key}"}).json()["api_key_required"]
    for open_path in ("/healthz", "/readyz", "/metrics", "/", "/openapi.json"):
        assert httpx.get(server.url + open_path).status_code == 200, open_path
    server.stop()
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert len(lines) == 15 and {l["status"] for l in lines} >= {200, 401}
    assert key not in log.read_text() and "wrong-key" not in log.read_text()


class GatedModel:
    """The real model, but its calls wait until ``gate`` opens (holds the model thread busy)."""

    def __init__(self, model):
        self._m = model
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._m, name)

    def predict(self, x):
        assert self.gate.wait(30)
        return self._m.predict(x)

    def warm_up(self, max_batch):
        assert self.gate.wait(30)
        return self._m.warm_up(max_batch)


def _gated(serve_bundle, head="rf"):
    from transfer.serve.model import ModelOptions, load_served_model

    return GatedModel(load_served_model(serve_bundle, ModelOptions(head=head)))


def test_full_queue_answers_503_at_once_and_recovers(start_server, serve_bundle, serve_data):
    model = _gated(serve_bundle)
    model.gate.set()
    server = start_server(model=model, queue=2, max_wait_ms=0)
    model.gate.clear()  # warmed up; now hold the model
    f = _files(serve_data, 1)[0].read_bytes()
    with cf.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(httpx.post, f"{server.url}/v1/predict", content=f, timeout=30) for _ in range(2)]
        deadline = time.time() + 10
        while server.state.batcher.in_flight < 2 and time.time() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/predict", content=f)
        assert time.perf_counter() - t0 < 1.0  # at once, not after the held ones
        _assert_error(r, 503, "full")
        assert int(r.headers["retry-after"]) >= 1
        m = httpx.get(f"{server.url}/metrics").text
        assert 'transfer_serve_shed_total{reason="full"} 1.0' in m
        assert "transfer_serve_in_flight 2.0" in m
        model.gate.set()
        assert [h.result().status_code for h in held] == [200, 200]
    _good(server.url, serve_data)


def test_a_request_that_waited_too_long_gets_503(start_server, serve_bundle, serve_data):
    model = _gated(serve_bundle)
    model.gate.set()
    server = start_server(model=model, max_queue_ms=1000, max_batch=1, max_wait_ms=0)
    model.gate.clear()
    b = server.state.batcher
    f = _files(serve_data, 1)[0].read_bytes()

    def until(cond):
        deadline = time.time() + 20
        while not cond():
            assert time.time() < deadline
            time.sleep(0.01)

    with cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{server.url}/v1/predict", content=f, timeout=30)
        until(lambda: b.in_flight == 1 and b.depth == 0)  # the first is in the (held) model call
        second = pool.submit(httpx.post, f"{server.url}/v1/predict", content=f, timeout=30)
        until(lambda: b.depth == 1)  # the second waits for the model
        time.sleep(1.5)  # past the 1000 ms limit
        model.gate.set()
        assert first.result().status_code == 200, first.result().text
        r = second.result()
    _assert_error(r, 503, "waited")
    assert "retry-after" in r.headers
    _good(server.url, serve_data)


def test_not_ready_until_warmed_up(start_server, serve_bundle, serve_data):
    model = _gated(serve_bundle)
    server = start_server(model=model, wait_ready=False)
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    _assert_error(httpx.get(f"{server.url}/readyz"), 503, "warming up")
    f = _files(serve_data, 1)[0].read_bytes()
    _assert_error(httpx.post(f"{server.url}/v1/predict", content=f), 503, "warming up")
    model.gate.set()
    server._wait(lambda: server.state.ready, "warm up")
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200 and r.json()["bundle_id"] == model.id
    _good(server.url, serve_data)


def test_model_info_metrics_and_openapi(server, serve_bundle, serve_data):
    _good(server.url, serve_data)
    info = httpx.get(f"{server.url}/v1/model").json()
    from transfer.bundle import load_bundle
    import hashlib

    b = load_bundle(serve_bundle)
    assert info["class_names"] == b.class_names and info["input"]["height"] == 16
    assert info["bundle_id"] == "sha256:" + hashlib.sha256((serve_bundle / "manifest.json").read_bytes()).hexdigest()
    assert info["heads"] == ["network", "rf"] and info["serving"]["head"] == "rf"
    assert set(info["models"]) == {"onnx-fp32", "onnx-int8"} and info["verification"]["valid"] is True
    assert info["limits"]["max_batch"] == 32
    m = httpx.get(f"{server.url}/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    text = m.text
    for needle in ('transfer_serve_requests_total{method="POST",route="/v1/predict",status="200"}',
                   'transfer_serve_request_seconds_bucket{le="0.005",route="/v1/predict"}',
                   "transfer_serve_batch_size_bucket", "transfer_serve_queue_depth 0.0", "transfer_serve_ready 1.0",
                   'transfer_serve_images_total{status="ok"}', "process_cpu_seconds_total"):
        assert needle in text, needle
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())


def test_page_is_self_contained(server):
    import re

    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "/v1/predict" in html and "<script>" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page loads something from elsewhere"
    assert "http://" not in html and "https://" not in html


def test_int8_backend_and_network_head(start_server, serve_data):
    server = start_server(backend="onnxruntime-int8", head="network", topk=2)
    info = httpx.get(f"{server.url}/v1/model").json()["serving"]
    assert info["backend"] == "onnxruntime-int8" and info["model"] == "onnx-int8" and info["head"] == "network"
    f = _files(serve_data, 1)[0]
    r = httpx.post(f"{server.url}/v1/predict", files={"image": (f.name, f.read_bytes())})
    p = r.json()
    assert r.status_code == 200 and p["backend"] == "onnxruntime-int8" and p["head"] == "network"
    assert len(p["predictions"][0]["top"]) == 2
