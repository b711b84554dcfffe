"""The options of ``transfer serve``, declared once (:mod:`transfer.options`), shared by uvicorn
and Ray Serve; and the API key file's reader.

The model and trust groups are prediction's own
(:class:`~transfer.runtime.predict_config.ModelOptions`,
:class:`~transfer.runtime.predict_config.TrustOptions`): ``transfer infer`` and ``transfer
serve`` take the same flags with the same checks.

Example::

    cfg = make(ServeConfig, {"head": "rf", "max_batch": 16})
    cfg.model.head, cfg.max_batch        # ('rf', 16)
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..options import Flag, Interval, Text, group, option, validate
from ..runtime.predict_config import ModelOptions, TrustOptions, refuse

#: a photo of 50 megapixels decodes to 150 MB of RGB; bigger uploads are refused as decompression bombs
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class ServeConfig:
    """Every option of ``transfer serve`` (flags map one to one; ``option=`` of errors names the field).

    Answers: ``topk`` (default classes per image; a request may ask for ``?topk=``).
    Batching: ``max_batch`` images per model call, ``max_wait_ms`` the longest a waiting
    image is held for more to arrive (only while other requests are being read or decoded),
    ``queue`` requests in the server at once and images waiting for the model (the next one
    gets 503 at once), ``max_queue_ms`` the longest a request may wait (once read) before its
    images reach the model (older ones get 503 instead of a late answer; 0: no limit),
    ``workers`` decode threads. Limits: ``max_body_mb`` per request, ``max_images`` per
    request, ``max_pixels`` per image (before resizing). Lifecycle: ``drain_s`` seconds
    in-flight requests may take after SIGTERM / SIGINT, ``access_log`` a path (or ``-`` for
    stderr) for one JSON line per request. Security: ``host`` (loopback by default),
    ``api_key_file``. Ray Serve (``ray``): ``replicas``, ``cpus_per_replica``,
    ``gpus_per_replica``, ``address``. The model (``model``) and which bundles are trusted
    (``security``) are the groups ``transfer infer`` takes too.
    """

    host: str = option("127.0.0.1", Text("a host name or address"), "Address to listen on (0.0.0.0: every "
                       "interface; use --api-key-file then).")
    port: int = option(8000, Interval(int, 0, 65535), "TCP port (0: any free one, printed at start).")
    topk: int = option(5, Interval(int, 1), "Classes per image (a request may ask ?topk=N).")
    max_batch: int = option(32, Interval(int, 1), "Most images per model call.")
    max_wait_ms: float = option(5.0, Interval(float, 0), "Longest an image waits for its batch to fill (only "
                                "while more requests are arriving).")
    queue: int = option(256, Interval(int, 1), "Most requests in the server, and images waiting for the model; "
                        "beyond: 503 at once.")
    max_queue_ms: float = option(1000.0, Interval(float, 0), "A request that waited longer for the model gets 503 "
                                 "instead of a late answer (0: no limit).")
    workers: int = option(2, Interval(int, 1), "Decode threads.")
    max_body_mb: float = option(16.0, Interval(float, 0, closed="neither"), "Largest request body (413 beyond).")
    max_images: int = option(64, Interval(int, 1), "Most images per request (422 beyond).")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, Interval(int, 1), "Most pixels per image before resizing (413 "
                             "beyond: decompression bombs).")
    api_key_file: str | None = option(None, Text("a file holding the key"), "File holding a key; every /v1 "
                                      "request then needs 'Authorization: Bearer KEY'.", none=True, metavar="PATH")
    drain_s: float = option(10.0, Interval(float, 0), "Seconds requests in flight may take to finish after "
                            "SIGTERM / Ctrl-C.")
    access_log: str | None = option(None, Text("a file, or - for standard error"), "Write one JSON line per "
                                    "request to FILE ('-': stderr).", none=True, metavar="FILE|-")
    ray: bool = option(False, Flag(), "Deploy on Ray Serve: the same API from --replicas replicas.")
    address: str | None = option(None, Text("a Ray cluster's HOST:PORT"), "Ray cluster to join with --ray. "
                                 "[default: a local Ray]", none=True, metavar="HOST:PORT")
    replicas: int = option(1, Interval(int, 1), "Ray Serve replicas (with --ray).")
    cpus_per_replica: float = option(1.0, Interval(float, 0), "CPUs each replica reserves (with --ray).")
    gpus_per_replica: float = option(0.0, Interval(float, 0), "GPUs each replica reserves (with --ray).")
    model: ModelOptions = group(ModelOptions)
    security: TrustOptions = group(TrustOptions)

    def __post_init__(self) -> None:
        validate(self)
        if not self.ray:
            for name, unset in (("address", None), ("replicas", 1), ("cpus_per_replica", 1.0),
                                ("gpus_per_replica", 0.0)):
                if getattr(self, name) != unset:
                    raise refuse(name, getattr(self, name), f"{unset} without ray",
                                 hint="add --ray to deploy on Ray Serve")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def read_api_key(path: str | os.PathLike) -> bytes:
    """The key in ``path`` (surrounding whitespace and the final newline stripped), as bytes.

    Raises:
        ConfigError: unreadable, empty, or shorter than 16 characters (a guessable key).
    """
    p = Path(path)
    try:
        key = p.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {p}: {exc.strerror or exc}", option="api_key_file") from None
    if not key:
        raise ConfigError(f"the API key file {p} is empty", option="api_key_file",
                          hint="write a random key into it, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    lines = key.count(b"\n") + 1
    if len(key) < 16 or lines > 1:
        raise ConfigError(f"the API key in {p} must be one line of at least 16 characters "
                          f"(it has {len(key)} bytes on {lines} line(s))",
                          option="api_key_file",
                          hint="python -c 'import secrets; print(secrets.token_urlsafe(32))' > KEYFILE")
    return key


def key_matches(given: str | None, key: bytes | None) -> bool:
    """True when no key is configured, or ``given`` equals it (constant-time comparison)."""
    if key is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key)


__all__ = ["ServeConfig", "DEFAULT_MAX_PIXELS", "read_api_key", "key_matches"]
