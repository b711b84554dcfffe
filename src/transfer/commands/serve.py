"""``transfer serve``: a bundle behind an HTTP API with dynamic batching (uvicorn, or Ray Serve)."""

from __future__ import annotations

import click

from ..options import click_options, from_cli
from ..serve.serve_config import ServeConfig
from ._options import quiet_option


@click.command("serve")
@click.argument("bundle", type=click.Path())
@click_options(ServeConfig)
@quiet_option
def serve_cmd(bundle, quiet, **options) -> None:
    """Serve a bundle over HTTP: POST images, get the top-k classes. Images of concurrent
    requests are batched into one model call; the answers equal `transfer infer`'s.

    \b
    transfer serve runs/digits/bundle --head rf
    curl -F image=@cat.jpg http://127.0.0.1:8000/v1/predict
    transfer serve runs/digits/bundle --host 0.0.0.0 --api-key-file key.txt
    transfer serve runs/digits/bundle --ray --replicas 4           # Ray Serve, same API

    Routes: POST /v1/predict, GET /v1/model, /healthz, /readyz, /metrics (Prometheus),
    /openapi.json, and a page at / to try it in a browser. Refuses a bundle that
    `transfer verify` refuses (with --trust or TRANSFER_TRUST: one not signed by a trusted
    key). Stops on SIGTERM / Ctrl-C after finishing requests in flight.
    """
    from ..progress import Progress

    cfg = from_cli(ServeConfig, options)
    progress = Progress(quiet=quiet)
    if cfg.ray:
        from ..serve.ray_serve import serve_ray

        serve_ray(bundle, cfg, progress=progress)
        return
    from ..serve.server import serve

    serve(bundle, cfg, progress=progress)


COMMANDS = [serve_cmd]
