"""Batch inference on Ray Data: the same rows as ``transfer infer``, computed by an actor
pool that holds one ONNX Runtime session per worker (see docs/distributed.md).

Files are listed on the driver (the same walk as locally; ``s3://`` / ``gs://`` prefixes
through ``pyarrow.fs``, as Ray Data reads them), read and decoded inside the workers with
the runtime's own pixel path, and the ordered rows are streamed back to the driver and
written by the same sinks as local mode (CSV / JSON lines, identical) plus Parquet.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..progress import ProgressLike
from .infer import InferSummary


class _Predictor:
    """One Ray actor: a verified bundle, a runner and a head, loaded once."""

    def __init__(self, bundle_path: str, head: str | None, head_format: str, topk: int, threads: int,
                 backend: str | None = None, providers: str | None = None, trust=False, trust_pickle: bool = False,
                 reject: bool | str = False):
        from ..bundle import load_bundle
        from .heads import make_head
        from .runners import make_runner

        # the driver's trust decision travels with the job: a worker's environment does not change it
        self.bundle = load_bundle(bundle_path, trust=trust)
        # default on a worker: ONNX Runtime on the best provider *that worker* has (CUDA on
        # a GPU node that Ray gave a GPU, else CPU)
        self.runner = make_runner(self.bundle, backend or "onnxruntime", providers, threads)
        self.head = make_head(self.bundle, head, head_format, trust_pickle=trust_pickle)
        from .infer import reject_detector

        self.detector = reject_detector(self.bundle, reject)
        self.names = self.bundle.class_names
        self.topk = min(topk, len(self.names))

    def __call__(self, batch: dict) -> dict:
        from ..data.stream import decode_item
        from .infer import predict
        from .rows import prediction_rows, rows_to_columns

        items = [decode_item(os.fsdecode(bytes(p)), self.bundle.input_size, recipe=self.bundle.recipe) if not pre else None
                 for p, pre in zip(batch["path"], batch["pre_error"])]
        entries = [(os.fsdecode(bytes(p)), str(pre) or it.error) for p, pre, it in
                   zip(batch["path"], batch["pre_error"], items)]
        good = [it.pixels for it in items if it is not None and it.pixels is not None]
        x = np.stack(good).astype(np.float32) if good else np.zeros((0, 0, 0, 3), np.float32)
        probs, unknown = predict(self.runner, self.head, self.detector, x)
        cols = rows_to_columns(prediction_rows(entries, probs, self.names, self.topk, unknown))
        return {k: np.asarray(v, dtype=object) for k, v in cols.items()}


def infer_ray(bundle_path, inputs: Sequence[str | os.PathLike], *, out, fmt: str | None = None, batch: int = 32,
              topk: int = 1, head: str | None = None, head_format: str = "onnx", recursive: bool = False,
              address: str | None = None, workers: int = 2, threads_per_worker: int = 1,
              gpus_per_worker: float = 0.0, backend: str | None = None, providers: str | None = None,
              progress: ProgressLike = None, trust=None, trust_pickle: bool = False,
              reject: bool | str = False) -> InferSummary:
    """Predict with Ray Data; same rows and order as :func:`transfer.runtime.infer.infer`.

    Each of ``workers`` actors reserves ``threads_per_worker`` CPUs (its ONNX Runtime
    intra-op threads) and ``gpus_per_worker`` GPUs, and runs ``backend`` / ``providers``
    as :func:`transfer.runtime.runners.make_runner` does locally. ``progress`` shows the rows
    as they come back (a bar with the rate and the errors so far). ``trust`` /
    ``trust_pickle`` are decided on the driver and handed to every worker; ``reject`` as in
    :func:`transfer.runtime.infer.infer`.

    Returns:
        :class:`transfer.runtime.infer.InferSummary` (with ``workers`` and ``parquet``).

    Raises:
        ConfigError: bad options (before Ray starts); DependencyMissingError without Ray.

    Example::

        infer_ray("bundle", ["images/"], out="preds.csv", recursive=True, workers=2)
    """
    from ..signing import trust_store
    from .infer import check_options, check_output, output_lock, output_path, resolve_format
    from .rows import parquet_path

    if out is None or os.fspath(out) == "-":
        raise ConfigError("inference on Ray needs an output file or FOLDER/ (rows are streamed back and written "
                          "there)", option="out")
    check_options(batch=batch, topk=topk, workers=workers, threads=threads_per_worker, inputs=inputs)
    if gpus_per_worker < 0:
        raise ConfigError(f"GPUs per worker must be >= 0 (got {gpus_per_worker})", option="gpus_per_worker")
    fmt = resolve_format(fmt, out)
    out = output_path(out, fmt)
    check_output(out, bundle_path, inputs, also=[parquet_path(out)])
    with output_lock(out):
        store = trust_store(trust)
        return _run_on_ray(bundle_path, inputs, out, fmt, store or False, trust_pickle, batch=batch, topk=topk,
                           head=head, head_format=head_format, recursive=recursive, address=address,
                           workers=workers, threads_per_worker=threads_per_worker, gpus_per_worker=gpus_per_worker,
                           backend=backend, providers=providers, progress=progress, reject=reject)


def _run_on_ray(bundle_path, inputs, out, fmt, trust, trust_pickle, *, batch, topk, head, head_format, recursive,
                address, workers, threads_per_worker, gpus_per_worker, backend, providers, progress,
                reject=False) -> InferSummary:
    from ..bundle import load_bundle
    from ..data.stream import iter_inputs
    from .heads import check_head
    from .infer import reject_detector, write_rows
    from .rows import RejectRule, open_sinks, rows_from_columns
    from .runners import model_key_for
    from .sessions import check_provider_names

    # fail fast on the driver, before Ray starts: tampered / invalid / untrusted bundles, a
    # backend, head or provider the bundle or this onnxruntime cannot serve
    b = load_bundle(bundle_path, trust=trust)
    key = model_key_for(b, backend)
    check_head(b, head, head_format, trust_pickle=trust_pickle)
    check_provider_names(providers)  # names only: a GPU worker may offer providers this driver lacks
    detector = reject_detector(b, reject)
    topk = min(topk, len(b.class_names))
    from .._ray import init_ray

    ray = init_ray(address, purpose="inference on Ray")
    entries = list(iter_inputs(inputs, recursive=recursive))
    if not entries:
        raise ConfigError("no image files found in the inputs", option="inputs")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # paths travel as their file-system bytes: a name that is not UTF-8 survives Arrow
    ds = ray.data.from_items([{"path": os.fsencode(p), "pre_error": e or ""} for p, e in entries])
    ds = ds.map_batches(_Predictor, fn_constructor_args=(str(bundle_path), head, head_format, topk, threads_per_worker,
                                                         backend, providers, trust, trust_pickle, reject),
                        batch_size=batch, compute=ray.data.ActorPoolStrategy(size=workers), batch_format="numpy",
                        num_cpus=threads_per_worker,
                        num_gpus=gpus_per_worker or None)
    sinks = open_sinks(out, fmt, topk, parquet=True,
                       reject=RejectRule(detector.score, detector.threshold) if detector else None)
    s = InferSummary(backend=backend or "onnxruntime", provider=key, head=head or "network", out=str(out),
                     parquet=str(sinks.paths[1]) if len(sinks.paths) > 1 else None, workers=workers)
    rows = (rows_from_columns(rb) for rb in ds.iter_batches(batch_size=batch, batch_format="numpy"))
    return write_rows(rows, sinks, s, progress, total=len(entries), desc="infer on Ray")
