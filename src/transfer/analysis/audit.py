"""Audit an image folder before training: duplicates, train/test leakage, label errors,
outliers and image quality, tied to the split a run uses.

One streamed pass reads every image once (bounded memory: a chunk of images at a time, in
threads one chunk ahead of the model): each file is decoded once and everything kept comes from
those pixels -- a :class:`~transfer.data.fingerprint.Fingerprint` (exact-pixel hash, perceptual hash,
thumbnails), a few quality numbers (batched per image size) and the model input, made exactly as
the model's own loader makes it (:func:`transfer.data.image.load_image` with the run's recorded
pixel recipe; checked on the first images). The model input goes through the pooled features of
a trained trial's model or of a chosen backbone (memory-mapped ``features.npy``) and, with a run,
of the same trial's network at its initial weights (``initial_features.npy``). The models run in
ONNX Runtime, converted by a child process that alone imports TensorFlow (or, asked to, a thread)
and checked against Keras on the first images (:mod:`transfer.analysis.audit_engine`, :mod:`transfer.analysis.audit_model`;
an earlier audit's conversion of the same model is taken from :mod:`transfer.analysis.audit_cache`). The SHA-256
of every file is taken before, to tell whether an earlier audit still holds. Then:

* **duplicates** -- exact (same decoded pixels) and near (:func:`transfer.data.near_search.near_pairs_arrays`),
  verified pair by pair and grouped into chains (:func:`transfer.data.dedupe.components`); a
  group is *within a class*, *across classes* (conflicting labels) and, when the images belong
  to a run's splits (or the folder's own ``train/val/test``), *across splits* (leakage). Each
  group also carries the cosine of its features.
* **label issues** -- confident learning (cleanlab) on probabilities that no model fit the
  judged label to: heads cross-fitted on the initial weights' features and the pixels for the
  images the trial trained on, and on the trained features too for the others
  (:mod:`transfer.analysis.audit_labels`), ranked by self-confidence, with the suggested label.
* **outliers** -- mean cosine distance to the nearest neighbours in feature space
  (:func:`transfer.data.nearest.nearest`), flagged far above the folder's own spread.
* **quality** -- near-constant (blank), very dark or bright, noise, blurry, tiny or extreme
  aspect ratio, grayscale in a colour set.

Outputs (``OUT/``): ``audit.csv`` (path, kind, score, group, label, suggested label, split),
``audit.json`` (summary, class balance, groups), ``audit.html`` (thumbnails per finding),
``files.csv`` (path, SHA-256 of every audited file), ``features.npy`` and (with a run)
``initial_features.npy``. A later audit with
the same ``OUT`` reuses the result only when every file's SHA-256 and the feature source
are unchanged; otherwise it says what changed and audits again.

Example::

    res = audit_folder("data/fashion", run="runs/fashion", out="runs/fashion/audit")
    res.summary["counts"]        # {"near_duplicate": 31, "label_issue": 402, ...}
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fsutil import read_json, sha256_file, write_json_atomic
from ..options import replace
from ..progress import ProgressLike, as_progress
from ..tables import markdown, write_csv
from .audit_config import AuditConfig
from .audit_engine import ORT_THREADS, FeatureEngine, FeatureSource, feature_source
from .audit_findings import (
    Z_FLAG,
    AuditData,
    audit_data,
    find_duplicates,
    finding_row,
    labels_and_outliers,
    quality_findings,
)
from .audit_page import KINDS, write_page
from .audit_pass import PARITY_IMAGES, FeatureSink, check_pixels, stream_pass

AUDIT_VERSION = 3
CSV_COLUMNS = ("path", "kind", "score", "group", "label", "suggested_label", "split", "detail")


def audit_dir(run) -> Path:
    """Where an audit of a run's data goes by default (``RUN/audit``)."""
    return Path(run.path if hasattr(run, "path") else run) / "audit"


@dataclass
class AuditResult:
    out: Path
    summary: dict
    rows: list[dict] = field(default_factory=list)
    reused: bool = False

    @property
    def table(self) -> str:
        """Counts per kind as a Markdown table."""
        counts = self.summary["counts"]
        return markdown(["finding", "images"], [[k, counts.get(k, 0)] for k in KINDS if counts.get(k)] or
                        [["(nothing found)", 0]])


def _file_hashes(root: Path, rel: Sequence[str], workers: int) -> dict[str, str]:
    """SHA-256 of every file (in threads: hashing and reading release the GIL); a file that cannot
    be read gets ``unreadable: <why>`` (the pass lists it), so it too counts as changed once it can."""
    from concurrent.futures import ThreadPoolExecutor

    def one(r: str) -> str:
        try:
            return sha256_file(root / r)
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="transfer-audit-hash") as pool:
        return dict(zip(rel, pool.map(one, rel, chunksize=64)))


def _previous(out: Path, hashes: dict[str, str], source: dict, settings: dict) -> tuple[dict | None, str]:
    """The earlier audit's summary when nothing changed, else ``None`` and why."""
    js, files = out / "audit.json", out / "files.csv"
    if not js.is_file() or not files.is_file():
        return None, ""
    try:
        old = read_json(js)
        import csv

        with open(files, newline="", encoding="utf-8") as f:
            before = {r["path"]: r["sha256"] for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError):
        return None, "the earlier audit is unreadable"
    if old.get("version") != AUDIT_VERSION or old.get("source") != source or old.get("settings") != settings:
        return None, "the feature source or settings differ from the earlier audit"
    changed = sum(1 for k, v in hashes.items() if k in before and before[k] != v)
    added, removed = len(set(hashes) - set(before)), len(set(before) - set(hashes))
    if changed or added or removed:
        return None, f"files changed since the earlier audit ({changed} changed, {added} added, {removed} removed)"
    return old, ""


def audit_folder(data: str | os.PathLike, config: AuditConfig | None = None, *, progress: ProgressLike = None,
                 **options) -> AuditResult:
    """Audit the image folder ``data`` and write ``audit.csv``, ``audit.json`` and ``audit.html``.

    Args:
        data: ``DATA/<class>/*`` or ``DATA/{train,val,test}/<class>/*``.
        config: the options (:class:`~transfer.analysis.audit_config.AuditConfig`): ``run``, a run
            folder whose trial (``trial``) gives the features and whose splits give the leakage
            check (paths relative to ``data``); without a run, ``backbone``, ``weights``
            (``imagenet`` or a weights file) and ``image_size`` give them; ``out`` (default
            ``RUN/audit`` with a run, else ``<data>-audit`` beside it); ``near_threshold`` (the
            verification score of a near-duplicate pair, :func:`transfer.data.near_verify.verify_pairs`);
            ``folds`` of the out-of-fold probabilities for label issues; ``neighbours`` of the
            outlier score; ``batch_size`` and ``workers`` (decoding threads); ``force`` (audit
            again even when nothing changed). ``options`` are laid over it by name.
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``.

    Returns:
        An :class:`AuditResult`.

    Raises:
        ConfigError: no feature source, bad numbers. DataError: no readable image.
        RunFolderError / ModelError: as opening the run or building the backbone.
    """
    cfg = replace(config or AuditConfig(), **options)
    p = as_progress(progress)
    run, workers = cfg.run, cfg.workers
    d = audit_data(data, run, p)
    out = Path(cfg.out) if cfg.out is not None else (audit_dir(run) if run is not None
                                                     else d.root.parent / f"{d.root.name}-audit")
    settings = {"near_threshold": cfg.threshold, "folds": cfg.folds, "neighbours": cfg.neighbours}
    src = feature_source(run, cfg.trial, cfg.backbone, cfg.weights, cfg.image_size)
    for note in src.notes:
        p.say(f"note: {note}")
    hashes = _file_hashes(d.root, d.rel, workers)
    if not cfg.force:
        old, why = _previous(out, hashes, src.describe, settings)
        if old is not None:
            p.say(f"audit: nothing changed since {old.get('created')}; reusing {out}")
            return AuditResult(out, old, _read_rows(out / "audit.csv"), reused=True)
        if why:
            p.say(f"audit: {why}; auditing again")
    out.mkdir(parents=True, exist_ok=True)
    first = {d.root / r: hashes[r] for r in d.rel[:2 * PARITY_IMAGES]}
    parity = check_pixels(list(first), src.size, recipe=src.recipe)
    if parity.exact:
        p.say(f"audit: the pass's model input differs from load_image's (recipe {parity.record['recipe']}) by up to "
              f"{parity.record['max_abs_diff']} grey levels on the first images; decoding every model input "
              "through load_image")
    with tempfile.TemporaryDirectory(prefix="transfer-audit-") as tmp:
        engine = FeatureEngine(src, Path(tmp), parity, threads=ORT_THREADS, p=p,
                               digests=[first[q] for q in parity.paths])
        try:
            return _run(d, src, engine, out, hashes, settings, batch_size=cfg.batch_size, workers=workers, p=p)
        finally:
            engine.close()


def _run(d: AuditData, src: FeatureSource, engine: FeatureEngine, out: Path, hashes: dict, settings: dict, *,
         batch_size, workers, p) -> AuditResult:
    t0 = time.perf_counter()
    _return_large_blocks()
    phases: dict[str, float] = {}
    paths = [d.root / r for r in d.rel]
    files = {name: engine.folder / f"{name}.npy" for name in engine.names}  # the k-fold models' softmax
    files.update({"source": out / "features.npy", "initial": out / "initial_features.npy"})
    sink = FeatureSink(engine, files, len(paths))
    if "initial" not in engine.names:
        (out / "initial_features.npy").unlink(missing_ok=True)  # an earlier audit's, of another source
    got = stream_pass(paths, sink, src.size, recipe=src.recipe, exact=engine.parity.exact, batch=batch_size,
                      workers=workers, p=p)
    sink.ready(True)
    engine.release()  # the session's memory arena, before the duplicate search's peak
    phases["read_and_features"] = time.perf_counter() - t0
    phases["model_conversion_wait"] = engine.waited
    phases["model"] = got.seconds["model"]
    ok = [int(i) for i in np.flatnonzero(got.ok)]
    if not ok:
        raise DataError(f"{d.root} holds no readable image to audit ({len(got.bad)} files do not decode)")
    feats = sink.finish()
    _release_freed_memory()
    rows = [{"path": r, "kind": "unreadable", "score": None, "group": None, "label": None, "suggested_label": None,
             "split": None, "detail": why} for r, why in d.unreadable]
    rows += [finding_row(d, i, "unreadable", None, detail=why) for i, why in got.bad.items()]
    from threadpoolctl import threadpool_limits

    # one after the other, every matrix product on one BLAS thread: label issues + outliers in a
    # second thread beside the duplicate search were slower on two shared cores (10k subset,
    # alternating runs: 12.7 and 12.8 s against 9.4 and 11.7 s one after the other, and more CPU;
    # both are partly Python and share the GIL)
    with threadpool_limits(1):
        t = time.perf_counter()
        groups, group_rows, near = find_duplicates(d, got, ok, feats["source"], settings["near_threshold"], p)
        phases["duplicates"] = time.perf_counter() - t
        _release_freed_memory()
        found, (score, z), side_phases = labels_and_outliers(d, src, feats, got.greys[ok], ok, settings, p)
    phases.update(side_phases)
    _release_freed_memory()
    rows += group_rows
    judged = {g["group"]: g for g in found.record.get("groups", [])}
    rows += [finding_row(d, ok[k], "label_issue", s, suggested=d.class_names[sug],
                         detail=f"judged by {judged[g]['source']}, out of sample ({judged[g]['what']})")
             for k, s, sug, g in found.issues]
    rows += [finding_row(d, ok[k], "outlier", float(score[k]), detail=f"robust z {z[k]:.1f}")
             for k in np.flatnonzero(z > Z_FLAG)]
    t = time.perf_counter()
    rows += [finding_row(d, i, kind, s, detail=det) for i, kind, s, det in quality_findings(got.quality[ok], ok)]
    phases["quality"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = _summary(d, src, settings, rows, groups, ok, time.perf_counter() - t0)
    summary["near_duplicate_search"] = near
    summary["feature_engine"] = {**engine.describe, "pixels": engine.parity.record}
    summary["label_issues"] = found.record
    summary["notes"] = list(src.notes) + list(found.notes)
    _write(out, d, hashes, summary, rows)
    phases["write"] = time.perf_counter() - t
    summary["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
    summary["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "audit.json", summary)
    p.say(f"audit: {len(paths)} images in {summary['seconds']:.0f} s -> {out} ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")")
    return AuditResult(out, summary, rows)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to tune
        return None


def _release_freed_memory() -> None:
    """Hand memory freed by the decoding threads and the duplicate search back to the system
    (glibc keeps it in per-thread arenas otherwise, and the next phase's peak adds to it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _return_large_blocks() -> None:
    """Serve every allocation from 1 MiB up with its own mapping, returned to the system when freed
    (glibc's default threshold grows to 32 MiB, and the duplicate search's many blocks of a few
    MiB then stay in the heap: measured on the 60k Fashion-MNIST fingerprints, the search's peak
    went from +321 to +244 MB; it costs some speed in the verification, measured 10-30 %)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed, no longer adjusted dynamically)


def _summary(d: AuditData, src: FeatureSource, settings: dict, rows: list[dict], groups: list[dict], ok: list[int],
             seconds: float) -> dict:
    """``audit.json``'s content; class balance and ``readable`` count the images that decoded (``ok``)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    balance = np.bincount(d.labels[ok], minlength=len(d.class_names))
    return {
        "version": AUDIT_VERSION, "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": str(d.root.resolve()), "images": len(d.rel) + len(d.unreadable), "readable": len(ok),
        "source": src.describe, "settings": settings, "counts": counts,
        "class_balance": {c: int(n) for c, n in zip(d.class_names, balance)},
        "groups": groups, "leaking_groups": sum(1 for g in groups if len(g["splits"]) > 1),
        "seconds": seconds,
    }


def _write(out: Path, d: AuditData, hashes: dict, summary: dict, rows: list[dict]) -> None:
    order = {k: i for i, k in enumerate(KINDS)}
    rows.sort(key=lambda r: (order.get(r["kind"], 99), -(r["score"] or 0.0) if r["kind"] != "label_issue" else 0,
                             r["group"] or 0))
    write_csv(out / "files.csv", ["path", "sha256"], sorted(hashes.items()))
    write_csv(out / "audit.csv", CSV_COLUMNS, [[r[c] for c in CSV_COLUMNS] for r in rows])
    write_json_atomic(out / "audit.json", summary)
    write_page(out, d.root, summary, rows)


def _read_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


__all__ = ["KINDS", "AuditResult", "audit_dir", "audit_folder"]
