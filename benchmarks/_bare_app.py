"""The bare endpoint of bench_serve.py: the same stack as `transfer serve` (FastAPI on uvicorn with
uvloop and httptools), one route that reads the request body and answers a small JSON object.

    python benchmarks/_bare_app.py   # prints "listening on http://127.0.0.1:PORT"
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/bare")
async def bare(request: Request):
    body = await request.body()
    return {"ok": True, "bytes": len(body)}


if __name__ == "__main__":
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)).run(sockets=[sock])
