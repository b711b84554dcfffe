"""`transfer serve` on loopback: parity with `transfer infer`, batching, latency, overload, soak.

    python benchmarks/bench_serve.py [--work /tmp/transfer-bench-serve] [--quick] [--json out.json]

Every server is the real command (`python -m transfer.cli serve BUNDLE --port 0 ...`) in its
own process, and the load generator (benchmarks/_loadgen.py: asyncio over raw keep-alive
sockets, multipart POSTs like `curl -F image=@f`) is another process; this script only starts
them and reads the server's CPU time and RSS from /proc. The bare endpoint is the same stack
(FastAPI on uvicorn with uvloop + httptools) with one route that reads the body and answers
JSON (benchmarks/_bare_app.py), measured in the same run.

Bundles (built once into --work, then reused): arc2 at 32x32 trained 3 epochs on 2,000
Fashion-MNIST images and mobilenet_v2 at 224x224 (random init, frozen, 1 epoch on 600),
both exported with a RandomForest head; served with `--head rf`. Files: 200 Fashion-MNIST
test images as PNG.

Bars: served rows = `transfer infer` rows on the same 200 files (top-k classes; probabilities
within 1e-6); at 16 clients with the rf head, dynamic batching >= 1.3x `--max-batch 1` for
arc2 at 32x32 (MobileNetV2 at 224 reported); at 1 client, p50 <= bare p50 + `transfer
bench`'s batch-1 p50 (decode + model + head) + 1 ms; overload at 4x the sustainable rate for
30 s: every request answered 200 or 503 within 2 s, p99 of the 200s <= 3x the unloaded p99,
RSS bounded, /readyz OK afterwards; soak of 50,000 requests: RSS growth <= 10 %, no error;
each bad input gets its documented status and the next good request succeeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


from _common import ROOT, table

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
FMNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- set-up
def prepare(work: Path) -> dict:
    """The two bundles and the image folders (reused when present)."""
    from transfer.data.datasets import FASHION_MNIST_CLASSES, write_idx

    work.mkdir(parents=True, exist_ok=True)
    train, files = work / "fmnist-train", work / "files200"
    if not files.is_dir():
        write_idx(FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "train-labels-idx1-ubyte.gz", train,
                  class_names=FASHION_MNIST_CLASSES, limit=2000)
        write_idx(FMNIST / "t10k-images-idx3-ubyte.gz", FMNIST / "t10k-labels-idx1-ubyte.gz", files,
                  class_names=FASHION_MNIST_CLASSES, limit=200)
    out = {"files": files}
    for name, kw in (("arc2", dict(backbones="arc2", image_size=32, trainable="1", epochs=3, data=train)),
                     ("mnv2", dict(backbones="mobilenet_v2", image_size=224, trainable="0", epochs=1,
                                   data=_subset(train, work / "fmnist-600", 60)))):
        bundle = work / f"run-{name}" / "bundle"
        if not (bundle / "manifest.json").is_file():
            print(f"training and exporting the {name} bundle (once) ...", flush=True)
            subprocess.run([PY, "-c", _TRAIN, json.dumps({k: str(v) for k, v in kw.items()}), str(work / f"run-{name}")],
                           env=ENV, check=True)
        out[name] = bundle
    return out


_TRAIN = """
import json, sys
from transfer.trainer.config import load_config
from transfer.trainer.sweep import run_sweep
from transfer.export.api import export_bundle
kw, out = json.loads(sys.argv[1]), sys.argv[2]
d = {"out": out, "weights": "none", "batch_size": 32, "patience": 0, "workers": 2, "lr": 3e-3, "test": 0.1, **kw}
d["image_size"], d["epochs"] = int(d["image_size"]), int(d["epochs"])
res = run_sweep(load_config(None, d), progress=lambda s: None)
assert res.ok, res.failed
export_bundle(res.run_dir, head="rf", progress=None)
"""


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    if not dst.is_dir():
        for c in sorted(p for p in src.iterdir() if p.is_dir()):
            (dst / c.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(c.glob("*.png"))[:per_class]:
                (dst / c.name / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------- processes
class Proc:
    """A server process started from a command line that prints its URL; CPU and RSS from /proc."""

    def __init__(self, args: list[str], ready_path: str = "/readyz"):
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        self.url = None
        deadline = time.time() + 120
        lines = []
        while self.url is None and time.time() < deadline:
            line = self.p.stdout.readline()
            if not line and self.p.poll() is not None:
                break
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
        if self.url is None:
            self.p.kill()
            raise RuntimeError("server did not start:\n" + "".join(lines))
        threading.Thread(target=self.p.stdout.read, daemon=True).start()  # keep its pipe drained
        import httpx

        while time.time() < deadline:
            try:
                if ready_path is None or httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def cpu_s(self) -> float:
        f = open(f"/proc/{self.p.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in open(f"/proc/{self.p.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return -9

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.stop()


def server(bundle: Path, *extra: str) -> Proc:
    return Proc([PY, "-m", "transfer.cli", "serve", str(bundle), "--port", "0", "--head", "rf", *extra])


def bare() -> Proc:
    return Proc([PY, str(ROOT / "benchmarks" / "_bare_app.py")], ready_path=None)


def load(proc: Proc, path: str, images: Path, **kw) -> dict:
    """Run the load generator against ``proc``; adds the server's CPU ms per request."""
    args = [PY, str(ROOT / "benchmarks" / "_loadgen.py"), "--url", proc.url + path, "--images", str(images)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    c0, t0 = proc.cpu_s(), time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env=ENV, check=True)
    r = json.loads(out.stdout)
    cpu = proc.cpu_s() - c0
    r["server_cpu_ms_per_req"] = cpu * 1000 / max(r["requests"], 1)
    r["server_cores_used"] = cpu / (time.perf_counter() - t0)  # < 1: the server was short of CPU
    return r


def ok(r: dict) -> dict:
    return r["status"].get("200", {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")})


def machine_load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


# --------------------------------------------------------------------------- measurements
def parity(b: dict, res: dict) -> None:
    """Served rows vs `transfer infer` rows (CSV, 6 decimals) and vs the runtime's unrounded probabilities."""
    import concurrent.futures as cf

    import httpx

    from transfer.data.stream import decode_batches
    from transfer.runtime.heads import make_head
    from transfer.bundle import load_bundle
    from transfer.runtime.runners import make_runner

    files = sorted(str(p) for p in b["files"].rglob("*.png"))
    out = Path(b["files"]).parent / "infer200.csv"
    subprocess.run([PY, "-m", "transfer.cli", "infer", str(b["arc2"]), *files, "--head", "rf", "--topk", "3",
                    "--out", str(out), "-q"], env=ENV, check=True)
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    bd = load_bundle(b["arc2"])
    runner, head = make_runner(bd, None, "cpu"), make_head(bd, "rf")
    exact = {}
    for pb in decode_batches(files, bd.input_size, batch=32, recipe=bd.recipe):
        f, p = runner.run(pb.x)
        probs = head(f, p)
        for j, i in enumerate(pb.ok_index):
            exact[pb.items[i].path] = probs[j]
    with server(b["arc2"]) as s:
        def one(path):
            with open(path, "rb") as fh:
                r = httpx.post(s.url + "/v1/predict?topk=3", files={"image": (Path(path).name, fh.read())}, timeout=30)
            return path, r.status_code, r.json()["predictions"][0]

        with cf.ThreadPoolExecutor(8) as pool:  # concurrent: the served rows come from mixed batches
            served = list(pool.map(one, files))
    names = bd.class_names
    strict, tie_only, wrong = 0, 0, 0  # rows whose top-3 class order differs from infer's: all within ties?
    for f, st, p in served:
        ref_classes = [rows[f][f"class{k}"] for k in (1, 2, 3)]
        got = [t["class"] for t in p["top"]]
        if st != 200:
            wrong += 1
        elif got != ref_classes:
            strict += 1
            # a reordering is a tie when every served class has, in the runtime's own row, the probability
            # infer reported at that rank (within 1e-6): classes whose probabilities differ by less than that
            ok_tie = all(abs(float(exact[f][names.index(c)]) - float(rows[f][f"prob{k}"])) <= 1e-6
                         for k, c in enumerate(got, 1))
            tie_only += ok_tie
            wrong += not ok_tie
    same_classes = wrong == 0
    diff_csv = max(abs(t["prob"] - float(rows[f][f"prob{k}"])) for f, _, p in served for k, t in enumerate(p["top"], 1))
    diff_exact = max(abs(t["prob"] - float(exact[f][names.index(t["class"])])) for f, _, p in served for t in p["top"])
    batch_sizes = [p["batch_size"] for _, _, p in served]
    res["parity"] = {"files": len(served), "same_top3_classes": same_classes, "rows_ordered_differently": strict,
                     "of_which_ties_within_1e-6": tie_only, "max_diff_vs_infer_csv": diff_csv,
                     "max_diff_vs_unrounded_runtime": diff_exact, "max_batch_size_seen": max(batch_sizes),
                     "pass": same_classes and diff_csv <= 1e-6}
    print(f"parity: {len(served)} files, same top-3 classes: {same_classes} ({strict} rows ordered differently, "
          f"{tie_only} of them among classes tied within 1e-6), max |prob diff| vs infer CSV "
          f"{diff_csv:.2e} (CSV has 6 decimals), vs unrounded runtime {diff_exact:.2e}; batches up to "
          f"{max(batch_sizes)}", flush=True)


def bench_batch1(b: dict, res: dict) -> None:
    from transfer.data.image import load_image
    from transfer.runtime.bench import bench
    from transfer.serve.model import default_threads

    load_image(next(b["files"].rglob("*.png")))  # Pillow's PNG plugin loads once per process: not per image
    for name in ("arc2", "mnv2"):
        r = bench(b[name], backends=["onnxruntime"], batches=[1], head="rf", images=[str(b["files"])], seconds=3,
                  threads=default_threads(), progress=None)["rows"][0]
        total = r["p50_ms"] + r["decode_ms_per_img"] + r["head_ms_per_img"]
        res[f"bench_batch1_{name}"] = {"model_p50_ms": r["p50_ms"], "decode_ms": r["decode_ms_per_img"],
                                       "head_ms": r["head_ms_per_img"], "total_ms": total}
        print(f"transfer bench {name} batch 1: model p50 {r['p50_ms']:.3f} + decode {r['decode_ms_per_img']:.3f} "
              f"+ head {r['head_ms_per_img']:.3f} = {total:.3f} ms", flush=True)


def latency_1client(b: dict, res: dict, seconds: float) -> None:
    with bare() as s:
        res["bare_1"] = load(s, "/bare", b["files"], conns=1, seconds=seconds)
    with server(b["arc2"]) as s:
        res["arc2_1"] = load(s, "/v1/predict", b["files"], conns=1, seconds=seconds)
    with server(b["arc2"], "--head", "network") as s:  # the same without the RandomForest's ONNX Runtime session
        res["arc2_1_network"] = load(s, "/v1/predict", b["files"], conns=1, seconds=seconds)
    net = res["bench_batch1_arc2"]["model_p50_ms"] + res["bench_batch1_arc2"]["decode_ms"]
    bound_net = ok(res["bare_1"])["p50_ms"] + net + 1.0
    res["latency_bar_network_head"] = {"served_p50_ms": ok(res["arc2_1_network"])["p50_ms"], "bound_ms": bound_net,
                                       "pass": ok(res["arc2_1_network"])["p50_ms"] <= bound_net}
    print(f"1 client, network head: served p50 {ok(res['arc2_1_network'])['p50_ms']:.3f} ms vs bound {bound_net:.3f}; "
          f"server CPU {res['arc2_1_network']['server_cpu_ms_per_req']:.3f} ms/request", flush=True)
    bare_p50, p50 = ok(res["bare_1"])["p50_ms"], ok(res["arc2_1"])["p50_ms"]
    bound = bare_p50 + res["bench_batch1_arc2"]["total_ms"] + 1.0
    res["latency_bar"] = {"served_p50_ms": p50, "bare_p50_ms": bare_p50, "bench_ms": res["bench_batch1_arc2"]["total_ms"],
                          "bound_ms": bound, "pass": p50 <= bound}
    print(f"1 client: served p50 {p50:.3f} ms vs bound {bound:.3f} (bare {bare_p50:.3f} + bench "
          f"{res['bench_batch1_arc2']['total_ms']:.3f} + 1); server CPU {res['arc2_1']['server_cpu_ms_per_req']:.3f} "
          f"ms/request (bare {res['bare_1']['server_cpu_ms_per_req']:.3f}), p99 {ok(res['arc2_1'])['p99_ms']:.2f} ms; "
          f"{machine_load()}", flush=True)


def throughput_16(b: dict, res: dict, seconds: float) -> None:
    with bare() as s:
        res["bare_16"] = load(s, "/bare", b["files"], conns=16, seconds=seconds)
    print(f"bare endpoint, 16 clients: {res['bare_16']['ok_per_s']:.0f} req/s, p50 {ok(res['bare_16'])['p50_ms']:.2f} ms, "
          f"server CPU {res['bare_16']['server_cpu_ms_per_req']:.3f} ms/req, {res['bare_16']['server_cores_used']:.2f} "
          f"cores; {machine_load()}", flush=True)
    for name, secs in (("arc2", seconds), ("mnv2", seconds * 1.5)):
        for mode, extra in (("batched", ()), ("batch1", ("--max-batch", "1"))):
            with server(b[name], "--max-queue-ms", "0", *extra) as s:  # serve every request: pure batching effect
                load(s, "/v1/predict", b["files"], conns=16, seconds=2)  # warm the path
                r = load(s, "/v1/predict", b["files"], conns=16, seconds=secs)
                r["batch_hist"] = _batch_sizes(s)
            res[f"{name}_16_{mode}"] = r
            print(f"{name} 16 clients {mode}: {r['ok_per_s']:.1f} req/s answered 200 ({r['requests'] - ok(r)['n']} "
                  f"other), server used {r['server_cores_used']:.2f} cores, p50 {ok(r)['p50_ms']:.1f} ms, p99 "
                  f"{ok(r)['p99_ms']:.1f} ms, server CPU {r['server_cpu_ms_per_req']:.2f} ms/req, mean batch "
                  f"{r['batch_hist']['mean']:.1f}; {machine_load()}", flush=True)
        ratio = res[f"{name}_16_batched"]["ok_per_s"] / res[f"{name}_16_batch1"]["ok_per_s"]
        res[f"{name}_batching_ratio"] = ratio
        print(f"{name}: dynamic batching / --max-batch 1 = {ratio:.2f}x", flush=True)


def _batch_sizes(s: Proc) -> dict:
    import httpx

    m = httpx.get(s.url + "/metrics").text
    count = float(re.search(r"^transfer_serve_batch_size_count (\S+)", m, re.M).group(1))
    total = float(re.search(r"^transfer_serve_batch_size_sum (\S+)", m, re.M).group(1))
    return {"calls": count, "images": total, "mean": total / count if count else 0.0}


def overload(b: dict, res: dict, seconds: float) -> None:
    import httpx

    rate = 4 * res["arc2_16_batched"]["ok_per_s"]
    samples = []
    with server(b["arc2"]) as s:
        load(s, "/v1/predict", b["files"], conns=16, seconds=2)
        rss0 = s.rss_mb()
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(s.rss_mb())
                time.sleep(0.5)

        t = threading.Thread(target=sample)
        t.start()
        r = load(s, "/v1/predict", b["files"], rate=rate, seconds=seconds, timeout=10, max_conns=256)
        stop.set()
        t.join()
        ready = httpx.get(s.url + "/readyz").status_code
        after = load(s, "/v1/predict", b["files"], conns=1, seconds=3)
    statuses = {k: v["n"] for k, v in r["status"].items()}
    late = sum(v["n"] if k not in ("200", "503") else v["over_2s"] for k, v in r["status"].items())
    answered_in_2s = all(k in ("200", "503") and v["max_ms"] <= 2000 for k, v in r["status"].items())
    p99_200 = ok(r)["p99_ms"]
    unloaded = {"1_client_p99_ms": ok(res["arc2_1"])["p99_ms"], "16_clients_p99_ms": ok(res["arc2_16_batched"])["p99_ms"]}
    res["overload"] = {"offered_per_s": r["offered_per_s"], "rate_target": rate, "statuses": statuses,
                       "client_dropped": r["client_dropped"], "answered_200_or_503_within_2s": answered_in_2s,
                       "answered_later_than_2s_or_not_at_all": late, "p99_200_ms": p99_200, "p50_200_ms": ok(r)["p50_ms"],
                       "p99_503_ms": r["status"].get("503", {}).get("p99_ms"), "unloaded": unloaded,
                       "rss_before_mb": rss0, "rss_max_mb": max(samples), "readyz_after": ready,
                       "after_1_client_p50_ms": ok(after)["p50_ms"], "goodput_200_per_s": statuses.get("200", 0) / seconds,
                       "server_cpu_ms_per_req": r["server_cpu_ms_per_req"], "server_cores_used": r["server_cores_used"],
                       "load": machine_load()}
    print(f"overload: {r['offered']} requests at {r['offered_per_s']:.0f}/s (4x {res['arc2_16_batched']['ok_per_s']:.0f}) for "
          f"{seconds:.0f} s: {statuses}; all 200/503 within 2 s: {answered_in_2s} ({late} not); p99 of 200s {p99_200:.1f} ms "
          f"(unloaded p99: 1 client {unloaded['1_client_p99_ms']:.1f}, 16 clients {unloaded['16_clients_p99_ms']:.1f}); "
          f"RSS {rss0:.0f} -> max {max(samples):.0f} MB; /readyz after: {ready}; server used "
          f"{r['server_cores_used']:.2f} cores, {r['server_cpu_ms_per_req']:.2f} ms CPU/answer; {machine_load()}", flush=True)


def soak(b: dict, res: dict, n: int) -> None:
    with server(b["arc2"]) as s:
        load(s, "/v1/predict", b["files"], conns=16, requests=2000, seconds=600)
        rss0 = s.rss_mb()
        r = load(s, "/v1/predict", b["files"], conns=16, requests=n, seconds=3600)
        rss1 = s.rss_mb()
        code = s.stop()
    errors = sum(v["n"] for k, v in r["status"].items() if k != "200")
    res["soak"] = {"requests": r["requests"], "errors": errors, "rss_after_warmup_mb": rss0, "rss_after_mb": rss1,
                   "growth": rss1 / rss0 - 1, "per_s": r["per_s"], "exit_code_after_sigterm": code,
                   "pass": errors == 0 and r["requests"] == n and rss1 <= 1.1 * rss0}
    print(f"soak: {r['requests']} requests, {errors} errors, RSS {rss0:.1f} -> {rss1:.1f} MB "
          f"({100 * (rss1 / rss0 - 1):+.1f} %), {r['per_s']:.0f} req/s; exit code after SIGTERM {code}", flush=True)


def bad_inputs(b: dict, res: dict) -> None:
    import httpx

    good = sorted(b["files"].rglob("*.png"))[0].read_bytes()
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")
    bomb = buf.getvalue()
    rows = []
    with server(b["arc2"], "--max-pixels", "1000000", "--max-body-mb", "1", "--max-images", "4") as s:
        u = s.url + "/v1/predict"
        cases = [
            ("empty body", lambda: httpx.post(u, content=b""), 400),
            ("not an image", lambda: httpx.post(u, content=b"hello"), 415),
            ("truncated PNG", lambda: httpx.post(u, content=good[: len(good) // 2]), 400),
            (f"4000x4000 PNG ({len(bomb)} bytes)", lambda: httpx.post(u, content=bomb), 413),
            ("body over the limit", lambda: httpx.post(u, content=b"\0" * 2_000_000), 413),
            ("form without boundary", lambda: httpx.post(u, content=b"x", headers={"content-type": "multipart/form-data"}), 422),
            ("5 images (limit 4)", lambda: httpx.post(u, files=[("image", ("a.png", good))] * 5), 422),
            ("JSON body", lambda: httpx.post(u, json={"x": 1}), 415),
            ("wrong API route", lambda: httpx.post(s.url + "/v1/nope", content=good), 404),
        ]
        for name, send, want in cases:
            r = send()
            body = r.json()
            nxt = httpx.post(u, content=good).status_code
            rows.append([name, want, r.status_code, "error" in body and "hint" in body, nxt])
    res["bad_inputs"] = rows
    res["bad_inputs_pass"] = all(r[1] == r[2] and r[3] and r[4] == 200 for r in rows)
    print(table(["input", "documented", "got", "{error, hint}", "next good request"], rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/transfer-bench-serve")
    ap.add_argument("--quick", action="store_true", help="shorter runs (soak of 5,000) to check the script")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--only", help="comma list of steps: parity,bench,latency,throughput,overload,soak,bad")
    a = ap.parse_args()
    sec = 4.0 if a.quick else 15.0
    b = prepare(Path(a.work))
    res = {"machine": {"cpus": os.cpu_count(), "load_at_start": machine_load()}}
    steps = a.only.split(",") if a.only else ["parity", "bench", "latency", "throughput", "overload", "soak", "bad"]
    t0 = time.time()
    if "parity" in steps:
        parity(b, res)
    if "bench" in steps or "latency" in steps:
        bench_batch1(b, res)
    if "latency" in steps:
        latency_1client(b, res, sec * 2 / 3)
    if "throughput" in steps or "overload" in steps:
        throughput_16(b, res, sec)
    if "overload" in steps:
        overload(b, res, 8.0 if a.quick else 30.0)
    if "soak" in steps:
        soak(b, res, 5000 if a.quick else 50_000)
    if "bad" in steps:
        bad_inputs(b, res)
    res["machine"]["load_at_end"] = machine_load()
    res["seconds"] = time.time() - t0
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    print(f"done in {res['seconds']:.0f} s; {machine_load()}")


if __name__ == "__main__":
    main()
