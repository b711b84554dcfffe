"""Files -> pixel batches, decoded in worker threads ahead of the model (bounded memory).

The one "decode these paths into batches, skipping bad files" iterator of the package:
inference, benchmarks, feature extraction, evaluation, verification and calibration all
read images through :func:`batches` (or :func:`decode_batches` for plain path lists). It
decodes with :func:`transfer.data.image.load_image`, the same pixel function as training,
so served pixels equal training's. A bad file becomes an error item, never an exception
that stops the run.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import ImageDecodeError, TransferError
from ..options import check_int
from .image import DEFAULT_MAX_PIXELS, is_image_path, load_image, load_image_bytes, recipe_version
from .remote import is_uri, iter_uri_inputs, read_uri


@dataclass
class Item:
    """One input: its path and either pixels or the error that prevented decoding."""

    path: str
    pixels: np.ndarray | None = None
    error: str | None = None


@dataclass
class PixelBatch:
    items: list[Item]
    x: np.ndarray  # float32 (n_ok, H, W, 3) of the items without error, in order
    decode_seconds: float = 0.0
    ok_index: list[int] = field(default_factory=list)


def iter_inputs(inputs: Sequence[str | os.PathLike], *, recursive: bool = False) -> Iterator[tuple[str, str | None]]:
    """Expand files and folders into ``(path, error-or-None)`` in a stable order.

    Folders list their image files (sorted; sub-folders with ``recursive``); symlink loops
    are visited once; URIs (``s3://bucket/prefix/``, ``gs://``, ``file://``) are listed
    through ``pyarrow.fs`` (:mod:`transfer.data.remote`); a path that does not exist, or a directory named like an image,
    yields an error entry instead of stopping the run.

    Example::

        list(iter_inputs(["a.png"]))
        # [('a.png', None)]
    """
    seen_dirs: set[tuple[int, int]] = set()

    def walk(d: str) -> Iterator[tuple[str, str | None]]:
        try:
            st = os.stat(d)
        except OSError as exc:
            yield d, f"cannot read folder: {exc.strerror or exc}"
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            return  # symlink loop or second link to a visited folder
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            yield d, f"cannot list folder: {exc.strerror or exc}"
            return
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if recursive:
                    yield from walk(e.path)
                elif is_image_path(e.name):
                    yield e.path, "is a directory, not an image file"
            elif is_image_path(e.name):
                yield e.path, None

    for raw in inputs:
        raw = os.fspath(raw)  # paths are reported as the user spelled them
        if is_uri(raw):  # s3://, gs://, file:// ...: listed through pyarrow.fs

            yield from iter_uri_inputs(raw, recursive=recursive)
            continue
        p = Path(raw)
        if p.is_dir():
            if is_image_path(p) and not recursive:
                yield raw, "is a directory, not an image file"
                continue
            yield from walk(raw)
        elif p.exists() or p.is_symlink():
            yield raw, None
        else:
            yield raw, "no such file"


def decode_item(path: str, size: tuple[int, int] | None, *, recipe: dict | None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Item:
    """Decode and resize one path or URI with ``recipe`` (the run's or bundle's recorded pixel
    recipe, :attr:`transfer.runfolder.RunFolder.recipe` / ``Bundle.recipe``; ``None``: the
    current one, for images of no run); any failure becomes ``Item.error`` (never raises)."""
    try:
        if is_uri(path):
            return Item(path, load_image_bytes(read_uri(path), path, size, max_pixels=max_pixels, recipe=recipe))
        return Item(path, load_image(path, size, max_pixels=max_pixels, recipe=recipe))
    except ImageDecodeError as exc:
        return Item(path, error=exc.reason if hasattr(exc, "reason") else str(exc))
    except TransferError as exc:  # e.g. a URI whose filesystem cannot be opened
        return Item(path, error=exc.message)
    except OSError as exc:
        return Item(path, error=f"cannot read: {exc.strerror or exc}")
    except Exception as exc:  # never let one file stop the run
        return Item(path, error=f"{type(exc).__name__}: {exc}")


def batches(entries: Iterable[tuple[str, str | None]], size: tuple[int, int], *, batch: int = 32, workers: int = 2,
            prefetch: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS, recipe: dict | None) -> Iterator[PixelBatch]:
    """Decode ``entries`` in ``workers`` threads, ``prefetch`` batches ahead, in input order,
    with ``recipe`` (required: the run's or bundle's recorded pixel recipe, so a caller cannot
    decode a run's images with today's recipe by omission; ``None``: the current one).

    Memory is bounded by ``(prefetch + 1) * batch`` images however many files there are.

    Raises:
        ConfigError: non-positive batch / workers / prefetch.
        ValueError: a recipe this runtime does not implement.
    """
    import time

    for what, value in (("batch", batch), ("workers", workers), ("prefetch", prefetch)):
        check_int(value, what, option=what)
    recipe_version(recipe)  # an unknown recipe fails here, not as one error row per file
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    DONE = object()

    def produce():
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transfer-decode") as pool:
                chunk: list[tuple[str, str | None]] = []

                def flush(ch):
                    t0 = time.perf_counter()
                    futs = [None if err else pool.submit(decode_item, p, size, recipe=recipe, max_pixels=max_pixels) for p, err in ch]
                    items = [Item(p, error=err) if f is None else f.result() for (p, err), f in zip(ch, futs)]
                    ok = [i for i, it in enumerate(items) if it.pixels is not None]
                    x = (np.stack([items[i].pixels for i in ok]).astype(np.float32) if ok
                         else np.zeros((0, size[0], size[1], 3), np.float32))
                    for it in items:
                        it.pixels = None  # the batch array holds them now
                    return PixelBatch(items, x, time.perf_counter() - t0, ok)

                for e in entries:
                    if stop.is_set():
                        return
                    chunk.append(e)
                    if len(chunk) == batch:
                        _put(q, flush(chunk), stop)
                        chunk = []
                if chunk and not stop.is_set():
                    _put(q, flush(chunk), stop)
        except BaseException as exc:  # surface producer failures in the consumer
            _put(q, exc, stop)
        finally:
            _put(q, DONE, stop)

    th = threading.Thread(target=produce, name="transfer-batches", daemon=True)
    th.start()
    try:
        while True:
            got = q.get()
            if got is DONE:
                break
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while th.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            th.join(timeout=0.05)


def _put(q: queue.Queue, obj, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(obj, timeout=0.1)
            return
        except queue.Full:
            continue


def decode_batches(paths: Iterable[str | os.PathLike], size: tuple[int, int], *, batch: int = 64, workers: int = 2,
                   max_pixels: int = DEFAULT_MAX_PIXELS, recipe: dict | None) -> Iterator[PixelBatch]:
    """:func:`batches` over plain paths: ``PixelBatch.ok_index`` says which items of each batch
    decoded (their pixels are the rows of ``x``, in order); the others carry their error.

    Example::

        for pb in decode_batches(paths, (224, 224), batch=32, recipe=run.recipe):
            probs = model(pb.x)                      # one row per readable image
            labels_ok = [labels[start + i] for i in pb.ok_index]
    """
    return batches(((os.fspath(p), None) for p in paths), size, batch=batch, workers=workers, max_pixels=max_pixels,
                   recipe=recipe)
