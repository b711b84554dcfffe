"""`transfer serve --ray`: the same app on a local Ray Serve with 2 replicas."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "transfer[serve-ray]")')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_replicas_serve_the_same_api(serve_bundle, serve_data, tmp_path):
    import ray

    from transfer.options import make
    from transfer.runtime.infer import infer
    from transfer.serve.ray_serve import start_ray, stop_ray
    from transfer.serve.serve_config import ServeConfig

    cfg = make(ServeConfig, dict(port=_free_port(), replicas=2, cpus_per_replica=0.5, head="rf", max_wait_ms=20,
                                 ray=True))
    url = start_ray(serve_bundle, cfg, progress=None)
    try:
        deadline = time.time() + 120
        while httpx.get(url + "/readyz", timeout=5).status_code != 200:
            assert time.time() < deadline, "Ray Serve replicas did not become ready"
            time.sleep(0.5)
        files = sorted(serve_data.rglob("*.png"))[:12]
        out = tmp_path / "p.csv"
        infer(serve_bundle, [str(f) for f in files], out=out, topk=2, head="rf")
        import csv

        ref = list(csv.DictReader(out.open()))
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/predict?topk=2", files=[("image", (f.name, f.read_bytes())) for f in files])
            assert r.status_code == 200, r.text
            for row, p in zip(ref, r.json()["predictions"]):
                ref_prob = {row["class1"]: float(row["prob1"]), row["class2"]: float(row["prob2"])}
                for k, t in enumerate(p["top"], 1):
                    assert abs(t["prob"] - float(row[f"prob{k}"])) <= 1e-6
                    assert t["class"] == row[f"class{k}"] or abs(ref_prob.get(t["class"], -1) - t["prob"]) <= 1e-6
            bad = c.post("/v1/predict", content=b"not an image")
            assert bad.status_code == 415 and set(bad.json()) >= {"error", "hint"}
            pids = {c.get("/healthz").json()["pid"] for _ in range(40)}
            assert len(pids) == 2  # both replicas answer
            assert c.get("/v1/model").json()["serving"]["head"] == "rf"
            assert "transfer_serve_requests_total" in c.get("/metrics").text
        from ray import serve

        st = serve.status().applications["transfer"]
        assert st.status == "RUNNING"
        assert sum(d.replica_states.get("RUNNING", 0) for d in st.deployments.values()) == 2
    finally:
        stop_ray()
        ray.shutdown()


@pytest.mark.slow
def test_the_command_with_ray_stops_cleanly_on_sigterm(serve_bundle, serve_data):
    """`transfer serve --ray` as users run it: serves, and SIGTERM deletes the app and exits 0."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "transfer.cli", "serve", str(serve_bundle), "--ray", "--replicas", "2",
                             "--cpus-per-replica", "0.5", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "not ready in 180 s"
            time.sleep(1)
        f = sorted(serve_data.rglob("*.png"))[0]
        r = httpx.post(url + "/v1/predict", files={"image": (f.name, f.read_bytes())}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["top"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "serving on" in err and "stopped after" in err
    finally:
        if proc.poll() is None:
            proc.kill()
