"""`transfer infer`: files and folders -> one prediction row per file, streamed to disk."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..bundle import load_bundle
from ..errors import ConfigError, OutputError, TransferError


@dataclass
class InferSummary:
    total: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    backend: str = ""
    provider: str = ""
    head: str = "network"
    out: str | None = None
    error_examples: list[str] = field(default_factory=list)
    providers_found: list[str] = field(default_factory=list)  # ONNX Runtime's available providers

    @property
    def images_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


#: --out suffixes that mean a format; anything else is written as --format (default csv)
_FORMAT_OF_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def resolve_format(fmt: str | None, out: str | os.PathLike | None) -> str:
    """``--format``, or the one ``--out``'s suffix names (``.jsonl`` -> jsonl), else csv.

    Raises:
        ConfigError: unknown format, or ``--format`` contradicts the suffix of ``--out``.

    Example:
        >>> resolve_format(None, "preds.jsonl"), resolve_format(None, None)
        ('jsonl', 'csv')
    """
    if fmt is not None and fmt not in ("csv", "jsonl"):
        raise ConfigError(f"invalid --format {fmt!r}; accepted: csv, jsonl")
    raw = os.fspath(out) if out is not None else ""
    implied = None if raw.endswith(("/", os.sep)) else _FORMAT_OF_SUFFIX.get(Path(raw).suffix.lower())
    if fmt and implied and fmt != implied:
        raise ConfigError(f"--format {fmt} but --out {raw} names a .{Path(raw).suffix[1:]} file",
                          hint=f"drop --format (the suffix decides), or write to a .{fmt} file")
    return fmt or implied or "csv"


def output_path(out: str | os.PathLike | None, fmt: str) -> Path | None:
    """Where rows go: ``out`` itself, or ``out/predictions.<csv|jsonl>`` when ``out`` is a
    folder (an existing directory, or a path ending in ``/``); ``None`` or ``-``: stdout.

    Raises:
        ConfigError: ``out`` looks like an image or a Parquet file (it would be overwritten
            with CSV / JSON lines).

    Example:
        >>> str(output_path("preds/", "csv"))
        'preds/predictions.csv'
    """
    if out is None or os.fspath(out) == "-":
        return None
    raw = os.fspath(out)
    p = Path(raw)
    if raw.endswith(("/", os.sep)) or p.is_dir():
        return p / f"predictions.{'csv' if fmt == 'csv' else 'jsonl'}"
    from ..data.image import is_image_path

    if is_image_path(p) or p.suffix.lower() == ".parquet":
        raise ConfigError(f"--out {raw} looks like {'an image' if is_image_path(p) else 'a Parquet file'}; "
                          "predictions are written as CSV or JSON lines",
                          hint="give a .csv / .jsonl file or a FOLDER/ (with --ray the .parquet copy is written "
                               "next to it)")
    return p


def _printable(path: str) -> str:
    """A path for a text stream: undecodable bytes of a file name as ``\\xff`` escapes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Writer:
    """Rows -> CSV / JSON lines, into ``PATH`` via ``.PATH.partial`` (or stdout).

    File names that are not valid UTF-8 are written as their original bytes to files
    (``surrogateescape``: the name round-trips) and as ``\\x`` escapes to stdout.
    """

    def __init__(self, out: str | os.PathLike | None, fmt: str, topk: int):
        self.fmt, self.topk = fmt, topk
        if out is None:
            self.fh, self.tmp, self.path = sys.stdout, None, None
        else:
            self.path = Path(out)
            self.tmp = self.path.with_name(f".{self.path.name}.partial")
            if self.path.is_dir():
                raise OutputError(f"--out {self.path} is a folder that already exists under the output's name",
                                  hint="remove it or choose another --out")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(self.tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
            except OSError as exc:
                raise OutputError(f"cannot write --out {self.path}: {exc.strerror or exc}"
                                  + (f" ({exc.filename})" if exc.filename else ""),
                                  hint="choose a folder you can write to") from None
        if fmt == "csv":
            self.csv = csv.writer(self.fh)
            head = ["path", "status"]
            for k in range(1, topk + 1):
                head += [f"class{k}", f"prob{k}"]
            self.csv.writerow(head + ["error"])

    def row(self, path: str, classes: list[str] | None, probs: list[float] | None, error: str | None):
        if self.tmp is None:
            path = _printable(path)
        if self.fmt == "csv":
            r = [path, "error" if error else "ok"]
            for k in range(self.topk):
                r += ([classes[k], f"{probs[k]:.6f}"] if classes and k < len(classes) else ["", ""])
            self.csv.writerow(r + [error or ""])
        else:
            d = {"path": path, "status": "error" if error else "ok"}
            if error:
                d["error"] = error
            else:
                d["top"] = [{"class": c, "prob": round(float(p), 6)} for c, p in zip(classes, probs)]
            self.fh.write(json.dumps(d) + "\n")

    def close(self, ok: bool = True):
        if self.tmp is None:
            self.fh.flush()
            return
        self.fh.close()
        final = self.path if ok else self.path.with_name(self.path.name + ".incomplete")
        try:  # incomplete: keep what was predicted so far, under a name that says so
            os.replace(self.tmp, final)
        except OSError as exc:
            raise OutputError(f"cannot move the finished rows to {final}: {exc.strerror or exc}",
                              hint=f"the rows are in {self.tmp}") from None


def top_k(p: np.ndarray, names: Sequence[str], k: int) -> tuple[list[str], list[float]]:
    """The ``k`` most probable class names of one row and their probabilities, best first.

    Example:
        >>> top_k(np.array([0.1, 0.7, 0.2]), ["a", "b", "c"], 2)
        (['b', 'c'], [0.7, 0.2])
    """
    order = np.argsort(-p)[:k]
    return [names[i] for i in order], [float(p[i]) for i in order]


def infer(bundle_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, out=None, fmt: str | None = None,
          batch: int = 32, topk: int = 1, head: str | None = None, head_format: str = "onnx",
          backend: str | None = None, providers=None, recursive: bool = False, workers: int = 2,
          threads: int | None = None, progress: Callable[[InferSummary], None] | None = None) -> InferSummary:
    """Predict every image of ``inputs`` with a bundle; bad files become error rows.

    Args:
        bundle_path: a bundle folder (hashes checked on load).
        inputs: files and folders (folders: their image files; ``recursive`` for sub-folders).
        out: output file (CSV or JSON lines), a ``FOLDER/``, or ``None`` / ``-`` for stdout.
            Written to a partial name and renamed when done.
        fmt: ``csv`` or ``jsonl`` (default: from the suffix of ``out``, else csv).
        batch / workers: model batch size and decode threads.
        topk: classes per row. head: ``network`` or a bundled head (``rf``...).
        backend / providers: see :func:`transfer.runtime.runners.make_runner`.
        progress: called after every batch with the running summary.

    Returns:
        :class:`InferSummary` (counts, throughput, what ran).

    Raises:
        ConfigError / BundleError: bad options or bundle (before any image is read).

    Example:
        >>> infer("runs/digits/bundle", ["images/"], out="preds.csv", recursive=True)  # doctest: +SKIP
    """
    from .heads import make_head
    from ..data.stream import batches, iter_inputs
    from .runners import make_runner

    fmt = resolve_format(fmt, out)
    if batch < 1 or topk < 1 or workers < 1 or (threads is not None and threads < 1):
        raise ConfigError("--batch, --topk, --workers and --threads must be positive")
    if not inputs:
        raise ConfigError("no input files or folders given")
    out = output_path(out, fmt)
    b = load_bundle(bundle_path)
    names = b.class_names
    topk = min(topk, len(names))
    runner = make_runner(b, backend, providers, threads)
    hd = make_head(b, head, head_format)
    from .sessions import available_providers

    s = InferSummary(backend=runner.name, provider=runner.provider, head=hd.name, out=str(out) if out else None,
                     providers_found=available_providers())
    w = _Writer(out, fmt, topk)
    t0 = time.perf_counter()
    done = False
    try:
        for pb in batches(iter_inputs(inputs, recursive=recursive), b.input_size, batch=batch, workers=workers):
            probs = None
            if len(pb.x):
                feats, net = runner.run(pb.x)
                probs = hd(feats, net)
            j = 0
            for i, it in enumerate(pb.items):
                s.total += 1
                if it.error is not None:
                    s.errors += 1
                    if len(s.error_examples) < 5:
                        s.error_examples.append(f"{it.path}: {it.error}")
                    w.row(it.path, None, None, it.error)
                    continue
                w.row(it.path, *top_k(probs[j], names, topk), None)
                j += 1
                s.ok += 1
            s.seconds = time.perf_counter() - t0
            if progress:
                progress(s)
        done = True
    finally:
        s.seconds = time.perf_counter() - t0
        w.close(ok=done)
    return s


def exit_code(summary: InferSummary, strict: bool) -> int:
    """0 normally; 1 when nothing succeeded (or no input was found), or with ``strict`` when any file failed."""
    if summary.ok == 0:
        return 1
    if strict and summary.errors:
        return 1
    return 0


__all__ = ["infer", "InferSummary", "exit_code", "TransferError"]
