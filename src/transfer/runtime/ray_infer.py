"""Batch inference on Ray Data: the same rows as ``transfer infer``, computed by an actor
pool that holds one ONNX Runtime session per worker (see docs/distributed.md).

Files are listed on the driver (the same walk as locally; ``s3://`` / ``gs://`` prefixes
through ``pyarrow.fs``, as Ray Data reads them), read and decoded inside the workers with
the runtime's own pixel path, and the ordered rows are streamed back to the driver and
written as CSV / JSON lines (identical to local mode) plus Parquet.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import load_bundle
from ..errors import ConfigError


class _Predictor:
    """One Ray actor: a verified bundle, a runner and a head, loaded once."""

    def __init__(self, bundle_path: str, head: str | None, head_format: str, topk: int, threads: int,
                 backend: str | None = None, providers: str | None = None):
        from .heads import make_head
        from .runners import make_runner

        self.bundle = load_bundle(bundle_path)
        # default on a worker: ONNX Runtime on the best provider *that worker* has (CUDA on
        # a GPU node that Ray gave a GPU, else CPU)
        self.runner = make_runner(self.bundle, backend or "onnxruntime", providers, threads)
        self.head = make_head(self.bundle, head, head_format)
        self.names = self.bundle.class_names
        self.topk = min(topk, len(self.names))

    def __call__(self, batch: dict) -> dict:
        from .infer import top_k
        from ..data.stream import decode_item

        size = self.bundle.input_size
        items = []
        for p, pre in zip(batch["path"], batch["pre_error"]):
            items.append((str(p), str(pre)) if pre else (str(p), decode_item(str(p), size)))
        ok = [i for i, (_, it) in enumerate(items) if not isinstance(it, str) and it.pixels is not None]
        probs = None
        if ok:
            x = np.stack([items[i][1].pixels for i in ok]).astype(np.float32)
            feats, net = self.runner.run(x)
            probs = self.head(feats, net)
        out = {"path": [], "status": [], "error": [], "classes": [], "probs": []}
        j = 0
        for p, it in items:
            err = it if isinstance(it, str) else it.error
            out["path"].append(p)
            if err:
                out["status"].append("error"), out["error"].append(err)
                out["classes"].append(""), out["probs"].append("")
                continue
            classes, top = top_k(probs[j], self.names, self.topk)
            j += 1
            out["status"].append("ok"), out["error"].append("")
            out["classes"].append(json.dumps(classes))  # JSON: any character in a name survives
            out["probs"].append(json.dumps(top))
        return {k: np.asarray(v, dtype=object) for k, v in out.items()}


def infer_ray(bundle_path, inputs: Sequence[str | os.PathLike], *, out, fmt: str | None = None, batch: int = 32,
              topk: int = 1, head: str | None = None, head_format: str = "onnx", recursive: bool = False,
              address: str | None = None, workers: int = 2, threads_per_worker: int = 1,
              gpus_per_worker: float = 0.0, backend: str | None = None, providers: str | None = None) -> dict:
    """Predict with Ray Data; returns a summary dict. Same rows and order as :func:`infer`.

    Each of ``workers`` actors reserves ``threads_per_worker`` CPUs (its ONNX Runtime
    intra-op threads) and ``gpus_per_worker`` GPUs, and runs ``backend`` / ``providers``
    as :func:`transfer.runtime.runners.make_runner` does locally.

    Raises:
        ConfigError: bad options (before Ray starts); DependencyMissingError without Ray.

    Example:
        >>> infer_ray("bundle", ["images/"], out="preds.csv", recursive=True, workers=2)  # doctest: +SKIP
    """
    from .heads import check_head
    from .infer import _Writer, output_path, resolve_format
    from ..data.stream import iter_inputs
    from .runners import model_key_for

    if out is None or os.fspath(out) == "-":
        raise ConfigError("--ray needs --out FILE or FOLDER/ (rows are streamed back and written there)")
    fmt = resolve_format(fmt, out)
    out = output_path(out, fmt)
    if batch < 1 or workers < 1 or topk < 1 or threads_per_worker < 1:
        raise ConfigError("--batch, --workers, --threads and --topk must be positive")
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0 (got {gpus_per_worker})")
    # fail fast on the driver, before Ray starts: tampered / invalid bundles, a backend,
    # head or provider the bundle or this onnxruntime cannot serve
    b = load_bundle(bundle_path)
    model_key_for(b, backend)
    check_head(b, head, head_format)
    from .sessions import check_provider_names

    check_provider_names(providers)  # names only: a GPU worker may offer providers this driver lacks
    topk = min(topk, len(b.class_names))
    from .._ray import init_ray

    ray = init_ray(address, purpose="--ray")
    entries = list(iter_inputs(inputs, recursive=recursive))
    if not entries:
        raise ConfigError("no image files found in the inputs")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items([{"path": p, "pre_error": e or ""} for p, e in entries])
    ds = ds.map_batches(_Predictor, fn_constructor_args=(str(bundle_path), head, head_format, topk, threads_per_worker,
                                                         backend, providers),
                        batch_size=batch, compute=ray.data.ActorPoolStrategy(size=workers), batch_format="numpy",
                        num_cpus=threads_per_worker,
                        num_gpus=gpus_per_worker or None)
    w = _Writer(out, fmt, topk)
    pq = _ParquetSink(Path(out).with_suffix(".parquet"), topk)
    t0, n, errors, done = time.perf_counter(), 0, 0, False
    try:
        for rb in ds.iter_batches(batch_size=batch, batch_format="numpy"):
            for i in range(len(rb["path"])):
                p, err = str(rb["path"][i]), str(rb["error"][i]) or None
                classes = json.loads(str(rb["classes"][i])) if not err else None
                probs = json.loads(str(rb["probs"][i])) if not err else None
                w.row(p, classes, probs, err)
                pq.add(p, classes, probs, err)
                n += 1
                errors += bool(err)
        done = True
    finally:
        w.close(ok=done)
        pq.close(ok=done)
    secs = time.perf_counter() - t0
    return {"total": n, "ok": n - errors, "errors": errors, "seconds": secs, "images_per_second": n / secs if secs else 0,
            "out": str(out), "parquet": str(pq.path) if pq.enabled else None, "workers": workers}


class _ParquetSink:
    """Rows -> Parquet in chunks (pyarrow comes with ray[data])."""

    def __init__(self, path: Path, topk: int, chunk: int = 4096):
        try:
            import pyarrow  # noqa: F401
            self.enabled = True
        except ImportError:
            self.enabled = False
        self.path, self.topk, self.chunk, self.rows, self.writer = path, topk, chunk, [], None
        self.tmp = path.with_name(f".{path.name}.partial")

    def add(self, path, classes, probs, err):
        if not self.enabled:
            return
        r = {"path": path, "status": "error" if err else "ok", "error": err or ""}
        for k in range(self.topk):
            r[f"class{k + 1}"] = classes[k] if classes else None
            r[f"prob{k + 1}"] = probs[k] if probs else None
        self.rows.append(r)
        if len(self.rows) >= self.chunk:
            self._flush()

    def _flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        fields = [("path", pa.string()), ("status", pa.string()), ("error", pa.string())]
        for k in range(self.topk):
            fields += [(f"class{k + 1}", pa.string()), (f"prob{k + 1}", pa.float64())]
        table = pa.Table.from_pylist(self.rows, schema=pa.schema(fields))
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.tmp), table.schema)
        self.writer.write_table(table)
        self.rows = []

    def close(self, ok: bool):
        if not self.enabled:
            return
        self._flush()
        if self.writer is not None:
            self.writer.close()
            if ok:
                os.replace(self.tmp, self.path)
