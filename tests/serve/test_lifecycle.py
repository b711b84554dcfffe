"""`transfer serve` as users run it: refusals before listening, and SIGTERM / SIGINT draining."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from transfer.cli import cli

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_refuses_a_bundle_that_verify_refuses(serve_bundle, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(serve_bundle, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["serve", str(bad), "--port", "0"])
    assert r.exit_code == 1 and "does not match its manifest" in r.output and "model.onnx" in r.output
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "nothing"), "--port", "0"])
    assert r.exit_code == 1 and "bundle not found" in r.output


@pytest.mark.parametrize("args, words", [
    (["--max-batch", "0"], ["--max-batch: invalid value 0", "accepted: an integer >= 1"]),
    (["--queue", "-1"], ["--queue: invalid value -1", "accepted: an integer >= 1"]),
    (["--port", "70000"], ["--port: invalid value 70000", "accepted: an integer >= 0 and <= 65535"]),
    (["--replicas", "2"], ["--replicas: invalid value 2", "add --ray"]),
    (["--head", "svm"], ["no head 'svm'"]),
    (["--backend", "tensorrt"], ["no tensorrt engine"]),
])
def test_bad_options_are_refused_before_listening(serve_bundle, args, words):
    r = CliRunner().invoke(cli, ["serve", str(serve_bundle), "--port", "0", *args])
    assert r.exit_code in (1, 2), r.output
    for w in words:
        assert w.lower() in r.output.lower(), r.output


def test_api_key_file_is_checked(serve_bundle, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    r = CliRunner().invoke(cli, ["serve", str(serve_bundle), "--port", "0", "--api-key-file", str(short)])
    assert r.exit_code == 2 and "--api-key-file" in r.output and "at least 16" in r.output and "abc" not in r.output


def _start(bundle, *extra, key=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "transfer.cli", "serve", str(bundle), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
            while time.time() < deadline:
                try:
                    if httpx.get(url + "/readyz").status_code == 200:
                        return proc, url
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start: " + "".join(lines) + proc.stderr.read())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_requests_in_flight_and_exits_0(serve_bundle, serve_data, sig):
    proc, url = _start(serve_bundle, "--drain-s", "10", "--head", "rf")
    try:
        img = sorted(serve_data.rglob("*.png"))[0].read_bytes()
        sent_half = threading.Event()

        def slow_body():  # a request still uploading when the signal comes
            yield img[:100]
            sent_half.set()
            time.sleep(1.0)
            yield img[100:]

        result = {}

        def send():
            result["r"] = httpx.post(url + "/v1/predict", content=slow_body(), headers={"content-type": "image/png"},
                                     timeout=30)

        t = threading.Thread(target=send)
        t.start()
        assert sent_half.wait(10)
        time.sleep(0.2)
        proc.send_signal(sig)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(url + "/healthz", timeout=2)
        t.join(30)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["predictions"][0]["top"]
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopping: draining" in err and "stopped after draining" in err
    finally:
        if proc.poll() is None:
            proc.kill()
