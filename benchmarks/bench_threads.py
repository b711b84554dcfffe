"""ONNX Runtime's threads in `transfer serve` and `transfer infer`: how many, and whether they spin.

    python benchmarks/bench_threads.py [--work /tmp/transfer-bench-threads] [--seconds 8] [--repeats 2]

Decides the one default of ``--threads`` (:func:`transfer.runtime.sessions.default_threads`) and
the server's ``spinning`` (:func:`transfer.serve.model.open_model`). Bundles: those of
benchmarks/bench_serve.py (arc2 at 32x32 and mobilenet_v2 at 224x224, rf head; built into
--work by its ``prepare``, reused when present) and its 200 Fashion-MNIST PNG files.

* serve: the real app (:func:`transfer.serve.server.serve` on a model from ``open_model(...,
  spinning=S)`` with ``threads=T``) in its own process on every core of the machine; wrk (one
  thread, 16 keep-alive connections, multipart POSTs of the PNGs) pinned to core 1; answers/s,
  p50 / p99 and the server's CPU ms per answer.
* infer: :func:`transfer.runtime.infer.infer` over the PNGs (listed 10 times: 2,000 rows) in a
  fresh process per run, 2 decode threads, batch 32; images/s and the process's CPU ms per image.

Configurations alternate and each is repeated (``--repeats``); the table gives the median, the
machine's load average is printed with it (other jobs share the cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, table
from bench_serve import ENV, PY, Proc, describe, load, prepare

SERVE = r"""
import sys
from transfer.bundle import load_bundle
from transfer.options import make
from transfer.serve.model import open_model
from transfer.serve.server import serve
from transfer.serve.serve_config import ServeConfig
bundle, threads, spinning = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
cfg = make(ServeConfig, {"port": 0, "head": "rf", "max_queue_ms": 0, "threads": threads})
model = open_model(load_bundle(bundle), cfg.model, spinning=spinning)
serve(bundle, cfg, model=model, progress=lambda line: print(line, flush=True))
"""

INFER = r"""
import json, os, sys, time
from transfer.runtime.infer import infer
bundle, files, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t0, c0 = time.perf_counter(), os.times()
s = infer(bundle, [files] * 10, out=out, recursive=True, batch=32, workers=2, threads=threads, head="rf")
t, c = time.perf_counter() - t0, os.times()
print(json.dumps({"images": s.total, "seconds": t, "cpu_s": (c.user - c0.user) + (c.system - c0.system)}))
"""


class Unpinned(Proc):
    """A server process on every core (bench_serve's are pinned to one)."""

    def __init__(self, args: list[str]):
        import bench_serve

        pinned, bench_serve.pinned = bench_serve.pinned, lambda core, a: a
        try:
            super().__init__(args)
        finally:
            bench_serve.pinned = pinned


def serve_runs(b: dict, seconds: float, repeats: int, configs) -> dict:
    files = sorted(b["files"].rglob("*.png"))[:64]
    out: dict = {}
    for rep in range(repeats):
        for name in ("arc2", "mnv2"):
            for threads, spin in configs:
                with Unpinned([PY, "-c", SERVE, str(b[name]), str(threads), spin]) as s:
                    load(s, "/v1/predict", files, conns=16, seconds=2)  # warm the path
                    r = load(s, "/v1/predict", files, conns=16, seconds=seconds)
                out.setdefault((name, threads, spin), []).append(r)
                print(f"serve {name} threads {threads} spinning {spin} (run {rep + 1}): " + describe(r), flush=True)
    return out


def infer_runs(b: dict, repeats: int, threads_list) -> dict:
    out: dict = {}
    for rep in range(repeats):
        for name in ("arc2", "mnv2"):
            for threads in threads_list:
                csv = Path(b["files"]).parent / "threads-infer.csv"
                r = subprocess.run([PY, "-c", INFER, str(b[name]), str(b["files"]), str(threads), str(csv)],
                                   capture_output=True, text=True, env=ENV, check=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                out.setdefault((name, threads), []).append(res)
                print(f"infer {name} threads {threads} (run {rep + 1}): {res['images'] / res['seconds']:.1f} img/s, "
                      f"{1000 * res['cpu_s'] / res['images']:.3f} CPU ms/img", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/transfer-bench-threads")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="serve,infer")
    a = ap.parse_args()
    b = prepare(Path(a.work))
    t0 = time.time()
    print(f"machine: {len(__import__('os').sched_getaffinity(0))} cpus; load average at start "
          f"{' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}", flush=True)
    med = statistics.median
    if "serve" in a.only:
        configs = [(1, "on"), (2, "on"), (2, "off"), (1, "off")]
        res = serve_runs(b, a.seconds, a.repeats, configs)
        rows = [[name, threads, spin, round(med(r["ok_per_s"] for r in rs), 1),
                 round(med(r["server_cpu_ms_per_req"] for r in rs), 3), round(med(r["p50_ms"] for r in rs), 2),
                 round(med(r["p99_ms"] for r in rs), 2)] for (name, threads, spin), rs in res.items()]
        print(table(["model", "threads", "spinning", "answers/s", "server CPU ms/answer", "p50 ms", "p99 ms"], rows))
    if "infer" in a.only:
        res = infer_runs(b, a.repeats, (1, 2))
        rows = [[name, threads, round(med(r["images"] / r["seconds"] for r in rs), 1),
                 round(med(1000 * r["cpu_s"] / r["images"] for r in rs), 3)] for (name, threads), rs in res.items()]
        print(table(["model", "threads", "img/s", "CPU ms/img"], rows))
    print(f"done in {time.time() - t0:.0f} s; load average {' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
