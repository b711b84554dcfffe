"""Running the app: uvicorn on one machine, with warm-up, draining and a clean exit.

SIGTERM or SIGINT (Ctrl-C) stops the listener at once, turns ``/readyz`` to 503, lets
requests in flight finish for up to ``drain_s`` seconds, then returns (the command exits 0).
A second Ctrl-C quits without waiting.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from dataclasses import dataclass

from ..errors import ConfigError
from ..progress import ProgressLike, as_progress
from ._deps import check_installed, need
from .model import ServedModel, load_served_model
from .serve_config import ServeConfig, read_api_key


@dataclass
class ServeSummary:
    url: str
    bundle_id: str
    seconds: float = 0.0
    drained_in_s: float | None = None


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (``port`` 0: one the OS picks).

    Raises:
        ConfigError: the address cannot be used (in use, not local, no permission).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc.strerror or exc}", option="host") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", option="port",
                          hint="choose another port (0: any free one)" if exc.errno == 98 else None) from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(app, config: ServeConfig, on_signal):
    """A uvicorn server whose SIGTERM / SIGINT start draining and end in a normal return
    (uvicorn's own handler re-raises the signal after shutting down: exit status 143 / 130)."""
    uvicorn = need("uvicorn")

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            on_signal()
            super().handle_exit(sig, frame)

    cfg = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                         timeout_graceful_shutdown=max(config.drain_s, 0.1), timeout_keep_alive=15,
                         server_header=False, proxy_headers=False)
    return DrainingServer(cfg)


def serve(bundle_path, config: ServeConfig, *, progress: ProgressLike = None,
          model: ServedModel | None = None) -> ServeSummary:
    """Serve a bundle over HTTP until SIGTERM / SIGINT; returns after draining.

    The bundle is loaded (hash-checked) and the options checked before anything listens, so
    a bundle ``transfer verify`` refuses or a bad option never starts a server.

    Raises:
        BundleError / TamperedBundleError: the bundle is refused.
        ConfigError: a bad option, an unreadable API key file, an address that cannot be used.
        DependencyMissingError: the ``serve`` extra is not installed.

    Example::

        serve("runs/digits/bundle", make(ServeConfig, {"port": 8000, "head": "rf"}))
    """
    from .app import create_app

    p = as_progress(progress)
    check_installed()
    key = read_api_key(config.api_key_file) if config.api_key_file else None
    if model is None:
        model = load_served_model(bundle_path, config.model, config.security)
    app = create_app(model, config, key=key)
    state = app.state.transfer
    sock = listen_socket(config.host, config.port)
    summary = ServeSummary(url=url_of(sock), bundle_id=model.id)
    signalled = {}

    def on_signal():
        if "t" not in signalled:
            signalled["t"] = time.perf_counter()
            state.drain()
            p.say(f"stopping: draining requests in flight (at most {config.drain_s:g} s)")

    server = make_server(app, config, on_signal)
    info = model.info()["serving"]
    p.say(f"serving {model.bundle.path} ({model.id[:19]}...) on {summary.url}  "
          f"[{info['backend']} on {info['provider']}, head {info['head']}, batches of up to {config.max_batch}, "
          f"{'API key required' if key else 'no API key'}]")
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        p.say(f"warning: listening on {config.host}, reachable from other machines"
              + ("" if key else "; anyone who can reach it can use it (--api-key-file)"))
    t0 = time.perf_counter()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    summary.seconds = time.perf_counter() - t0
    if "t" in signalled:
        summary.drained_in_s = time.perf_counter() - signalled["t"]
        p.say(f"stopped after draining for {summary.drained_in_s:.2f} s")
    return summary


__all__ = ["serve", "ServeSummary", "listen_socket", "make_server", "url_of"]
