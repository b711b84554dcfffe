"""What a server runs with: one frozen dataclass, validated once, shared by uvicorn and Ray Serve."""

from __future__ import annotations

import dataclasses
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: a photo of 50 megapixels decodes to 150 MB of RGB; bigger uploads are refused as decompression bombs
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class ServeConfig:
    """Every option of ``transfer serve`` (CLI flags map one to one; ``option=`` of errors names the field).

    Model: ``backend``, ``providers``, ``threads`` (ONNX Runtime intra-op threads), ``head``,
    ``head_format``. Answers: ``topk`` (default classes per image; a request may ask for
    ``?topk=``). Batching: ``max_batch`` images per model call, ``max_wait_ms`` the longest
    a waiting image is held for more to arrive (only while other requests are being read or
    decoded), ``queue`` requests in the server at once and images waiting for the model (the
    next one gets 503 at once), ``max_queue_ms`` the longest a request may wait (once read) before
    its images reach the model (older ones get 503 instead of a late answer; 0: no limit),
    ``workers`` decode threads. Limits: ``max_body_mb`` per
    request, ``max_images`` per request, ``max_pixels`` per image (before resizing).
    Lifecycle: ``drain_s`` seconds in-flight requests may take after SIGTERM / SIGINT,
    ``access_log`` a path (or ``-`` for stderr) for one JSON line per request. Security:
    ``host`` (loopback by default), ``api_key_file``. Ray Serve: ``replicas``,
    ``cpus_per_replica``, ``gpus_per_replica``, ``address``. Trust: ``trust`` public keys
    (``None``: ``TRANSFER_TRUST``), ``trust_pickle``. Unknown inputs: ``reject`` marks images the
    bundle's unknown-input score rejects (``unknown_score``: which score; default the bundle's).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str | None = None
    providers: str | None = None
    threads: int | None = None
    head: str = "network"
    head_format: str = "onnx"
    topk: int = 5
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue: int = 256
    max_queue_ms: float = 1000.0
    workers: int = 2
    max_body_mb: float = 16.0
    max_images: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    drain_s: float = 10.0
    access_log: str | None = None
    api_key_file: str | None = None
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    address: str | None = None
    trust: tuple[str, ...] | None = None  # (): the signature was checked by the Ray driver
    trust_pickle: bool = False
    reject: bool = False
    unknown_score: str | None = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def replace(self, **changes) -> "ServeConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "ServeConfig":
        """Check every value once; returns ``self``.

        Raises:
            ConfigError: naming the field (``option``) and the accepted values.
        """
        positive_ints = ("topk", "max_batch", "queue", "workers", "max_images", "max_pixels", "replicas")
        for name in positive_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer (got {v!r})", option=name)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535 (got {self.port!r}; 0: any free port)", option="port")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be positive (got {self.threads})", option="threads")
        for name in ("max_wait_ms", "max_queue_ms", "drain_s", "cpus_per_replica", "gpus_per_replica"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be a number >= 0 (got {v!r})", option=name)
        if not self.max_body_mb > 0:
            raise ConfigError(f"body limit must be a positive number of MB (got {self.max_body_mb!r})",
                              option="max_body_mb")
        if self.head_format not in ("onnx", "pickle"):
            raise ConfigError(f"invalid head format {self.head_format!r}; accepted: onnx, pickle",
                              option="head_format")
        if not self.host:
            raise ConfigError("host must not be empty", option="host")
        return self


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
