"""The same app on Ray Serve: N replicas, each with its own model, batcher and metrics.

The driver verifies the bundle and the options, reads the bundle's files once and puts them
in Ray's object store; each replica writes them to a local temporary folder and loads them
with :func:`transfer.serve.model.load_served_model` (hashes checked again on that node), so a
cluster needs no shared filesystem. Every replica serves the FastAPI app of
:func:`transfer.serve.app.create_app` (same routes, same batching), warmed up before Ray
sends it traffic; Ray's HTTP proxy spreads requests over the replicas.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from .._ray import init_ray
from ..bundle import Bundle, load_bundle
from ..bundle_format import MANIFEST
from ..errors import ConfigError, DependencyMissingError
from ..options import replace
from ..progress import ProgressLike, as_progress
from ..runtime.predictor import check_options
from ._deps import check_installed
from .model import bundle_id, load_served_model
from .serve_config import ServeConfig, read_api_key

APP_NAME = "transfer"


def pack_bundle(b: Bundle) -> dict[str, bytes]:
    """Every file of a loaded (verified) bundle: its manifest and the files it lists, by relative path."""
    return {MANIFEST: (b.path / MANIFEST).read_bytes(),
            **{rel: b.paths[rel].read_bytes() for rel in sorted(b.paths)}}


class Replica:
    """One Ray Serve replica (wrapped by :func:`deployment`): unpack, load, serve the app."""

    def __init__(self, payload: list, config: ServeConfig, expected_id: str):
        import ray

        files, key = ray.get(payload[0])
        self._dir = Path(tempfile.mkdtemp(prefix="transfer-bundle-"))
        for rel, data in files.items():
            p = self._dir / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        self.model = load_served_model(self._dir, config.model, config.security)
        if self.model.id != expected_id:
            raise ConfigError(f"the bundle arrived changed on this node ({self.model.id} != {expected_id})")
        self.config = config
        self.key = key

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.model, self.config, key=self.key, wait_for_warm_up=True)

    def __del__(self):
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


def deployment(config: ServeConfig):
    """The Ray Serve deployment of :class:`Replica` with ``config``'s replicas and resources.

    Each replica takes up to ``queue`` requests at once (our own batcher queues them; Ray's
    default of 5 would cap a batch at 5); Ray's proxy answers 503 itself when every
    replica is full and ``queue`` more wait at the proxy.
    """
    from ray import serve

    cls = serve.ingress()(Replica)
    return serve.deployment(
        cls, name="transfer-serve", num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        max_ongoing_requests=config.queue, max_queued_requests=config.queue,
        graceful_shutdown_timeout_s=max(config.drain_s, 0.1), graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5)


def start_ray(bundle_path, config: ServeConfig, *, progress: ProgressLike = None, on_signal=None) -> str:
    """Deploy on Ray Serve and return the URL once every replica is ready (Ray keeps running).

    ``on_signal``: the SIGTERM / SIGINT handler to (re)install once Ray is up (``ray.init``
    installs its own, which aborts the process).

    Raises:
        BundleError / TamperedBundleError: the bundle is refused (before any replica starts).
        ConfigError: a bad option or API key file; DependencyMissingError: Ray Serve missing.
    """
    p = as_progress(progress)
    check_installed()
    key = read_api_key(config.api_key_file) if config.api_key_file else None
    b = load_bundle(bundle_path, trust=config.security.store)
    check_options(b, config.model, trust_pickle=config.security.trust_pickle)
    # the signature and trust are decided here; replicas get the files, not the keys
    config = replace(config, security=replace(config.security, trust=(),
                                              trust_pickle=config.security.trust_pickle or b.trusted))
    bid = bundle_id(b)
    files = pack_bundle(b)
    ray = init_ray(config.address, purpose="transfer serve --ray")
    if on_signal is not None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    quiet = os.environ.get("TRANSFER_DEBUG") != "1"
    try:
        from ray import serve
    except ImportError as exc:

        raise DependencyMissingError(f"Ray Serve is not installed: {exc}", hint='pip install "transfer[serve-ray]"') from None
    p.say(f"deploying {config.replicas} replica(s) of {b.path} ({bid[:19]}...) on Ray Serve ...")
    serve.start(http_options={"host": config.host, "port": config.port}, detached=False)
    if quiet:  # Serve's start-up and routing lines (INFO) are for --debug
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    ref = ray.put((files, key))
    app = deployment(config).bind([ref], config, bid)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}"
    p.say(f"serving on {url} with {config.replicas} replica(s) "
          f"({config.cpus_per_replica:g} CPU, {config.gpus_per_replica:g} GPU each)")
    return url


def stop_ray() -> None:
    """Delete the app (replicas drain their requests) and stop Ray Serve."""
    from ray import serve

    serve.shutdown()


def serve_ray(bundle_path, config: ServeConfig, *, progress: ProgressLike = None) -> None:
    """``transfer serve --ray``: deploy, serve until SIGTERM / SIGINT, then drain and stop."""
    p = as_progress(progress)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start_ray(bundle_path, config, progress=p, on_signal=on_signal)
        while not stop.wait(0.5):
            pass
        p.say(f"stopping: replicas finish requests in flight (at most {config.drain_s:g} s)")
        t = time.perf_counter()
        stop_ray()
        p.say(f"stopped after {time.perf_counter() - t:.2f} s")
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


__all__ = ["serve_ray", "start_ray", "stop_ray", "deployment", "pack_bundle", "Replica"]
