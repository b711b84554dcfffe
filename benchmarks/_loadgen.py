"""HTTP load generator of bench_serve.py: its own process, asyncio over raw keep-alive sockets
(a few µs of client CPU per request, so on a small machine the server gets the cores).

Closed loop: ``--conns`` clients, each sends its next request when the last one answered.
Open loop: requests start on a fixed schedule at ``--rate`` per second whatever the answers
(latency counted from the scheduled start, so a slow server cannot hide queueing), over
``--max-conns`` keep-alive connections. Every request: multipart POST of one image (``curl -F image=@f``),
cycling through ``--images``. Prints one JSON object: counts by status, latency percentiles
by status, the slowest answer, throughput, client CPU seconds.

    python benchmarks/_loadgen.py --url http://127.0.0.1:8000/v1/predict --images DIR --conns 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


def build_requests(url: str, files: list[Path], mode: str) -> list[bytes]:
    u = urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    out = []
    for f in files:
        data = f.read_bytes()
        if mode == "multipart":
            b = b"----transferbench"
            body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="' + f.name.encode()
                    + b'"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n--" + b + b"--\r\n")
            ctype = b"multipart/form-data; boundary=" + b
        else:
            body, ctype = data, b"image/png"
        head = (f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: keep-alive\r\n").encode() + b"Content-Type: " + ctype + b"\r\n\r\n"
        out.append(head + body)
    return out


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.r = self.w = None

    async def request(self, data: bytes) -> int:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        self.w.write(data)
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"connection" and v.strip().lower() == b"close":
                close = True
        if length:
            await self.r.readexactly(length)
        if close:
            self.close()
        return status

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


async def closed_loop(host, port, reqs, conns, seconds, total):
    res = []
    t_end = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def client(i):
        c = Conn(host, port)
        while time.perf_counter() < t_end:
            n = next(counter)
            if total and n >= total:
                break
            t = time.perf_counter()
            try:
                st = await c.request(reqs[n % len(reqs)])
            except (OSError, asyncio.IncompleteReadError):
                st = -1
                c.close()
            res.append((st, time.perf_counter() - t))
        c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(conns)))
    return res, time.perf_counter() - t0


async def open_loop(host, port, reqs, rate, seconds, conns, timeout):
    """Requests scheduled at ``rate``/s for ``seconds``, sent over ``conns`` keep-alive connections;
    a request waits in the client while every connection is busy (its latency counts from its
    scheduled start). Requests not answered ``timeout`` s after their schedule count as status 0."""
    res = []
    q: asyncio.Queue = asyncio.Queue()
    t0 = time.perf_counter()
    n = int(rate * seconds)

    async def producer():
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            q.put_nowait((i, t0 + i / rate))
        for _ in range(conns):
            q.put_nowait(None)

    async def worker():
        c = Conn(host, port)
        while True:
            item = await q.get()
            if item is None:
                break
            i, scheduled = item
            left = scheduled + timeout - time.perf_counter()
            if left <= 0:
                res.append((0, time.perf_counter() - scheduled))
                continue
            try:
                st = await asyncio.wait_for(c.request(reqs[i % len(reqs)]), left)
            except asyncio.TimeoutError:
                st = 0
                c.close()
            except (OSError, asyncio.IncompleteReadError):
                st = -1
                c.close()
            res.append((st, time.perf_counter() - scheduled))
        c.close()

    await asyncio.gather(producer(), *(worker() for _ in range(conns)))
    return res, time.perf_counter() - t0, n, 0


def summarize(res, wall):
    n200 = sum(1 for st, _ in res if st == 200)
    out = {"requests": len(res), "seconds": wall, "per_s": len(res) / wall if wall else 0.0,
           "ok_per_s": n200 / wall if wall else 0.0, "status": {}}
    by = {}
    for st, dt in res:
        by.setdefault(st, []).append(dt)
    for st, lat in sorted(by.items()):
        a = np.asarray(lat) * 1000
        out["status"][str(st)] = {"n": len(a), "p50_ms": float(np.percentile(a, 50)),
                                  "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99)),
                                  "max_ms": float(a.max()), "over_2s": int((a > 2000).sum())}
    out["max_ms"] = max((dt for _, dt in res), default=0) * 1000
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--images", required=True, help="folder of .png files (cycled)")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--body", choices=["multipart", "raw"], default="multipart")
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=0, help="stop after this many (closed loop)")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second")
    ap.add_argument("--max-conns", type=int, default=256, help="open loop: connections")
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()
    files = sorted(Path(a.images).rglob("*.png"))[: a.limit]
    u = urlsplit(a.url)
    reqs = build_requests(a.url, files, a.body)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    c0 = os.times()
    if a.rate:
        res, wall, offered, dropped = asyncio.run(open_loop(u.hostname, u.port, reqs, a.rate, a.seconds, a.max_conns,
                                                            a.timeout))
        out = summarize(res, wall)
        out.update(offered=offered, offered_per_s=offered / a.seconds, client_dropped=dropped)
    else:
        res, wall = asyncio.run(closed_loop(u.hostname, u.port, reqs, a.conns, a.seconds, a.requests))
        out = summarize(res, wall)
    c1 = os.times()
    out["client_cpu_s"] = (c1.user - c0.user) + (c1.system - c0.system)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
