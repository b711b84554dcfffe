"""The guard in front of every request of the HTTP app (pure ASGI middleware): body-size
limit, API key, admission of predictions, request id, metrics and the JSON access log; with
the state the routes share (:class:`State`) and the error answer (:class:`ApiError`).
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .batcher import Batcher, Overloaded
from .model import ServedModel
from .prometheus import Metrics
from .serve_config import ServeConfig, key_matches


class ApiError(Exception):
    """An answer other than 200: ``status``, and the JSON ``{"error", "hint"}`` it sends."""

    def __init__(self, status: int, error: str, hint: str | None = None, *, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(error)
        self.status, self.error, self.hint = status, error, hint
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": self.error, "hint": self.hint, **self.extra}


def overloaded(exc: Overloaded, extra: dict | None = None) -> ApiError:
    return ApiError(503, exc.message, f"retry after {exc.retry_after} s, or send less at once",
                    headers={"Retry-After": str(exc.retry_after)}, extra=extra)


@dataclass
class State:
    """Everything the routes share; one per app."""

    model: ServedModel
    config: ServeConfig
    key: bytes | None
    metrics: Metrics
    batcher: Batcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    draining: bool = False
    warm_up_s: float | None = None
    warm_up_error: str | None = None
    started: float = field(default_factory=time.time)

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready and not self.draining else 0)

    def drain(self) -> None:
        """Stop taking work: /readyz turns 503, new predictions get 503 (in-flight ones finish)."""
        self.draining = True
        self.metrics.ready.set(0)


#: request ids: a random per-process prefix and a counter (uuid4 per request cost 5 % of a small request)
_RID_PREFIX = secrets.token_hex(4)
_RID_COUNTER = itertools.count(1)


class Guard:
    """Pure ASGI middleware around every request: body-size limit (413 before reading when
    Content-Length says so, else as soon as the limit is passed), the API key of ``/v1`` routes
    (401), admission of predictions (503 before anything else is done), request id, metrics,
    and the JSON access log (never the Authorization header).

    The key and the admission are checked here, before routing, so that a refusal costs as
    little as possible and a prediction pays for no per-request dependency resolution."""

    def __init__(self, app, state: State, access_log: logging.Logger | None):
        self.app = app
        self.state = state
        self.access = access_log

    def _admit(self, scope):
        """A ticket for a prediction (handed to the route in the scope), or the 503 to send now.

        Admission happens here, before routing and form parsing, so that under overload a
        refusal costs as little as possible. Not ready / draining: the route says so.
        """
        st = self.state
        if st.batcher is None or not st.ready or st.draining:
            return None
        try:
            ticket = st.batcher.admit()
        except Overloaded as exc:
            st.metrics.shed.labels("full").inc()
            return overloaded(exc)
        scope["transfer.ticket"] = ticket
        return ticket

    def _unauthorized(self, path: str, authorization: bytes | None) -> "ApiError | None":
        """The 401 for a ``/v1`` route without the server's key (``Authorization: Bearer KEY``)."""
        key = self.state.key
        if key is None or not path.startswith("/v1/"):
            return None
        scheme, _, given = (authorization or b"").decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and key_matches(given.strip(), key):
            return None
        return ApiError(401, "missing or wrong API key" if scheme.lower() == "bearer" else "this server needs an API key",
                        "send the header 'Authorization: Bearer <key>' with the key the server was started with",
                        headers={"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        limit = self.state.config.max_body_bytes
        info = {"status": 500, "bytes_in": 0, "bytes_out": 0}
        rid = None
        declared = None
        authorization = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
            elif k == b"x-request-id":
                rid = v.decode("latin-1")[:64]
            elif k == b"authorization":
                authorization = v
        rid = rid or f"{_RID_PREFIX}-{next(_RID_COUNTER):x}"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode("latin-1"))]
            elif message["type"] == "http.response.body":
                info["bytes_out"] += len(message.get("body", b""))
            await send(message)

        async def receive_wrapper():
            message = await receive()
            if message["type"] == "http.request":
                info["bytes_in"] += len(message.get("body", b""))
                if info["bytes_in"] > limit:
                    raise _too_large(limit)
            return message

        ticket = None
        try:
            if declared is not None and declared > limit:
                await _send_json(send_wrapper, _too_large(limit, declared))
                return
            refusal = self._unauthorized(scope["path"], authorization)
            if refusal is None and scope["path"] == PREDICT and scope["method"] == "POST":
                ticket = self._admit(scope)
                if isinstance(ticket, ApiError):
                    refusal, ticket = ticket, None
            if refusal is not None:  # refused before routing: the cheapest answers
                keep_alive = declared is not None and declared <= _DRAIN_BEFORE_503 and await _drain(receive)
                await _send_json(send_wrapper, refusal, close=not keep_alive)
                return
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if ticket is not None:
                ticket.close()
            seconds = time.perf_counter() - t0
            self.state.metrics.observe_request(scope["path"], scope["method"], info["status"], seconds)
            if self.access is not None:
                client = scope.get("client")
                self.access.info(json.dumps({
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope["method"], "path": scope["path"],
                    "query": scope.get("query_string", b"").decode("latin-1") or None,
                    "status": info["status"], "ms": round(seconds * 1000, 3),
                    "bytes_in": info["bytes_in"], "bytes_out": info["bytes_out"], "request_id": rid}))


PREDICT = "/v1/predict"
#: the status logged and counted for a request whose client disconnected (nginx's "client closed request")
CLIENT_GONE = 499
#: a refused request's body up to this size is read (and dropped) so its connection stays open
_DRAIN_BEFORE_503 = 256 * 1024


async def _drain(receive) -> bool:
    """Read and drop the rest of a request body; False when the client went away."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


def _too_large(limit: int, declared: int | None = None) -> ApiError:
    size = f" ({declared:,} bytes)" if declared is not None else ""
    return ApiError(413, f"request body too large{size}; the limit is {limit:,} bytes",
                    "send fewer or smaller images per request")


async def _send_json(send, err: ApiError, *, close: bool = True) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def access_logger(target: str | None) -> logging.Logger | None:
    """A logger writing one JSON line per request to ``target`` (a file path, or ``-`` for stderr)."""
    if not target:
        return None
    import sys

    lg = logging.getLogger(f"transfer.serve.access.{id(target)}")
    lg.handlers.clear()
    handler = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    return lg
