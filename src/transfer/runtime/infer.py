"""`transfer infer`: files and folders -> one prediction row per file, streamed to disk."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..bundle import load_bundle
from ..errors import ConfigError, TransferError


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


def output_path(out: str | os.PathLike | None, fmt: str) -> Path | None:
    """Where rows go: ``out`` itself, or ``out/predictions.<csv|jsonl>`` when ``out`` is a
    folder (an existing directory, or a path ending in ``/``).

    Example:
        >>> str(output_path("preds/", "csv"))
        'preds/predictions.csv'
    """
    if out is None:
        return None
    raw = os.fspath(out)
    p = Path(raw)
    if raw.endswith(("/", os.sep)) or p.is_dir():
        return p / f"predictions.{'csv' if fmt == 'csv' else 'jsonl'}"
    return p


class _Writer:
    def __init__(self, out: str | os.PathLike | None, fmt: str, topk: int):
        self.fmt, self.topk = fmt, topk
        if out is None:
            self.fh, self.tmp, self.path = sys.stdout, None, None
        else:
            self.path = Path(out)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(f".{self.path.name}.partial")
            self.fh = open(self.tmp, "w", newline="", encoding="utf-8")
        if fmt == "csv":
            self.csv = csv.writer(self.fh)
            head = ["path", "status"]
            for k in range(1, topk + 1):
                head += [f"class{k}", f"prob{k}"]
            self.csv.writerow(head + ["error"])

    def row(self, path: str, classes: list[str] | None, probs: list[float] | None, error: str | None):
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
        if ok:
            os.replace(self.tmp, self.path)
        else:  # keep what was predicted so far, under a name that says so
            os.replace(self.tmp, self.path.with_name(self.path.name + ".incomplete"))


def infer(bundle_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, out=None, fmt: str = "csv",
          batch: int = 32, topk: int = 1, head: str | None = None, head_format: str = "onnx",
          backend: str | None = None, providers=None, recursive: bool = False, workers: int = 2,
          threads: int | None = None, progress: Callable[[InferSummary], None] | None = None) -> InferSummary:
    """Predict every image of ``inputs`` with a bundle; bad files become error rows.

    Args:
        bundle_path: a bundle folder (hashes checked on load).
        inputs: files and folders (folders: their image files; ``recursive`` for sub-folders).
        out: output file (CSV or JSON lines); ``None`` writes to stdout. Written to a
            partial name and renamed when done.
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
    from .pipeline import batches, iter_inputs
    from .runners import make_runner

    if fmt not in ("csv", "jsonl"):
        raise ConfigError(f"invalid --format {fmt!r}; accepted: csv, jsonl")
    if batch < 1 or topk < 1 or workers < 1:
        raise ConfigError("--batch, --topk and --workers must be positive")
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
                p = probs[j]
                j += 1
                order = np.argsort(-p)[:topk]
                w.row(it.path, [names[k] for k in order], [float(p[k]) for k in order], None)
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
