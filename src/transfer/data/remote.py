"""Image inputs given as URIs (``s3://bucket/prefix/``, ``gs://...``, ``file:///...``).

Listing and reading go through ``pyarrow.fs`` (installed with ``transfer[distributed]``,
as Ray Data uses it): S3 credentials come from the usual places (``AWS_*`` variables,
``~/.aws``, instance roles), GCS from Google's default credentials. The bytes are decoded
by :func:`transfer.data.image.decode_image_bytes`, the same Pillow path as local files,
so a prediction does not depend on where the file lives.

Example::

    list(iter_uri_inputs("s3://my-bucket/images/", recursive=True))
    # [('s3://my-bucket/images/a.jpg', None), ...]
"""

from __future__ import annotations

import re
import threading
from typing import Iterator

from .._lazy import require
from .image import is_image_path
from ..errors import ConfigError

#: A file larger than this is refused without reading it all (an image this big is a mistake).
MAX_OBJECT_BYTES = 512 * 1024 * 1024

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_local = threading.local()


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` inputs (``s3://``, ``gs://``, ``file://``, ...).

    Example::

        is_uri("s3://b/x.jpg"), is_uri("images/x.jpg")
        # (True, False)
    """
    return bool(_URI.match(str(path)))


_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "file")


def _split(uri: str) -> tuple[str, str, str]:
    """``(scheme, authority, path)`` of ``uri``, taken literally: like ``aws s3`` and
    ``gsutil``, object keys are not percent-decoded, so ``s3://b/my photo.jpg`` is the key
    ``my photo.jpg`` (a space is fine; ``%20`` means the three characters)."""
    scheme, rest = str(uri).split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return scheme, "", rest if rest.startswith("/") else "/" + rest.split("/", 1)[-1]
    auth, _, path = rest.partition("/")
    return scheme, auth, path


def _filesystem(uri: str):
    """``(filesystem, path)`` for ``uri`` (pyarrow's path: ``bucket/key`` for S3 / GCS).

    The filesystem comes from the scheme and bucket alone, so keys with spaces, quotes or
    non-ASCII letters are read as written; filesystems are reused per thread and bucket.
    """
    fs_mod = require("pyarrow.fs", purpose="reading s3:// / gs:// inputs")
    scheme, auth, path = _split(uri)
    if scheme not in _SCHEMES:
        raise ConfigError(f"cannot open {uri}: unsupported scheme {scheme}://",
                          hint="supported: s3://, gs://, hdfs://, file://")
    key = (scheme, auth)
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    fs = cache.get(key)
    if fs is None:
        try:
            fs = fs_mod.LocalFileSystem() if scheme == "file" else fs_mod.FileSystem.from_uri(f"{scheme}://{auth}")[0]
        except Exception as exc:  # missing S3/GCS support, bad bucket name, no region
            raise ConfigError(f"cannot open {uri}: {type(exc).__name__}: {exc}",
                              hint="supported: s3://, gs://, hdfs://, file://; for S3 set AWS credentials "
                                   "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and AWS_DEFAULT_REGION") from None
        cache[key] = fs
    if scheme in ("s3", "gs", "gcs"):
        return fs, f"{auth}/{path}" if path else auth
    return fs, path if scheme == "file" else "/" + path


def _uri_of(uri: str, root_path: str, child_path: str) -> str:
    """The URI of ``child_path``, a filesystem path found under ``root_path`` (the path of ``uri``)."""
    base = str(uri).rstrip("/")
    root = root_path.rstrip("/")
    if child_path.startswith(root + "/"):
        return base + child_path[len(root):]
    scheme, auth, _ = _split(uri)
    if scheme in ("s3", "gs", "gcs"):
        return f"{scheme}://{child_path}"
    return f"{scheme}://{auth}{child_path}"


def iter_uri_inputs(uri: str, *, recursive: bool = False) -> Iterator[tuple[str, str | None]]:
    """Expand one URI like :func:`transfer.data.stream.iter_inputs` expands a path:
    a file is one entry; a "folder" (prefix) lists its image files sorted by path (all
    levels with ``recursive``); a missing object is an error entry.

    Raises:
        ConfigError: the URI's filesystem cannot be opened or listed (scheme, credentials,
            network): nothing can be read, so the run stops before it starts.
    """
    fs_mod = require("pyarrow.fs", purpose="reading s3:// / gs:// inputs")
    fs, path = _filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == fs_mod.FileType.NotFound:
            yield str(uri), "no such file"
            return
        if info.type == fs_mod.FileType.File:
            yield str(uri), None
            return
        if is_image_path(path.rstrip("/")) and not recursive:
            yield str(uri), "is a directory, not an image file"
            return
        sel = fs_mod.FileSelector(path.rstrip("/"), recursive=recursive)
        infos = fs.get_file_info(sel)
    except Exception as exc:
        raise ConfigError(f"cannot list {uri}: {type(exc).__name__}: {exc}",
                          hint="check the address, your credentials and that the bucket is reachable") from None
    files = sorted(i.path for i in infos if i.type == fs_mod.FileType.File and is_image_path(i.path))
    for p in files:
        yield _uri_of(uri, path, p), None


def read_uri(uri: str, *, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
    """The bytes of one object (at most ``max_bytes``).

    Raises:
        OSError: the object cannot be read, or is larger than ``max_bytes``.
    """
    fs, path = _filesystem(uri)
    with fs.open_input_stream(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"larger than {max_bytes:,} bytes; not an image this tool will read")
    return bytes(data)
