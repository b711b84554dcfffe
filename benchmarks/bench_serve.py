"""`transfer serve` on loopback, measured with a native load generator on its own core.

    python benchmarks/bench_serve.py [--work /tmp/transfer-bench-serve] [--quick] [--json out.json] [--only STEPS]
                                     [--cam-bundle BUNDLE]

Every server is the real command (`python -m transfer.cli serve BUNDLE --port 0 ...`) in its own
process pinned to core 0 (`taskset -c 0`); the load comes from `wrk` (Debian's wrk 4.1, C, one
thread) pinned to core 1 (`taskset -c 1 wrk -t1 ...`) with benchmarks/_wrk_post.lua: multipart
POSTs of real PNG files as `curl -F image=@f` sends them. So the server never competes with its
load generator for a core, and the generator is not the bottleneck (a Python generator on the
same two cores measured itself). Both sides' CPU seconds are reported for every phase (the
server's from /proc/PID/stat, wrk's from its rusage), and so is the CPU other processes took on
each core meanwhile (/proc/stat), which is what a shared machine adds. The bare endpoint
(benchmarks/_bare_app.py: the same FastAPI + uvicorn stack, one route that reads the body and
answers JSON) is measured the same way in the same run, and `transfer bench` (batch 1, pinned
to core 0 too) gives the model's own latency. The Python client (httpx) is used only to check
answers: served rows = `transfer infer` rows, and each bad input's status. Every load phase is
bounded in time (wrk -d) and, for the soak, in requests; everything listens on 127.0.0.1 only.

Bundles (built once into --work, then reused): arc2 at 32x32 trained 3 epochs on 2,000
Fashion-MNIST images and mobilenet_v2 at 224x224 (random init, frozen, 1 epoch on 600),
both exported with a RandomForest head; served with `--head rf`. Files: 200 Fashion-MNIST
test images as PNG.

Bars: served rows = `transfer infer` rows on the same 200 files (top-k classes; probabilities
within 1e-6); 1 connection: served p50 <= bare endpoint p50 + `transfer bench` batch-1 p50 + 1 ms
(the model call's p50; the 1 ms has to cover decoding, the head, batching and the thread hand-offs); 300 connections with `--queue 8`: p99 <= 2 s, no answer later
than 2 s (wrk --timeout 2s: 0 timeouts), only 200 and 503 statuses, /readyz 200 afterwards;
16 connections with the rf head: dynamic batching >= 1.3x `--max-batch 1` (arc2; MobileNetV2
reported); soak of 50,000 requests: RSS growth <= 10 %, no error (a 503 for a request that
waited longer than --max-queue-ms is shedding, counted apart); each bad input gets its
documented status and the next good request succeeds; class activation maps (step ``cam``: a
MobileNetV2 224 bundle with maps, `--cam-bundle`, default the mnv2 bundle when exported with maps),
1 connection, `?cam=1` vs without, alternated: p50 with maps <= 1.3x p50 without.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


from _common import ROOT, table

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
FMNIST = Path("/usr/share/datasets/fashion-mnist")
SERVER_CORE, CLIENT_CORE = 0, 1
WRK = "/usr/bin/wrk"
LUA = ROOT / "benchmarks" / "_wrk_post.lua"
TICK = os.sysconf("SC_CLK_TCK")


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
def pinned(core: int, args: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *args]


class Proc:
    """A server process (pinned to ``SERVER_CORE``) started from a command line that prints its
    URL; its CPU time and RSS from /proc."""

    def __init__(self, args: list[str], ready_path: str | None = "/readyz"):
        self.p = subprocess.Popen(pinned(SERVER_CORE, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=ENV)
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
        """User + system CPU seconds of every thread of the process so far."""
        f = open(f"/proc/{self.p.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / TICK

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


def core_busy_s() -> dict[int, float]:
    """Busy CPU seconds of each core since boot (/proc/stat: everything but idle and iowait)."""
    out = {}
    for line in open("/proc/stat"):
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            v = [int(x) for x in m.group(2).split()]
            out[int(m.group(1))] = (sum(v[:8]) - v[3] - v[4]) / TICK
    return out


def wrk(url: str, files: list[Path], *, conns: int, seconds: float, requests: int = 0,
        timeout_s: float = 10.0) -> dict:
    """One wrk run (pinned to ``CLIENT_CORE``): ``conns`` keep-alive connections for at most
    ``seconds`` (and at most ``requests`` answers when > 0); the summary written by _wrk_post.lua
    plus wrk's own CPU seconds (its rusage). An answer later than ``timeout_s`` counts as a timeout
    (and its latency is not recorded); requests still unanswered when the run ends count nowhere."""
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        out, marker = Path(tmp) / "wrk.json", Path(tmp) / "done"
        env = dict(os.environ, WRK_JSON=str(out), WRK_STOP_AFTER=str(requests), WRK_DONE_FILE=str(marker))
        args = pinned(CLIENT_CORE, [WRK, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s",
                                    "--timeout", f"{timeout_s:g}s", "-s", str(LUA), url, "--", *map(str, files)])
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        signalled = False
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if requests and not signalled and marker.exists():  # the request budget is spent
                p.send_signal(signal.SIGINT)  # wrk stops, prints and runs done()
                signalled = True
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        text = p.stdout.read().decode(errors="replace")
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({p.returncode}):\n{text}")
        r = json.loads(out.read_text())
    r["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    r["seconds"] = r["duration_us"] / 1e6
    return r


def load(proc: Proc, path: str, files: list[Path], **kw) -> dict:
    """wrk against ``proc``; adds both sides' CPU and the CPU others took on each core meanwhile."""
    c0, busy0, t0 = proc.cpu_s(), core_busy_s(), time.perf_counter()
    r = wrk(proc.url + path, files, **kw)
    cpu, busy1, span = proc.cpu_s() - c0, core_busy_s(), time.perf_counter() - t0
    wall = r["seconds"]
    n = max(r["requests"], 1)
    r["server_cpu_s"] = cpu
    r["server_cpu_ms_per_req"] = cpu * 1000 / n
    r["server_cores_used"] = cpu / wall
    r["client_cpu_ms_per_req"] = r["client_cpu_s"] * 1000 / n
    r["client_cores_used"] = r["client_cpu_s"] / wall
    # what other processes took of each core (its busy time minus our process on it) over the same span
    r["others_on_server_core"] = max(0.0, (busy1[SERVER_CORE] - busy0[SERVER_CORE] - cpu) / span)
    r["others_on_client_core"] = max(0.0, (busy1[CLIENT_CORE] - busy0[CLIENT_CORE] - r["client_cpu_s"]) / span)
    r["per_s"] = r["requests"] / wall
    r["ok_per_s"] = r["statuses"].get("200", 0) / wall
    r["p50_ms"], r["p99_ms"] = r["latency_us"]["p50"] / 1000, r["latency_us"]["p99"] / 1000
    r["max_ms"] = r["latency_us"]["max"] / 1000
    r["load"] = machine_load()
    return r


def describe(r: dict) -> str:
    """One line: rate, latency, statuses, both sides' CPU and what others took."""
    return (f"{r['requests']} answers in {r['seconds']:.1f} s ({r['per_s']:.0f}/s; statuses {r['statuses']}, "
            f"timeouts {r['errors']['timeout']}, socket errors {r['errors']['connect'] + r['errors']['read'] + r['errors']['write']}); "
            f"p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, max {r['max_ms']:.1f} ms; server CPU "
            f"{r['server_cpu_ms_per_req']:.3f} ms/req ({r['server_cores_used']:.2f} of core {SERVER_CORE}), wrk CPU "
            f"{r['client_cpu_ms_per_req']:.3f} ms/req ({r['client_cores_used']:.2f} of core {CLIENT_CORE}); others took "
            f"{r['others_on_server_core']:.2f} / {r['others_on_client_core']:.2f} of those cores; {r['load']}")


def machine_load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def image_files(b: dict, n: int = 64) -> list[Path]:
    return sorted(b["files"].rglob("*.png"))[:n]


# --------------------------------------------------------------------------- measurements
def parity(b: dict, res: dict) -> None:
    """Served rows vs `transfer infer` rows (CSV, 6 decimals) and vs the runtime's unrounded probabilities."""
    import concurrent.futures as cf

    import httpx

    from transfer.bundle import load_bundle
    from transfer.data.stream import decode_batches
    from transfer.runtime.predict_config import ModelOptions
    from transfer.runtime.predictor import Predictor

    files = sorted(str(p) for p in b["files"].rglob("*.png"))
    out = Path(b["files"]).parent / "infer200.csv"
    subprocess.run([PY, "-m", "transfer.cli", "infer", str(b["arc2"]), *files, "--head", "rf", "--topk", "3",
                    "--out", str(out), "-q"], env=ENV, check=True)
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    bd = load_bundle(b["arc2"])
    predictor = Predictor.open(bd, ModelOptions(head="rf", providers="cpu"))
    exact = {}
    for pb in decode_batches(files, bd.input_size, batch=32, recipe=bd.recipe):
        probs = predictor.predict(pb.x).probs
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
    """`transfer bench` at batch 1 on the server's core (one ONNX Runtime thread, as the server has
    there); and, to show what the 1 ms allowance covers, the server's own stages on one image:
    decoding the uploaded bytes and the model + rf head call (ServedModel.predict), p50 over the files."""

    from transfer.runtime.bench import bench
    from transfer.runtime.sessions import default_threads
    from transfer.serve.model import ModelOptions, load_served_model
    from transfer.serve.pixels import decode_upload

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CORE})
    try:
        data = [p.read_bytes() for p in image_files(b)]
        for name in ("arc2", "mnv2"):
            r = bench(b[name], backends=["onnxruntime"], batches=[1], head="rf", images=[str(b["files"])], seconds=3,
                      threads=default_threads(), progress=None)["rows"][0]
            m = load_served_model(b[name], ModelOptions(head="rf", threads=default_threads()))
            xs = [decode_upload(d, "x.png", m.size, max_pixels=10**8, recipe=m.recipe) for d in data]
            dec = _p50_ms(lambda i: decode_upload(data[i % len(data)], "x.png", m.size, max_pixels=10**8,
                                                  recipe=m.recipe))
            call = _p50_ms(lambda i: m.predict(m.stack([xs[i % len(xs)]])))
            res[f"bench_batch1_{name}"] = {"model_p50_ms": r["p50_ms"], "model_p99_ms": r["p99_ms"],
                                           "bench_decode_ms": r["decode_ms_per_img"], "bench_head_ms": r["head_ms_per_img"],
                                           "upload_decode_p50_ms": dec, "served_model_call_p50_ms": call,
                                           "threads": default_threads()}
            print(f"transfer bench {name} batch 1 on core {SERVER_CORE}: model p50 {r['p50_ms']:.3f} ms (p99 "
                  f"{r['p99_ms']:.3f}); the server's stages on one image: decoding the upload {dec:.3f} ms, "
                  f"model + rf head {call:.3f} ms (p50)", flush=True)
    finally:
        os.sched_setaffinity(0, before)


def _p50_ms(fn, n: int = 400, warmup: int = 20) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return float(sorted(times)[n // 2]) * 1000


def latency_1client(b: dict, res: dict, seconds: float) -> None:
    files = image_files(b)
    with bare() as s:
        res["bare_1"] = r = load(s, "/bare", files, conns=1, seconds=seconds)
    print("bare endpoint, 1 connection: " + describe(r), flush=True)
    with server(b["arc2"]) as s:
        load(s, "/v1/predict", files, conns=1, seconds=1)  # warm the path
        res["arc2_1"] = r = load(s, "/v1/predict", files, conns=1, seconds=seconds)
    print("arc2 rf head, 1 connection: " + describe(r), flush=True)
    with server(b["arc2"], "--head", "network") as s:  # the same without the RandomForest's ONNX Runtime session
        load(s, "/v1/predict", files, conns=1, seconds=1)
        res["arc2_1_network"] = r = load(s, "/v1/predict", files, conns=1, seconds=seconds)
    print("arc2 network head, 1 connection: " + describe(r), flush=True)
    bench1 = res["bench_batch1_arc2"]
    bare_p50, model_p50 = res["bare_1"]["p50_ms"], bench1["model_p50_ms"]
    bound = bare_p50 + model_p50 + 1.0  # the 1 ms covers decode, the head, batching and the hand-offs
    for key, run, head in (("latency_bar", "arc2_1", "rf"), ("latency_bar_network_head", "arc2_1_network", "network")):
        p50 = res[run]["p50_ms"]
        rest = p50 - bare_p50 - model_p50
        res[key] = {"head": head, "served_p50_ms": p50, "bare_p50_ms": bare_p50, "bench_model_p50_ms": model_p50,
                    "bound_ms": bound, "beyond_bare_and_model_ms": rest, "pass": p50 <= bound}
        print(f"1 connection, {head} head: served p50 {p50:.3f} ms vs bound {bound:.3f} ms (bare {bare_p50:.3f} + "
              f"`transfer bench` batch-1 p50 {model_p50:.3f} + 1): {'met' if p50 <= bound else 'NOT met'}; "
              f"{rest:.3f} ms beyond bare + model", flush=True)


def throughput_16(b: dict, res: dict, seconds: float) -> None:
    files = image_files(b)
    with bare() as s:
        res["bare_16"] = r = load(s, "/bare", files, conns=16, seconds=seconds)
    print("bare endpoint, 16 connections: " + describe(r), flush=True)
    for name, secs in (("arc2", seconds), ("mnv2", seconds * 1.5)):
        for mode, extra in (("batched", ()), ("batch1", ("--max-batch", "1"))):
            with server(b[name], "--max-queue-ms", "0", *extra) as s:  # serve every request: pure batching effect
                load(s, "/v1/predict", files, conns=16, seconds=2)  # warm the path
                r = load(s, "/v1/predict", files, conns=16, seconds=secs)
                r["batch_hist"] = _batch_sizes(s)
            res[f"{name}_16_{mode}"] = r
            print(f"{name} 16 connections {mode} (mean batch {r['batch_hist']['mean']:.1f}): " + describe(r), flush=True)
        ratio = res[f"{name}_16_batched"]["ok_per_s"] / res[f"{name}_16_batch1"]["ok_per_s"]
        cpu_ratio = res[f"{name}_16_batch1"]["server_cpu_ms_per_req"] / res[f"{name}_16_batched"]["server_cpu_ms_per_req"]
        res[f"{name}_batching_ratio"] = ratio
        res[f"{name}_batching_cpu_ratio"] = cpu_ratio
        print(f"{name}: dynamic batching / --max-batch 1 = {ratio:.2f}x answers/s, {cpu_ratio:.2f}x fewer CPU ms "
              f"per answer", flush=True)


def _batch_sizes(s: Proc) -> dict:
    import httpx

    m = httpx.get(s.url + "/metrics").text
    count = float(re.search(r"^transfer_serve_batch_size_count (\S+)", m, re.M).group(1))
    total = float(re.search(r"^transfer_serve_batch_size_sum (\S+)", m, re.M).group(1))
    return {"calls": count, "images": total, "mean": total / count if count else 0.0}


class RssSampler:
    """The server's RSS every half second while a load runs."""

    def __init__(self, proc: Proc):
        self.proc, self.samples, self._stop = proc, [proc.rss_mb()], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            self.samples.append(self.proc.rss_mb())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def overload(b: dict, res: dict, seconds: float, conns: int = 300) -> None:
    """``conns`` connections, far more than the server answers at once: with ``--queue 8`` the rest
    must get a quick 503 (the bar), with the default ``--queue 256`` they wait (reported); the bare
    endpoint under the same connections is the stack's own floor."""
    import httpx

    files = image_files(b)
    with bare() as s:
        res[f"bare_{conns}"] = r = load(s, "/bare", files, conns=conns, seconds=seconds)
    print(f"bare endpoint, {conns} connections: " + describe(r), flush=True)
    for queue, timeout in ((8, 2.0), (256, 10.0)):
        with server(b["arc2"], "--queue", str(queue)) as s:
            load(s, "/v1/predict", files, conns=16, seconds=2)
            with RssSampler(s) as rss:
                r = load(s, "/v1/predict", files, conns=conns, seconds=seconds, timeout_s=timeout)
            r["readyz_after"] = httpx.get(s.url + "/readyz").status_code
            after = load(s, "/v1/predict", files, conns=1, seconds=2)
        r.update(rss_before_mb=rss.samples[0], rss_max_mb=max(rss.samples), after_1_conn_p50_ms=after["p50_ms"],
                 wrk_timeout_s=timeout)
        res[f"overload_queue{queue}"] = r
        print(f"arc2 rf head, {conns} connections, --queue {queue} (wrk --timeout {timeout:g}s): " + describe(r), flush=True)
        print(f"  RSS {r['rss_before_mb']:.0f} -> max {r['rss_max_mb']:.0f} MB; /readyz after: {r['readyz_after']}; "
              f"1 connection right after: p50 {after['p50_ms']:.2f} ms", flush=True)
    q8 = res["overload_queue8"]
    other = {k: v for k, v in q8["statuses"].items() if k not in ("200", "503")}
    socket_errors = q8["errors"]["connect"] + q8["errors"]["read"] + q8["errors"]["write"]
    res["overload_bar"] = {"p99_ms": q8["p99_ms"], "timeouts": q8["errors"]["timeout"], "other_statuses": other,
                           "socket_errors": socket_errors, "readyz_after": q8["readyz_after"],
                           "pass": q8["p99_ms"] <= 2000 and q8["errors"]["timeout"] == 0 and not other
                           and socket_errors == 0 and q8["readyz_after"] == 200}
    print(f"{conns} connections, --queue 8: p99 {q8['p99_ms']:.1f} ms (bar 2000), timeouts {q8['errors']['timeout']}, "
          f"statuses {q8['statuses']}, socket errors {socket_errors}, /readyz after {q8['readyz_after']}: "
          f"{'met' if res['overload_bar']['pass'] else 'NOT met'}", flush=True)


def soak(b: dict, res: dict, n: int) -> None:
    files = image_files(b)
    with server(b["arc2"]) as s:
        load(s, "/v1/predict", files, conns=16, requests=2000, seconds=120)
        rss0 = s.rss_mb()
        r = load(s, "/v1/predict", files, conns=16, requests=n, seconds=1800)
        rss1 = s.rss_mb()
        code = s.stop()
    shed = r["statuses"].get("503", 0)  # a request that waited longer than --max-queue-ms: shed by design
    errors = r["requests"] - r["statuses"].get("200", 0) - shed
    socket_errors = r["errors"]["connect"] + r["errors"]["read"] + r["errors"]["write"] + r["errors"]["timeout"]
    res["soak"] = {"requests": r["requests"], "errors": errors, "shed_503": shed, "socket_errors": socket_errors,
                   "rss_after_warmup_mb": rss0, "rss_after_mb": rss1, "growth": rss1 / rss0 - 1, "per_s": r["per_s"],
                   "p99_ms": r["p99_ms"], "server_cpu_ms_per_req": r["server_cpu_ms_per_req"],
                   "exit_code_after_sigterm": code,
                   "pass": errors == 0 and socket_errors == 0 and r["requests"] >= n and rss1 <= 1.1 * rss0}
    print(f"soak: {describe(r)}\n  RSS {rss0:.1f} -> {rss1:.1f} MB ({100 * (rss1 / rss0 - 1):+.1f} %); exit code after "
          f"SIGTERM {code}", flush=True)


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


def cam_cost(b: dict, res: dict, seconds: float, bundle: Path) -> None:
    """`?cam=1` vs plain on the same server (network head), 1 connection, alternated twice; the
    median of each side's p50."""
    files = image_files(b)
    if not json.loads((bundle / "manifest.json").read_text()).get("cam", {}).get("available"):
        print(f"cam: {bundle} has no maps (export it with this version, or give --cam-bundle)", flush=True)
        return
    p50 = {"plain": [], "cam": []}
    with server(bundle, "--head", "network") as s:
        load(s, "/v1/predict?cam=1", files, conns=1, seconds=1)  # warm both paths
        load(s, "/v1/predict", files, conns=1, seconds=1)
        for _ in range(2):
            for mode, path in (("plain", "/v1/predict"), ("cam", "/v1/predict?cam=1")):
                r = load(s, path, files, conns=1, seconds=seconds)
                p50[mode].append(r["p50_ms"])
                print(f"mobilenet_v2 224 network head, 1 connection, {path}: " + describe(r), flush=True)
    plain, cam = statistics.median(p50["plain"]), statistics.median(p50["cam"])
    res["cam_bar"] = {"plain_p50_ms": plain, "cam_p50_ms": cam, "ratio": cam / plain, "runs": p50,
                      "pass": cam <= 1.3 * plain}
    print(f"?cam=1 p50 {cam:.2f} ms vs {plain:.2f} ms without: {cam / plain:.3f}x (bar <= 1.3x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/transfer-bench-serve")
    ap.add_argument("--quick", action="store_true", help="shorter runs (soak of 5,000) to check the script")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--only", help="comma list of steps: parity,bench,latency,throughput,overload,soak,bad,cam")
    ap.add_argument("--cam-bundle", help="a MobileNetV2 bundle with maps for the cam step [default: the mnv2 bundle]")
    a = ap.parse_args()
    if not os.access(WRK, os.X_OK):
        sys.exit(f"{WRK} not found: apt-get install wrk")
    if len(os.sched_getaffinity(0)) < 2 or not {SERVER_CORE, CLIENT_CORE} <= os.sched_getaffinity(0):
        sys.exit(f"needs cores {SERVER_CORE} and {CLIENT_CORE} (one for the server, one for wrk)")
    sec = 4.0 if a.quick else 10.0
    b = prepare(Path(a.work))
    res = {"machine": {"cpus": os.cpu_count(), "load_at_start": machine_load(), "server_core": SERVER_CORE,
                       "client_core": CLIENT_CORE, "wrk": subprocess.run([WRK, "-v"], capture_output=True,
                                                                          text=True).stdout.split("\n")[0].strip()}}
    steps = a.only.split(",") if a.only else ["parity", "bench", "latency", "throughput", "overload", "soak", "bad",
                                              "cam"]
    t0 = time.time()
    if "parity" in steps:
        parity(b, res)
    if "bench" in steps or "latency" in steps:
        bench_batch1(b, res)
    if "latency" in steps:
        latency_1client(b, res, sec)
    if "throughput" in steps:
        throughput_16(b, res, sec)
    if "overload" in steps:
        overload(b, res, sec)
    if "soak" in steps:
        soak(b, res, 5000 if a.quick else 50_000)
    if "bad" in steps:
        bad_inputs(b, res)
    if "cam" in steps:
        cam_cost(b, res, sec, Path(a.cam_bundle) if a.cam_bundle else b["mnv2"])
    res["machine"]["load_at_end"] = machine_load()
    res["seconds"] = time.time() - t0
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    bars = {k: v["pass"] for k, v in res.items() if isinstance(v, dict) and "pass" in v}
    for name in ("arc2_batching_ratio",):
        if name in res:
            bars[name + " >= 1.3"] = res[name] >= 1.3
    if "bad_inputs_pass" in res:
        bars["bad_inputs"] = res["bad_inputs_pass"]
    print(table(["bar", "met"], [[k, "met" if v else "NOT met"] for k, v in bars.items()]))
    print(f"done in {res['seconds']:.0f} s; {machine_load()}")


if __name__ == "__main__":
    main()
