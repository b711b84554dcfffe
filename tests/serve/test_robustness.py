"""A server that forgets clients who left and survives a failing batch: real uvicorn on an
ephemeral loopback port, a real bundle, a real HTTP client (httpx). The slow model and the
failing stacking are the real served model with one stage changed."""

from __future__ import annotations

import concurrent.futures as cf
import io
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

HANG_UP_S = 0.1
BATCH_S = 0.3


def _png(value: int, size=16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class SlowModel:
    """The real served model whose batches take ``seconds`` longer (``hold[v]`` seconds for a
    batch with a uniform image of grey ``v``); records the mean pixel of every image that
    reaches the model (a uniform grey image is recognised by its value)."""

    def __init__(self, model, seconds: float, hold: dict[int, float] | None = None):
        self._m = model
        self.seconds = seconds
        self.hold = hold or {}
        self.seen: list[float] = []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._m, name)

    def predict(self, x):
        means = np.asarray(x, np.float32).reshape(len(x), -1).mean(1).round().tolist()
        with self.lock:
            self.seen.extend(means)
        time.sleep(max([self.seconds] + [self.hold.get(int(v), 0.0) for v in means]) if self.seconds else 0.0)
        return self._m.predict(x)

    def count(self, value: int) -> int:
        with self.lock:
            return sum(1 for v in self.seen if v == value)


class FailingStack:
    """The real served model whose next ``failures`` batches fail while stacking their images."""

    def __init__(self, model, failures: int = 1):
        self._m = model
        self.failures = failures

    def __getattr__(self, name):
        return getattr(self._m, name)

    def stack(self, images):
        if self.failures > 0:
            self.failures -= 1
            raise MemoryError("injected: no memory for the batch")
        return self._m.stack(images)


def _real_model(serve_bundle):
    from transfer.serve.model import ModelOptions, load_served_model

    return load_served_model(serve_bundle, ModelOptions(head="rf"))


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _hang_up_after(client: httpx.Client, start: threading.Barrier, body: bytes, seconds: float) -> str:
    """POST (when every client is ready) and give up after ``seconds``, closing the connection."""
    start.wait(10)
    try:
        with client:
            r = client.post("/v1/predict", content=body, headers={"content-type": "image/png"}, timeout=seconds)
        return f"answered {r.status_code}"
    except httpx.TimeoutException:
        return "hung up"


def _until(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.parametrize("max_batch, blocker", [(1, False), (32, True)])
def test_clients_that_hang_up_cost_no_model_call(start_server, serve_bundle, max_batch, blocker):
    """Six clients post and hang up after 0.1 s while batches take 0.3 s: at most one of their
    images reaches the model (the one that was already running); the rest are dropped, counted,
    and free their places at once. With another client's batch running when they arrive
    (``blocker``, 1 s so that the six surely arrive during it), none does."""
    model = SlowModel(_real_model(serve_bundle), 0.0, hold={40: 1.0})
    server = start_server(model=model, max_batch=max_batch, max_wait_ms=5)
    model.seconds = BATCH_S
    mine, other = _png(200), _png(40)
    clients = [httpx.Client(base_url=server.url) for _ in range(6)]  # made first: they post together
    start = threading.Barrier(6)
    with cf.ThreadPoolExecutor(7) as pool:
        held = None
        if blocker:  # a patient client whose batch holds the model when the six arrive
            held = pool.submit(httpx.post, server.url + "/v1/predict", content=other,
                               headers={"content-type": "image/png"}, timeout=30)
            _until(lambda: model.count(40) == 1)
        six = [pool.submit(_hang_up_after, c, start, mine, HANG_UP_S) for c in clients]
        assert [f.result() for f in six] == ["hung up"] * 6
        # the hang-ups free the queue and the places at once, not when the model gets to them
        _until(lambda: server.state.batcher.depth == 0 and server.state.batcher.in_flight <= 1, timeout=2)
        if held is not None:
            assert not held.done(), "the places were freed only after the running batch ended"
            assert held.result().status_code == 200
    _until(lambda: server.state.batcher.in_flight == 0)
    reached = model.count(200)
    assert reached <= (0 if blocker else 1), model.seen
    assert _metric(server.url, 'transfer_serve_dropped_total{stage="queued"}') == 6 - reached
    assert _metric(server.url, 'transfer_serve_images_total{status="499"}') == 6 - reached
    assert _metric(server.url, 'transfer_serve_requests_total{method="POST",route="/v1/predict",status="499"}') == 6
    model.seconds = 0.0
    r = httpx.post(server.url + "/v1/predict", content=mine, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["predictions"][0]["top"]
    assert model.count(200) == reached + 1


def test_a_client_that_leaves_while_uploading_is_dropped_quietly(start_server, serve_bundle, caplog):
    """Half a body, then the connection closes: no 500, no traceback, counted as dropped while reading."""
    server = start_server()
    u = urlsplit(server.url)
    body = _png(90)
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(0.1)
    _until(lambda: _metric(server.url, 'transfer_serve_dropped_total{stage="reading"}') == 1)
    _until(lambda: server.state.batcher.in_flight == 0)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert _metric(server.url, 'transfer_serve_requests_total{method="POST",route="/v1/predict",status="500"}') == 0
    r = httpx.post(server.url + "/v1/predict", content=body, headers={"content-type": "image/png"})
    assert r.status_code == 200


def test_an_exception_in_stacking_answers_500_and_the_next_request_is_200(start_server, serve_bundle, caplog):
    model = FailingStack(_real_model(serve_bundle), failures=0)
    server = start_server(model=model)
    model.failures = 1
    img = _png(120)
    r = httpx.post(server.url + "/v1/predict", content=img, headers={"content-type": "image/png"}, timeout=10)
    assert r.status_code == 500, r.text
    body = r.json()
    assert "stacking" in body["error"] and "MemoryError" in body["error"] and "retry" in body["hint"]
    assert body["predictions"][0]["status"] == 500 and "top" not in body["predictions"][0]
    assert any("stacking" in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")
    nxt = httpx.post(server.url + "/v1/predict", content=img, headers={"content-type": "image/png"}, timeout=10)
    assert nxt.status_code == 200 and nxt.json()["predictions"][0]["top"]
    assert httpx.get(server.url + "/readyz").status_code == 200
    # a form of several images: every image of the failed batch says so, the request itself is 200
    model.failures = 1
    many = httpx.post(server.url + "/v1/predict", files=[("image", (f"{i}.png", img)) for i in range(3)], timeout=10)
    assert many.status_code == 200 and [e["status"] for e in many.json()["predictions"]] == [500] * 3
    assert httpx.post(server.url + "/v1/predict", content=img).status_code == 200
