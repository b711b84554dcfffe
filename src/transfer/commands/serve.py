"""``transfer serve``: a bundle behind an HTTP API with dynamic batching (uvicorn, or Ray Serve)."""

from __future__ import annotations

import click

from ._options import quiet_option
from .keys import trust_options


@click.command("serve")
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; use --api-key-file then).")
@click.option("--port", default=8000, show_default=True, help="TCP port (0: any free one, printed at start).")
@click.option("--backend", help="onnxruntime (default), onnxruntime-int8, tensorrt[-fp16|-int8].")
@click.option("--providers", help="ONNX Runtime providers in order: cpu, cuda, tensorrt. [default: best available]")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads. [default: all cores but one (left to HTTP and decoding)]")
@click.option("--head", default="network", show_default=True, help="network, or a bundled classical head (e.g. rf).")
@click.option("--head-format", type=click.Choice(["onnx", "pickle"]), default="onnx", show_default=True,
              help="Run the classical head as ONNX or as its verified pickle.")
@click.option("--topk", default=5, show_default=True, help="Classes per image (a request may ask ?topk=N).")
@click.option("--max-batch", default=32, show_default=True, help="Most images per model call.")
@click.option("--max-wait-ms", default=5.0, show_default=True,
              help="Longest an image waits for its batch to fill (only while more requests are arriving).")
@click.option("--queue", default=256, show_default=True,
              help="Most requests in the server, and images waiting for the model; beyond: 503 at once.")
@click.option("--max-queue-ms", default=1000.0, show_default=True,
              help="A request that waited longer for the model gets 503 instead of a late answer (0: no limit).")
@click.option("--workers", default=2, show_default=True, help="Decode threads.")
@click.option("--max-body-mb", default=16.0, show_default=True, help="Largest request body (413 beyond).")
@click.option("--max-images", default=64, show_default=True, help="Most images per request (422 beyond).")
@click.option("--max-pixels", default=50_000_000, show_default=True,
              help="Most pixels per image before resizing (413 beyond: decompression bombs).")
@click.option("--api-key-file", type=click.Path(),
              help="File holding a key; every /v1 request then needs 'Authorization: Bearer KEY'.")
@click.option("--drain-s", default=10.0, show_default=True,
              help="Seconds requests in flight may take to finish after SIGTERM / Ctrl-C.")
@click.option("--access-log", metavar="FILE|-", help="Write one JSON line per request to FILE ('-': stderr).")
@click.option("--ray", "use_ray", is_flag=True, help="Deploy on Ray Serve: the same API from --replicas replicas.")
@click.option("--address", metavar="HOST:PORT", help="Ray cluster to join with --ray. [default: a local Ray]")
@click.option("--replicas", default=1, show_default=True, help="Ray Serve replicas (with --ray).")
@click.option("--cpus-per-replica", default=1.0, show_default=True, help="CPUs each replica reserves (with --ray).")
@click.option("--gpus-per-replica", default=0.0, show_default=True, help="GPUs each replica reserves (with --ray).")
@click.option("--reject", is_flag=True,
              help="Answer 'decision: unknown' for images the bundle's unknown-input score rejects (a calibrated "
                   "bundle; the rule and score go in every answer).")
@click.option("--unknown-score", metavar="NAME",
              help="Score --reject uses, one the bundle offers (msp, energy, mahalanobis, knn, vim). "
                   "[default: the bundle's]")
@trust_options
@quiet_option
def serve_cmd(bundle, host, port, backend, providers, threads, head, head_format, topk, max_batch, max_wait_ms, queue,
              max_queue_ms, workers, max_body_mb, max_images, max_pixels, api_key_file, drain_s, access_log, use_ray,
              address, replicas, cpus_per_replica, gpus_per_replica, reject, unknown_score, trust, trust_pickle,
              quiet) -> None:
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
    from ..errors import ConfigError
    from ..progress import Progress
    from ..serve.config import ServeConfig

    cfg = ServeConfig(host=host, port=port, backend=backend, providers=providers, threads=threads, head=head,
                      head_format=head_format, topk=topk, max_batch=max_batch, max_wait_ms=max_wait_ms, queue=queue,
                      max_queue_ms=max_queue_ms, workers=workers, max_body_mb=max_body_mb, max_images=max_images,
                      max_pixels=max_pixels, drain_s=drain_s, access_log=access_log, api_key_file=api_key_file,
                      replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica,
                      address=address, trust=tuple(trust) or None, trust_pickle=trust_pickle, reject=reject,
                      unknown_score=unknown_score).validate()
    if unknown_score and not reject:
        raise ConfigError("--unknown-score needs --reject")
    progress = Progress(quiet=quiet)
    if use_ray:
        from ..serve.ray_serve import serve_ray

        serve_ray(bundle, cfg, progress=progress)
        return
    for flag, given in (("--address", address), ("--replicas", replicas != 1),
                        ("--cpus-per-replica", cpus_per_replica != 1.0), ("--gpus-per-replica", gpus_per_replica)):
        if given:
            raise ConfigError(f"{flag} needs --ray")
    from ..serve.server import serve

    serve(bundle, cfg, progress=progress)


COMMANDS = [serve_cmd]
