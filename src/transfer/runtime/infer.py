"""`transfer infer`: files and folders -> one prediction row per file, streamed to disk.

:func:`infer` runs here; :func:`transfer.runtime.ray_infer.infer_ray` runs the same rows on
Ray Data. Both take an :class:`~transfer.runtime.predict_config.InferConfig` (checked once),
predict with a :class:`~transfer.runtime.predictor.Predictor`, build rows with
:func:`transfer.runtime.rows.prediction_rows`, write them through the sinks of
:func:`transfer.runtime.rows.open_sinks` and return an :class:`InferSummary`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..bundle import load_bundle
from ..data.stream import batches, iter_inputs
from ..errors import ConfigError, TransferError
from ..locks import locked
from ..progress import ProgressLike, as_progress
from .predict_config import ROW_SUFFIXES, InferConfig, configure, is_folder
from .cam import BundleCam, CamWriter, check_cam_out, parse_class
from .predictor import Predictor
from .rows import Row, Sink, open_sinks, prediction_rows
from .runners import model_key_for
from .sessions import available_providers


@dataclass
class InferSummary:
    """What a run did: counts, time, what ran and where the rows went (local and Ray alike)."""

    total: int = 0
    ok: int = 0
    errors: int = 0
    unknown: int = 0  # predicted, but rejected by the unknown-input rule (--reject)
    seconds: float = 0.0
    backend: str = ""
    provider: str = ""
    head: str = "network"
    out: str | None = None
    error_examples: list[str] = field(default_factory=list)
    providers_found: list[str] = field(default_factory=list)  # ONNX Runtime's available providers
    parquet: str | None = None  # the Parquet copy of a Ray run
    workers: int | None = None  # Ray actors (None: this process)

    @property
    def images_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def add(self, row: Row) -> None:
        self.total += 1
        if row.error:
            self.errors += 1
            if len(self.error_examples) < 5:
                self.error_examples.append(f"{row.path}: {row.error}")
        else:
            self.ok += 1
            self.unknown += row.known is False

    def __getitem__(self, key: str):
        """Dict-style reading (``summary["total"]``), as the Ray entry point's results were read."""
        if key == "images_per_second":
            return self.images_per_second
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        raise KeyError(key)

    def lines(self) -> list[str]:
        """What the command prints: one summary line, then up to five failed files."""
        where = f"Ray, {self.workers} worker(s)" if self.workers else self.provider
        found = ", ".join(p.replace("ExecutionProvider", "") for p in self.providers_found)
        outs = [o for o in (self.out, self.parquet) if o]
        unknown = f" ({self.unknown} unknown)" if self.unknown else ""
        out = [f"{self.total} file(s): {self.ok} predicted{unknown}, {self.errors} error(s) in {self.seconds:.2f}s "
               f"({self.images_per_second:.1f} img/s; {self.backend} on {where}, head {self.head}"
               + (f"; providers found: {found}" if found else "") + ")"
               + (f" -> {', '.join(outs)}" if outs else "")]
        out += [f"  error: {e}" for e in self.error_examples]
        if self.errors > len(self.error_examples):
            out.append(f"  ... and {self.errors - len(self.error_examples)} more (see the error column)")
        if self.total == 0:
            out.append("error: no image files found in the inputs")
        return out


def resolve_format(fmt: str | None, out: str | os.PathLike | None) -> str:
    """The asked format, or the one the suffix of ``out`` names (``.jsonl`` -> jsonl), else csv
    (:class:`~transfer.runtime.predict_config.InferConfig` refused a format that contradicts it).

    Example::

        resolve_format(None, "preds.jsonl"), resolve_format(None, None)   # ('jsonl', 'csv')
    """
    raw = os.fspath(out) if out is not None else ""
    implied = None if not raw or raw.endswith(("/", os.sep)) else ROW_SUFFIXES.get(Path(raw).suffix.lower())
    return fmt or implied or "csv"


def output_path(out: str | os.PathLike | None, fmt: str) -> Path | None:
    """Where rows go: ``out`` itself, or ``out/predictions.<csv|jsonl>`` when ``out`` is a
    folder (an existing directory, or a path ending in ``/``); ``None`` or ``-``: stdout.

    Example::

        output_path("preds/", "csv")     # Path('preds/predictions.csv')
    """
    if out is None or os.fspath(out) == "-":
        return None
    raw = os.fspath(out)
    return Path(raw) / f"predictions.{fmt}" if is_folder(raw) else Path(raw)


def check_output(out: Path | None, bundle_path, inputs: Sequence, *, also: Sequence[Path] = ()) -> None:
    """Outputs never destroy inputs: refuse an output inside the bundle being read, or one that
    is an input file (``also``: further files the run writes, e.g. the Parquet copy).

    Raises:
        ConfigError: naming the input the output would overwrite.
    """
    if out is None:
        return
    targets = [Path(os.path.abspath(p)) for p in (out, *also)]
    bundle = Path(os.path.realpath(bundle_path))
    for t in targets:
        real = Path(os.path.realpath(t))
        if real == bundle or bundle in real.parents:
            raise ConfigError(f"output {t} is inside the bundle {bundle_path} being read; writing it would change "
                              "the bundle", hint="write the predictions outside the bundle folder", option="out")
        for raw in inputs:
            p = Path(os.fspath(raw))
            if p.is_file() and real.exists() and os.path.samefile(p, real):
                raise ConfigError(f"output {t} is the input file {raw}; it would be overwritten",
                                  hint="choose another output file", option="out")


def infer(bundle_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], config: InferConfig | None = None, *,
          progress: ProgressLike = None, **options) -> InferSummary:
    """Predict every image of ``inputs`` with a bundle; bad files become error rows.

    Args:
        bundle_path: a bundle folder (hashes checked on load).
        inputs: files and folders (folders: their image files; ``recursive`` for sub-folders).
        config: the options (:class:`~transfer.runtime.predict_config.InferConfig`): ``out``
            (a CSV or JSON lines file, a ``FOLDER/``, or ``None`` / ``-`` for stdout; written to
            a partial name and renamed when done), ``fmt``, ``batch``, ``topk``, ``workers``
            (decode threads), the model group (backend, providers, threads, head, reject rule:
            rejected images are marked ``unknown``, scored on the network's own outputs
            whatever the head; every row records the rule) and the trust group.
        options: laid over ``config``, group options flat (``head="rf"``, ``trust_pickle=True``).
        progress: a :class:`transfer.progress.Progress` (a bar with the rate and the errors so far).

    Returns:
        :class:`InferSummary` (counts, throughput, what ran).

    Raises:
        ConfigError / BundleError: bad options or bundle (before any image is read), an output
            inside the bundle or on an input file.
        LockedError: another process writes the same output.

    Example::

        infer("runs/digits/bundle", ["images/"], out="preds.csv", recursive=True)
    """
    cfg = configure(InferConfig, config, options)
    if not inputs:
        raise ConfigError("no input files or folders given", option="inputs")
    fmt = resolve_format(cfg.fmt, cfg.out)
    out = output_path(cfg.out, fmt)
    check_output(out, bundle_path, inputs)
    cam_out = check_cam_out(cfg.cam, bundle_path) if cfg.cam is not None else None
    with output_lock(out):
        b = load_bundle(bundle_path, trust=cfg.security.store)
        # a bundle without maps is refused before any session is made
        cam = BundleCam.open(b, model_key_for(b, cfg.model.backend)) if cam_out is not None else None
        predictor = Predictor.open(b, cfg.model, trust_pickle=cfg.security.trust_pickle)
        maps = _cam_writer(cam, predictor, cam_out, cfg) if cam is not None else None
        if maps is not None:
            as_progress(progress).say(maps.note())
        topk = min(cfg.topk, len(predictor.names))
        serving = predictor.describe()
        s = InferSummary(backend=serving["backend"], provider=serving["provider"], head=serving["head"],
                         out=str(out) if out else None, providers_found=available_providers())

        def predicted():
            for pb in batches(iter_inputs(inputs, recursive=cfg.recursive), predictor.input_size, batch=cfg.batch,
                              workers=cfg.workers, recipe=predictor.recipe):
                pred = predictor.predict(pb.x)
                if maps is not None:
                    maps.write([pb.items[i].path for i in pb.ok_index], pb.x, pred.outputs.feature_map,
                               pred.outputs.probs)
                yield prediction_rows([(it.path, it.error) for it in pb.items], pred, predictor.names, topk)

        with predictor, (maps if maps is not None else contextlib.nullcontext()):
            s = write_rows(predicted(), open_sinks(out, fmt, topk, reject=predictor.rule), s, progress)
        if maps is not None:
            as_progress(progress).say(maps.summary())
        return s


def _cam_writer(cam: BundleCam, predictor: Predictor, out: Path, cfg: InferConfig) -> CamWriter:
    """The writer of ``--cam`` (the runner asked for the feature map from now on, unless the maps
    come from the bundle's Grad-CAM graph)."""
    if cam.needs_feature_map:
        predictor.runner.request("feature_map")
    return CamWriter(out, cam, predictor.names, parse_class(cfg.cam_class, predictor.names),
                     head=predictor.head.name, workers=cfg.workers, overlay=cfg.cam_overlay)


def output_lock(out: Path | None):
    """The lock of an output file (nothing for standard output): a second process writing the
    same file gets :class:`transfer.locks.LockedError` instead of interleaving rows."""
    return locked(out, purpose="infer") if out is not None else contextlib.nullcontext()


def write_rows(batches_of_rows: Iterable[Sequence[Row]], sinks: Sink, summary: InferSummary,
               progress: ProgressLike = None, *, total: int | None = None, desc: str = "infer") -> InferSummary:
    """The one output loop: every row to the sinks and the summary, a bar with the rate and the
    errors so far; the sinks are closed as finished, or as incomplete when interrupted."""
    t0 = time.perf_counter()
    done = False
    try:
        with as_progress(progress).bar(total, desc, unit="img") as bar:
            for rows in batches_of_rows:
                for row in rows:
                    sinks.write(row)
                    summary.add(row)
                bar.update(len(rows))
                bar.set(f"{summary.errors} error(s)")
        done = True
    finally:
        summary.seconds = time.perf_counter() - t0
        sinks.close(ok=done)
    return summary


def exit_code(summary: InferSummary, strict: bool) -> int:
    """0 normally; 1 when nothing succeeded (or no input was found), or with ``strict`` when any file failed."""
    if summary.ok == 0:
        return 1
    if strict and summary.errors:
        return 1
    return 0


__all__ = ["infer", "InferSummary", "exit_code", "output_path", "resolve_format", "check_output", "output_lock",
           "write_rows", "TransferError"]
