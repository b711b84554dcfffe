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

from ..bundle import load_bundle
from ..data.stream import decode_item, iter_inputs
from ..errors import ConfigError
from ..options import replace
from .. import _ray
from ..progress import ProgressLike
from ..signing import trust_store
from .infer import InferSummary, check_output, output_lock, output_path, resolve_format, write_rows
from .predict_config import InferConfig, ModelOptions, configure
from .predictor import Predictor, check_options
from .rows import RejectRule, open_sinks, parquet_path, prediction_rows, rows_from_columns, rows_to_columns
from .runners import model_key_for


class _Worker:
    """One Ray actor: a verified bundle and its :class:`~transfer.runtime.predictor.Predictor`, loaded once."""

    def __init__(self, bundle_path: str, options: ModelOptions, topk: int, trust, trust_pickle: bool):
        # the driver's trust decision travels with the job: a worker's environment does not change it
        self.bundle = load_bundle(bundle_path, trust=trust)
        # default on a worker: ONNX Runtime on the best provider *that worker* has (CUDA on
        # a GPU node that Ray gave a GPU, else CPU)
        self.predictor = Predictor.open(self.bundle, options, trust_pickle=trust_pickle)
        self.topk = topk

    def __call__(self, batch: dict) -> dict:
        p = self.predictor
        items = [decode_item(os.fsdecode(bytes(path)), p.input_size, recipe=p.recipe) if not pre else None
                 for path, pre in zip(batch["path"], batch["pre_error"])]
        entries = [(os.fsdecode(bytes(path)), str(pre) or it.error) for path, pre, it in
                   zip(batch["path"], batch["pre_error"], items)]
        good = [it.pixels for it in items if it is not None and it.pixels is not None]
        h, w = p.input_size
        x = np.stack(good).astype(np.float32) if good else np.zeros((0, h, w, 3), np.float32)
        cols = rows_to_columns(prediction_rows(entries, p.predict(x), p.names, self.topk))
        return {k: np.asarray(v, dtype=object) for k, v in cols.items()}


def infer_ray(bundle_path, inputs: Sequence[str | os.PathLike], config: InferConfig | None = None, *,
              progress: ProgressLike = None, **options) -> InferSummary:
    """Predict with Ray Data; same rows and order as :func:`transfer.runtime.infer.infer`.

    Each of ``workers`` actors reserves ``threads`` CPUs (its ONNX Runtime intra-op threads;
    default 1) and ``gpus_per_worker`` GPUs, and runs the model options as
    :class:`~transfer.runtime.predictor.Predictor` does locally. ``progress`` shows the rows
    as they come back (a bar with the rate and the errors so far). The trust options are
    decided on the driver and handed to every worker; ``options`` are laid over ``config``
    as in :func:`~transfer.runtime.infer.infer` (``ray`` is implied).

    Returns:
        :class:`transfer.runtime.infer.InferSummary` (with ``workers`` and ``parquet``).

    Raises:
        ConfigError: bad options (before Ray starts); DependencyMissingError without Ray.

    Example::

        infer_ray("bundle", ["images/"], out="preds.csv", recursive=True, workers=2)
    """
    cfg = configure(InferConfig, config, {**options, "ray": True})
    if not inputs:
        raise ConfigError("no input files or folders given", option="inputs")
    fmt = resolve_format(cfg.fmt, cfg.out)
    out = output_path(cfg.out, fmt)
    check_output(out, bundle_path, inputs, also=[parquet_path(out)])
    with output_lock(out):
        return _run_on_ray(bundle_path, inputs, out, fmt, cfg, progress)


def _run_on_ray(bundle_path, inputs, out, fmt: str, cfg: InferConfig, progress) -> InferSummary:
    # fail fast on the driver, before Ray starts: tampered / invalid / untrusted bundles, a
    # backend, head or score the bundle cannot serve (provider names were checked with the
    # options; whether a worker's build offers them, the worker says)
    trust = trust_store(cfg.security.store) or False
    b = load_bundle(bundle_path, trust=trust)
    key = model_key_for(b, cfg.model.backend)
    detector = check_options(b, cfg.model, trust_pickle=cfg.security.trust_pickle)
    model = replace(cfg.model, threads=cfg.model.threads or 1)
    topk = min(cfg.topk, len(b.class_names))

    ray = _ray.init_ray(cfg.address, purpose="inference on Ray")
    entries = list(iter_inputs(inputs, recursive=cfg.recursive))
    if not entries:
        raise ConfigError("no image files found in the inputs", option="inputs")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # paths travel as their file-system bytes: a name that is not UTF-8 survives Arrow
    ds = ray.data.from_items([{"path": os.fsencode(p), "pre_error": e or ""} for p, e in entries])
    ds = ds.map_batches(_Worker, fn_constructor_args=(str(bundle_path), model, topk, trust,
                                                      cfg.security.trust_pickle),
                        batch_size=cfg.batch, compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                        batch_format="numpy", num_cpus=model.threads, num_gpus=cfg.gpus_per_worker or None)
    sinks = open_sinks(out, fmt, topk, parquet=True,
                       reject=RejectRule(detector.score, detector.threshold) if detector is not None else None)
    s = InferSummary(backend=cfg.model.backend, provider=key, head=cfg.model.head, out=str(out),
                     parquet=str(sinks.paths[1]) if len(sinks.paths) > 1 else None, workers=cfg.workers)
    rows = (rows_from_columns(rb) for rb in ds.iter_batches(batch_size=cfg.batch, batch_format="numpy"))
    return write_rows(rows, sinks, s, progress, total=len(entries), desc="infer on Ray")
