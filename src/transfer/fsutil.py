"""Small filesystem helpers: atomic writes and hashing (no heavy imports)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _default_file_mode() -> int:
    mask = os.umask(0)  # the only portable way to read the umask; set straight back
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    A crash leaves either the old file or the new one, never a half-written file.
    ``suffix`` keeps an extension some writers insist on (``.keras``, ``.npy``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp makes 0600 files; give the result the mode a plain open() would
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[Any]:
    """An open binary file at a hidden temporary name next to ``path``, renamed over it when the
    block ends without error (removed otherwise): like :func:`atomic_path` for a writer that takes
    a file object, with one ``open`` instead of three (``mkstemp``, then the writer's, plus a
    ``chmod``): 0.41 against 0.57 ms for the two files of each ``infer --cam`` image
    (docs/benchmarks.md, section 12). The file gets the mode a plain ``open`` would.

    Example::

        with atomic_open("maps/00001_cat.npy") as f:
            np.save(f, m)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class JSONLimitError(ValueError):
    """A JSON file is larger or nested deeper than its reader allows."""


_JSON_TOKENS = re.compile(r'["\\\[\]{}]')


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON ``text`` (strings skipped; a linear scan)."""
    depth = deepest = 0
    in_string = False
    skip_to = -1
    for m in _JSON_TOKENS.finditer(text):
        if m.start() < skip_to:
            continue  # the character after a backslash
        c = m.group()
        if in_string:
            if c == "\\":
                skip_to = m.start() + 2
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def loads_json(text: str, *, max_depth: int | None = None, what: str = "JSON") -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth`` before parsing (so a
    hostile file cannot reach Python's recursion limit).

    Raises:
        JSONLimitError: nested too deeply.
        ValueError: not valid JSON.
    """
    if max_depth is not None:
        d = json_depth(text)
        if d > max_depth:
            raise JSONLimitError(f"{what} is nested {d} levels deep (at most {max_depth} allowed)")
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - only without max_depth
        raise JSONLimitError(f"{what} is nested too deeply to read") from None


def read_json(path: str | os.PathLike, *, max_depth: int | None = None, max_bytes: int | None = None) -> Any:
    """Read a JSON file; ``max_depth`` / ``max_bytes`` bound what a file from elsewhere may cost.

    Raises:
        OSError: unreadable. JSONLimitError: too large or too deep. ValueError: not JSON.
    """
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
    if max_bytes is not None and len(data) > max_bytes:
        raise JSONLimitError(f"{path} is larger than {max_bytes:,} bytes")
    return loads_json(data.decode("utf-8"), max_depth=max_depth, what=str(path))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def json_sha256(obj) -> str:
    """SHA-256 of ``obj`` as JSON with sorted keys: the content key of a cache entry."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def user_cache_dir() -> Path:
    """The user's cache of ``transfer`` (converted models, TensorRT engines): ``$TRANSFER_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/transfer``, else ``~/.cache/transfer``. Not created here."""
    root = os.environ.get("TRANSFER_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transfer"


def file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(mtime_ns, size)`` of a file (None when it cannot be stat'ed): a cheap "has it changed" key."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
