"""The HTTP app: FastAPI routes over a :class:`~transfer.serve.model.ServedModel` and a
:class:`~transfer.serve.batcher.Batcher`. uvicorn runs it locally; Ray Serve runs the same
app in every replica (:mod:`transfer.serve.ray_serve`).

Routes (every error is JSON ``{"error", "hint"}``):

==================  =====================================================================
``POST /v1/predict``  one or more images as multipart file fields, or one raw image body
``GET /v1/model``     classes, input, models, heads, verification, batching and limits
``GET /healthz``      200 while the process is alive
``GET /readyz``       200 once the bundle is verified and the model warmed up; 503 before
                      that and while draining
``GET /metrics``      Prometheus text format (:mod:`transfer.serve.prometheus`)
``GET /``             a self-contained page to try the model (:mod:`transfer.serve.page`)
``GET /openapi.json`` the OpenAPI schema
==================  =====================================================================
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..errors import ConfigError, ImageDecodeError
from ._deps import check_installed

check_installed()  # the serve extra: a clear install hint instead of an ImportError below

import fastapi  # noqa: E402
from fastapi import APIRouter, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.openapi.utils import get_openapi  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402

from .batcher import BatchFailed, Batcher, ClientGone, Overloaded, Result
from .guard import CLIENT_GONE, ApiError, Guard, State, access_logger, overloaded
from .model import ServedModel
from .page import page_html
from .pixels import decode_upload, status_of
from .prometheus import Metrics
from .serve_config import ServeConfig

log = logging.getLogger(__name__)


@dataclass
class Upload:
    field: str
    name: str
    data: bytes


def create_app(model: ServedModel, config: ServeConfig, *, key: bytes | None = None,
               wait_for_warm_up: bool = False):
    """The ASGI app serving ``model`` with ``config``.

    Args:
        model: a loaded :class:`ServedModel` (:func:`transfer.serve.model.load_served_model`).
        config: a validated :class:`ServeConfig`.
        key: the API key (``/v1`` routes then need ``Authorization: Bearer KEY``), or ``None``.
        wait_for_warm_up: finish the warm-up before the app starts (Ray Serve: a replica gets
            traffic once started); otherwise it runs in the background and ``/readyz`` says
            503 until it is done (uvicorn: ``/healthz`` answers meanwhile).

    Returns:
        the app (FastAPI wrapped in :class:`Guard`); ``app.state.transfer`` is the :class:`State`.

    Example::

        app = create_app(load_served_model("runs/digits/bundle", ModelOptions()), ServeConfig())
        uvicorn.run(app, host="127.0.0.1", port=8000)
    """

    state = State(model=model, config=config, key=key, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        state.batcher = Batcher(model.predict, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000,
                                capacity=config.queue,
                                max_queue_s=config.max_queue_ms / 1000 if config.max_queue_ms else None,
                                on_batch=lambda s: state.metrics.observe_batch(s.size, s.seconds),
                                stack=model.stack)
        state.metrics.bind(depth=lambda: state.batcher.depth, in_flight=lambda: state.batcher.in_flight)
        state.decode_pool = ThreadPoolExecutor(config.workers, thread_name_prefix="transfer-decode")
        state.batcher.start()
        warm = loop.run_in_executor(state.batcher.model_thread, model.warm_up, config.max_batch)
        warm.add_done_callback(functools.partial(_warmed, state))
        if wait_for_warm_up:
            await asyncio.shield(warm)
        try:
            yield
        finally:
            state.drain()
            await state.batcher.stop()
            state.decode_pool.shutdown(wait=True)

    app = fastapi.FastAPI(
        title="transfer serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Image classification with a verified transfer bundle. Errors are JSON {error, hint}.")
    app.state.transfer = state
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        hints = {404: "see GET /openapi.json for the routes", 405: "see GET /openapi.json for the methods"}
        return JSONResponse({"error": str(exc.detail), "hint": hints.get(exc.status_code)},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(parts), "hint": "see GET /openapi.json"},
                            status_code=422)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})",
                             "hint": "the server log has the details; report it if it repeats"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(page_html(auth=state.key is not None))

    @app.get("/healthz", summary="Liveness: 200 while the process runs")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 3), "pid": os.getpid()}

    @app.get("/readyz", summary="Readiness: 200 once the model is verified and warmed up",
             responses={503: {"description": "warming up, failed to warm up, or draining"}})
    async def readyz():
        if state.draining:
            raise ApiError(503, "draining: the server is shutting down", "send requests to another replica",
                           headers={"Retry-After": "1"})
        if state.warm_up_error:
            raise ApiError(503, f"warm-up failed: {state.warm_up_error}", "see the server log")
        if state.batcher is not None and state.batcher.stopped_by:
            raise ApiError(503, f"the batcher stopped: {state.batcher.stopped_by}", "restart the server; see its log")
        if not state.ready:
            raise ApiError(503, "warming up", "retry in a moment", headers={"Retry-After": "1"})
        return {"status": "ready", "bundle_id": model.id, "warm_up_s": state.warm_up_s}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    v1 = APIRouter(prefix="/v1")  # the API key is checked by Guard

    @v1.get("/model", summary="The served bundle: classes, input, models, heads, verification")
    async def model_info():
        return {**model.info(), "limits": _limits(config), "api_key_required": state.key is not None}

    @v1.post("/predict", summary="Classify one or more images",
             description=_PREDICT_DOC, openapi_extra=_PREDICT_BODY,
             responses={200: {"description": "per image: top-k classes with probabilities, or its error"},
                        **{s: {"description": d} for s, d in _PREDICT_ERRORS.items()}})
    async def predict(request: Request):  # no declared parameters: no dependency resolution per request
        return await _predict(state, request, _topk(request), _cam(request, model))

    app.include_router(v1)
    return _guarded(app, state, config)


def _guarded(app, state: State, config: ServeConfig):
    """Install :class:`Guard` as the outermost user middleware (inside Starlette's error handler,
    so an :class:`ApiError` raised while reading the body becomes its JSON answer)."""
    app.add_middleware(Guard, state=state, access_log=access_logger(config.access_log))
    return app


def _openapi(app) -> dict:
    """The schema FastAPI builds, plus what Guard checks: the bearer key on every ``/v1`` route."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the key of --api-key-file"}}
        for path, ops in schema.get("paths", {}).items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"HTTPBearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def _topk(request: Request) -> int | None:
    """``?topk=N`` (N >= 1), or None.

    Raises:
        ApiError: 422 for anything else.
    """
    raw = request.query_params.get("topk")
    if raw is None:
        return None
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise ApiError(422, f"invalid request: query.topk must be a whole number >= 1 (got {raw[:20]!r})",
                       "see GET /openapi.json")
    return k


#: what ``?cam=`` accepts
_CAM_ON, _CAM_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _cam(request: Request, model: ServedModel) -> tuple[int | None] | None:
    """``?cam=1`` (and ``?cam_class=NAME``): ``(class index or None,)`` when maps are asked, else None.

    Raises:
        ApiError: 422 for another value, a class the bundle does not have, or a bundle without maps
            (the hint says why it has none and what to do).
    """
    raw = request.query_params.get("cam")
    cls = request.query_params.get("cam_class")
    if raw is None or raw.lower() in _CAM_OFF:
        if cls is not None:
            raise ApiError(422, "invalid request: query.cam_class needs cam=1", "add cam=1 to the query")
        return None
    if raw.lower() not in _CAM_ON:
        raise ApiError(422, f"invalid request: query.cam must be 1 or 0 (got {raw[:20]!r})", "see GET /openapi.json")
    if model.cam is None:
        message, hint = model.cam_problem
        raise ApiError(422, f"no class activation maps: {message}", hint)
    try:
        return (model.cam_class(cls),)
    except ConfigError as exc:
        raise ApiError(422, f"invalid request: query.cam_class: {exc.message}", "see GET /v1/model for the classes"
                       ) from None


def _map_entry(model: ServedModel, pred, pixels, cls, metrics) -> dict:
    """One image's map (in a decode thread: numpy and PNG encoding), its cost in the metrics."""
    t = time.perf_counter()
    entry = model.map_entry(pred, pixels, cls)
    metrics.cam_seconds.observe(time.perf_counter() - t)
    return entry


def _warmed(state: State, fut) -> None:
    exc = fut.exception()
    if exc is not None:
        state.warm_up_error = f"{type(exc).__name__}: {exc}"
        log.error("warm-up failed: %s", state.warm_up_error)
        return
    state.warm_up_s = round(fut.result(), 4)
    state.set_ready(True)


def _limits(config: ServeConfig) -> dict:
    return {"max_body_bytes": config.max_body_bytes, "max_images": config.max_images,
            "max_pixels": config.max_pixels, "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
            "queue": config.queue, "max_queue_ms": config.max_queue_ms or None, "topk": config.topk}


async def _read_uploads(request: Request, config: ServeConfig) -> list[Upload]:
    """The images of a request: every file field of a multipart form, or the raw body.

    Raises:
        ApiError: 422 for a malformed form, a form without files or too many files; 415 for JSON.
    """
    try:
        return await _read_body(request, config)
    except ClientDisconnect:
        raise ApiError(CLIENT_GONE, "the client disconnected while sending the request",
                       "nothing was run; send the request again") from None


async def _read_body(request: Request, config: ServeConfig) -> list[Upload]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=config.max_images, max_fields=config.max_images + 16)
        except StarletteHTTPException as exc:  # python-multipart's own message
            too_many = "too many files" in str(exc.detail).lower()
            raise ApiError(422, f"{'too many images' if too_many else 'malformed multipart form'}: {exc.detail}",
                           f"send at most {config.max_images} images per request" if too_many else
                           "send the image as a form file field, e.g. curl -F image=@cat.jpg URL") from None
        ups = []
        for fld, value in form.multi_items():
            if isinstance(value, UploadFile):
                ups.append(Upload(fld, value.filename or fld, await value.read()))
        await form.close()
        if not ups:
            raise ApiError(422, "the form has no file field",
                           "send the image as a file field, e.g. curl -F image=@cat.jpg URL")
        return ups
    if ctype == "application/json":
        raise ApiError(415, "JSON bodies are not accepted",
                       "send the image itself (curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' URL) "
                       "or a multipart form (curl -F image=@cat.jpg URL)")
    data = await request.body()
    if not data:
        raise ApiError(400, "the request has no body",
                       "send an image: curl -F image=@cat.jpg URL, or --data-binary @cat.jpg")
    name = request.headers.get("x-filename") or "body"
    return [Upload("body", name[:200], data)]


async def _predict(state: State, request: Request, topk: int | None, cam: tuple | None = None) -> Any:
    config, model, batcher = state.config, state.model, state.batcher
    t0 = time.perf_counter()
    if state.draining:
        state.metrics.shed.labels("draining").inc()
        raise ApiError(503, "draining: the server is shutting down", "retry on another replica",
                       headers={"Retry-After": "1"})
    if not state.ready:
        state.metrics.shed.labels("not_ready").inc()
        raise ApiError(503, "the model is still warming up" if not state.warm_up_error
                       else f"the model failed to warm up: {state.warm_up_error}", "retry in a moment; see /readyz",
                       headers={"Retry-After": "1"})
    ticket = request.scope.get("transfer.ticket")  # admitted by Guard
    if ticket is None:
        try:
            ticket = batcher.admit()
        except Overloaded as exc:
            state.metrics.shed.labels("full").inc()
            raise overloaded(exc) from None
    with ticket:
        try:
            ups = await _read_uploads(request, config)
        except ApiError as exc:
            if exc.status == CLIENT_GONE:
                state.metrics.dropped.labels("reading").inc()
            raise
        if len(ups) > config.max_images:
            raise ApiError(422, f"too many images ({len(ups)}); the limit is {config.max_images}",
                           f"send at most {config.max_images} images per request")
        t_read = time.perf_counter()
        # uvicorn does not cancel a handler whose client left: watch for http.disconnect ourselves
        hangup = asyncio.ensure_future(_hang_up(request.receive, ticket))
        try:
            loop = asyncio.get_running_loop()
            decode = functools.partial(_decode, size=model.size, max_pixels=config.max_pixels,
                                       recipe=model.recipe)
            if len(ups) == 1:  # one image: no gather
                decoded = [await loop.run_in_executor(state.decode_pool, decode, ups[0])]
            else:
                decoded = await asyncio.gather(*(loop.run_in_executor(state.decode_pool, decode, u) for u in ups))
            ok = [i for i, (x, _, _) in enumerate(decoded) if x is not None]
            try:
                futs = ticket.submit([decoded[i][0] for i in ok], since=t_read) if ok else []
            except Overloaded as exc:
                state.metrics.shed.labels("full").inc()
                raise overloaded(exc) from None
            results = await asyncio.gather(*futs, return_exceptions=True) if futs else []
        finally:
            hangup.cancel()
    if any(isinstance(r, ClientGone) for r in results):
        state.metrics.dropped.labels("queued").inc()
    by_index = dict(zip(ok, results))
    k = min(topk or config.topk, len(model.names))
    entries, maps = [], []
    for i, (u, (x, dt, err)) in enumerate(zip(ups, decoded)):
        e = {"index": i, "field": u.field, "name": u.name}
        if err is not None:
            status, hint = status_of(err)
            e.update(status=status, error=err.reason, hint=hint)
            state.metrics.images.labels(str(status)).inc()
        else:
            r = by_index[i]
            if isinstance(r, Overloaded):
                state.metrics.shed.labels("late").inc()
                e.update(status=503, error=r.message, hint=f"retry after {r.retry_after} s",
                         retry_after=r.retry_after)
                state.metrics.images.labels("503").inc()
            elif isinstance(r, ClientGone):
                e.update(status=CLIENT_GONE, error=str(r), hint="nothing was run for this image")
                state.metrics.images.labels(str(CLIENT_GONE)).inc()
            elif isinstance(r, BatchFailed):  # logged once per batch by the batcher
                e.update(status=500, error=r.message,
                         hint="the server log has the traceback; the server goes on serving: retry, "
                              "and report it if it repeats")
                state.metrics.images.labels("500").inc()
            elif isinstance(r, BaseException):
                log.error("prediction failed: %s: %s", type(r).__name__, r)
                e.update(status=500, error=f"the prediction failed ({type(r).__name__})", hint="see the server log")
                state.metrics.images.labels("500").inc()
            else:
                r: Result
                e.update(status=200, **model.row(r.probs, k),
                         timings_ms={"decode": round(dt * 1000, 3), "queue": round(r.queue_s * 1000, 3),
                                     "model": round(r.model_s * 1000, 3)}, batch_size=r.batch_size)
                state.metrics.images.labels("ok").inc()
                if cam is not None:
                    maps.append((e, r.probs, x))
        entries.append(e)
    if maps:  # ?cam=1: each answered image's map, computed and encoded off the event loop
        loop = asyncio.get_running_loop()
        t_map = time.perf_counter()
        done = await asyncio.gather(*(loop.run_in_executor(state.decode_pool, _map_entry, model, p, x, cam[0],
                                                           state.metrics) for _, p, x in maps))
        for (e, _, _), m in zip(maps, done):
            e["cam"] = m
            e["timings_ms"]["cam"] = round((time.perf_counter() - t_map) * 1000, 3)
    timings = {"read": round((t_read - t0) * 1000, 3), "total": round((time.perf_counter() - t0) * 1000, 3)}
    if ticket.gone:  # nobody reads this answer; the status is for the access log and the metrics
        return JSONResponse({"error": "the client disconnected before the answer was ready",
                             "hint": "images that had not reached the model were not run",
                             "bundle_id": model.id, "predictions": entries, "timings_ms": timings},
                            status_code=CLIENT_GONE)
    if len(entries) == 1 and entries[0]["status"] != 200:  # one image: its status is the answer's
        e = entries[0]
        headers = {"Retry-After": str(e["retry_after"])} if "retry_after" in e else None
        return JSONResponse({"error": e["error"], "hint": e["hint"], "bundle_id": model.id, "predictions": entries,
                             "timings_ms": timings}, status_code=e["status"], headers=headers)
    return JSONResponse({"bundle_id": model.id, "head": model.head.name, "backend": model.runner.name,
                         "predictions": entries, "timings_ms": timings})


async def _hang_up(receive, ticket) -> None:
    """Wait for the client to disconnect (the request's body is read: the next ASGI message is
    ``http.disconnect``), then drop the request's images that have not reached the model."""
    message = await receive()
    if message["type"] == "http.disconnect":
        ticket.abandon()


def _decode(u: Upload, size, max_pixels, recipe=None):
    """(pixels or None, seconds, ImageDecodeError or None) of one upload (runs in a decode thread)."""
    t = time.perf_counter()
    try:
        return (decode_upload(u.data, u.name, size, max_pixels=max_pixels, recipe=recipe), time.perf_counter() - t,
                None)
    except ImageDecodeError as exc:
        return None, time.perf_counter() - t, exc


_PREDICT_DOC = """\
Send one image as the raw body (`curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg'`), or one or
more images as file fields of a multipart form (`curl -F image=@cat.jpg -F image=@dog.png`; any field
names). Images are decoded and resized exactly like `transfer infer` does, and batched with the images
of concurrent requests.

Each entry of `predictions` has `status` 200 with `top` (classes with probabilities, most probable
first), `timings_ms` (decode, queue, model) and `batch_size`, or its own error status with
`error` and `hint`: one bad image fails only its own entry. A request with a single image answers
with that image's status.
"""

_PREDICT_BODY = {"parameters": [{"name": "topk", "in": "query", "required": False,
                                  "schema": {"type": "integer", "minimum": 1},
                                  "description": "classes per image [default: --topk]"},
                                 {"name": "cam", "in": "query", "required": False,
                                  "schema": {"type": "string", "enum": ["0", "1"], "default": "0"},
                                  "description": "1: add each image's class activation map (`cam`: `class`, `layer`, "
                                                 "`cells` = the map at the feature map's h x w cells in [0, 1], "
                                                 "`png` = base64 PNG jet overlay on the model-size image, `flag`); "
                                                 "422 when the bundle has no maps (the hint says why)"},
                                 {"name": "cam_class", "in": "query", "required": False, "schema": {"type": "string"},
                                  "description": "with cam=1: the class the maps explain (name or index) "
                                                 "[default: the network head's predicted class]"}],
                 "requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

_PREDICT_ERRORS = {
    400: "an empty body, or the (single) image is empty, truncated or corrupt",
    401: "missing or wrong API key (with --api-key-file)",
    413: "the body is over the size limit, or the (single) image has too many pixels",
    415: "the (single) image is not an image format the decoder knows, or a JSON body",
    422: "a malformed multipart form, a form without file fields, too many images, or cam=1 for a bundle "
         "without class activation maps",
    503: "queue full, request waited too long, warming up or draining (see Retry-After)",
    500: "the (single) image's batch failed (stacking, the model call, its answers); the server goes on serving",
}

__all__ = ["create_app", "ApiError", "State", "Guard"]
