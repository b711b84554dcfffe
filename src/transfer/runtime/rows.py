"""Prediction rows and where they go: one row builder and one sink interface for every way
``transfer infer`` runs (in this process, or on Ray Data workers).

A :class:`Row` is one input file: its path and either its top-k classes and probabilities
or the error that kept it from being predicted. :func:`prediction_rows` builds the rows of
one batch; :func:`open_sinks` opens the writers (CSV, JSON lines, Parquet, or standard
output). File sinks write to a hidden partial file next to the output and rename it when
the run finishes; an interrupted run keeps its rows as ``OUT.incomplete``.

File names that are not valid UTF-8 (``os.fsdecode`` gives them lone surrogates) keep
their exact bytes: CSV files hold the original bytes, JSON lines and Parquet add
``path_b64`` (the name's bytes in base64) beside a readable ``path``, and standard output
shows ``\\xff`` escapes.

Example::

    sinks = open_sinks(Path("preds.csv"), "csv", topk=2)
    for row in prediction_rows(entries, predictor.predict(pixels), class_names, 2):
        sinks.write(row)
    sinks.close(ok=True)          # .preds.csv.partial -> preds.csv
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import OutputError

#: output formats of the row files (the Parquet copy is an extra of Ray runs)
FORMATS = ("csv", "jsonl")


@dataclass(frozen=True)
class Row:
    """One input file's result: ``classes`` / ``probs`` best first, or ``error``; with an
    unknown-input rule, its ``score`` and whether the image looks ``known``."""

    path: str
    classes: tuple[str, ...] = ()
    probs: tuple[float, ...] = ()
    error: str | None = None
    score: float | None = None
    known: bool | None = None

    @property
    def status(self) -> str:
        """``error``, ``unknown`` (rejected by the unknown-input rule) or ``ok``."""
        if self.error:
            return "error"
        return "unknown" if self.known is False else "ok"


@dataclass(frozen=True)
class RejectRule:
    """The unknown-input rule rows were judged by, recorded in every row: the score's name and
    its threshold (an image scoring below it is ``unknown``)."""

    score: str
    threshold: float


def top_k(p: np.ndarray, names: Sequence[str], k: int) -> tuple[list[str], list[float]]:
    """The ``k`` most probable class names of one row and their probabilities, best first.

    Example::

        top_k(np.array([0.1, 0.7, 0.2]), ["a", "b", "c"], 2)   # (['b', 'c'], [0.7, 0.2])
    """
    order = np.argsort(-p)[:k]
    return [names[i] for i in order], [float(p[i]) for i in order]


def prediction_rows(entries: Sequence[tuple[str, str | None]], prediction, names: Sequence[str],
                    topk: int) -> list[Row]:
    """The rows of one batch: ``entries`` are ``(path, error or None)`` in input order and
    ``prediction`` (a :class:`transfer.runtime.predictor.Prediction`) holds one row per entry
    without error, in the same order, with each image's unknown-input score and decision when a
    rule is on."""
    rows, j = [], 0
    for path, error in entries:
        if error is not None:
            rows.append(Row(path, error=error))
            continue
        classes, top = top_k(prediction.probs[j], names, topk)
        extra = {} if prediction.known is None else {"score": float(prediction.scores[j]),
                                                     "known": bool(prediction.known[j])}
        rows.append(Row(path, tuple(classes), tuple(top), **extra))
        j += 1
    return rows


# ---- rows between processes (Ray workers -> driver) ------------------------------------

def rows_to_columns(rows: Sequence[Row]) -> dict[str, list]:
    """Rows as columns a Ray batch carries: the path as its file-system bytes (any name
    survives Arrow), classes and probabilities as JSON (any character in a class name survives)."""
    return {"path": [os.fsencode(r.path) for r in rows],
            "error": [r.error or "" for r in rows],
            "classes": [json.dumps(list(r.classes)) for r in rows],
            "probs": [json.dumps(list(r.probs)) for r in rows],
            "unknown": [json.dumps([r.score, r.known]) for r in rows]}


def rows_from_columns(batch: dict) -> list[Row]:
    """The inverse of :func:`rows_to_columns` (floats survive JSON exactly)."""
    out = []
    unknown = batch.get("unknown", [json.dumps([None, None])] * len(batch["path"]))
    for p, err, cls, pr, unk in zip(batch["path"], batch["error"], batch["classes"], batch["probs"], unknown):
        err = str(err) or None
        score, known = json.loads(str(unk))
        out.append(Row(_path_str(p), () if err else tuple(json.loads(str(cls))),
                       () if err else tuple(json.loads(str(pr))), err, score, known))
    return out


def _path_str(p) -> str:
    return os.fsdecode(bytes(p)) if isinstance(p, (bytes, bytearray, np.bytes_)) else str(p)


# ---- sinks -------------------------------------------------------------------------------

def printable(path: str) -> str:
    """A path for a text stream: undecodable bytes of a file name as ``\\xff`` escapes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_b64(path: str) -> str | None:
    """The file-name bytes in base64 when the name is not valid UTF-8, else ``None``."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return base64.b64encode(os.fsencode(path)).decode("ascii")


class Sink:
    """Where rows go: ``write(row)`` for each file, then ``close(ok)`` once."""

    path: Path | None = None

    def write(self, row: Row) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, ok: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _PartialFile:
    """``PATH`` written as ``.PATH.partial`` and renamed when done (``PATH.incomplete`` when not)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        if self.path.is_dir():
            raise OutputError(f"output {self.path} is a folder that already exists under the output's name",
                              hint="remove it or choose another output", option="out")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot_write(self.path, exc) from None

    def finish(self, ok: bool) -> None:
        final = self.path if ok else self.path.with_name(self.path.name + ".incomplete")
        try:  # incomplete: keep what was predicted so far, under a name that says so
            os.replace(self.tmp, final)
        except OSError as exc:
            raise OutputError(f"cannot move the finished rows to {final}: {exc.strerror or exc}",
                              hint=f"the rows are in {self.tmp}") from None


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputError(f"cannot write {path}: {exc.strerror or exc}{where}", hint="choose a folder you can write to",
                       option="out")


class _TextSink(Sink):
    """CSV or JSON lines, to a file (exact name bytes) or to standard output (escaped names)."""

    def __init__(self, path: Path | None, topk: int, reject: RejectRule | None = None):
        self.topk = topk
        self.reject = reject
        self.partial = _PartialFile(path) if path is not None else None
        self.path = path
        if self.partial is None:
            self.fh = sys.stdout
        else:
            try:
                self.fh = open(self.partial.tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
            except OSError as exc:
                raise _cannot_write(self.partial.path, exc) from None
        self.start()

    def start(self) -> None:
        """Write the header, if the format has one."""

    def name_of(self, row: Row) -> str:
        return row.path if self.partial is not None else printable(row.path)

    def close(self, ok: bool) -> None:
        if self.partial is None:
            self.fh.flush()
            return
        self.fh.close()
        self.partial.finish(ok)


class CsvSink(_TextSink):
    """``path,status,class1,prob1,...,error`` (probabilities with 6 decimals); with an
    unknown-input rule also ``unknown_score,score,threshold`` (status ``unknown`` when rejected)."""

    def start(self) -> None:
        self.csv = csv.writer(self.fh)
        head = ["path", "status"]
        for k in range(1, self.topk + 1):
            head += [f"class{k}", f"prob{k}"]
        self.csv.writerow(head + ["error"] + (["unknown_score", "score", "threshold"] if self.reject else []))

    def write(self, row: Row) -> None:
        r = [self.name_of(row), row.status]
        for k in range(self.topk):
            r += [row.classes[k], f"{row.probs[k]:.6f}"] if k < len(row.classes) else ["", ""]
        r.append(row.error or "")
        if self.reject:
            r += [self.reject.score, "" if row.score is None else f"{row.score:.6g}", f"{self.reject.threshold:.6g}"]
        self.csv.writerow(r)


class JsonlSink(_TextSink):
    """One JSON object a line: ``{"path", "status", "top": [{"class", "prob"}...]}`` or ``"error"``."""

    def write(self, row: Row) -> None:
        d: dict = {"path": self.name_of(row), "status": row.status}
        raw = path_b64(row.path) if self.partial is not None else None
        if raw is not None:
            d["path_b64"] = raw
        if row.error:
            d["error"] = row.error
        else:
            d["top"] = [{"class": c, "prob": round(float(p), 6)} for c, p in zip(row.classes, row.probs)]
        if self.reject:
            d["unknown"] = {"score": self.reject.score, "value": row.score, "threshold": self.reject.threshold}
        self.fh.write(json.dumps(d) + "\n")


class ParquetSink(Sink):
    """Rows -> Parquet in chunks (pyarrow comes with ``transfer[distributed]``): columns path,
    status, error, class1, prob1, ..., path_b64 (null unless the name is not valid UTF-8)."""

    def __init__(self, path: Path, topk: int, chunk: int = 4096, reject: RejectRule | None = None):
        import pyarrow as pa

        self.partial = _PartialFile(path)
        self.path, self.topk, self.chunk, self.rows, self.writer = path, topk, chunk, [], None
        self.reject = reject
        fields = [("path", pa.string()), ("status", pa.string()), ("error", pa.string())]
        for k in range(1, topk + 1):
            fields += [(f"class{k}", pa.string()), (f"prob{k}", pa.float64())]
        if reject:
            fields += [("unknown_score", pa.string()), ("score", pa.float64()), ("threshold", pa.float64())]
        self.schema = pa.schema(fields + [("path_b64", pa.string())])

    def write(self, row: Row) -> None:
        r = {"path": printable(row.path), "status": row.status, "error": row.error or "",
             "path_b64": path_b64(row.path)}
        for k in range(self.topk):
            r[f"class{k + 1}"] = row.classes[k] if k < len(row.classes) else None
            r[f"prob{k + 1}"] = row.probs[k] if k < len(row.probs) else None
        if self.reject:
            r.update(unknown_score=self.reject.score, score=row.score, threshold=self.reject.threshold)
        self.rows.append(r)
        if len(self.rows) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.partial.tmp), self.schema)
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows = []

    def close(self, ok: bool) -> None:
        self._flush()
        self.writer.close()
        self.partial.finish(ok)


class Sinks(Sink):
    """Several sinks written together (the rows file and, on Ray, its Parquet copy)."""

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)
        self.path = self.sinks[0].path if self.sinks else None

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.sinks if s.path is not None]

    def write(self, row: Row) -> None:
        for s in self.sinks:
            s.write(row)

    def close(self, ok: bool) -> None:
        for s in self.sinks:
            s.close(ok)


def parquet_path(out: Path) -> Path:
    """The Parquet copy of the rows file ``out`` (same name, ``.parquet``)."""
    return Path(out).with_suffix(".parquet")


def open_sinks(out: Path | None, fmt: str, topk: int, *, parquet: bool = False,
               reject: RejectRule | None = None) -> Sinks:
    """The sinks of a run: ``out`` as CSV / JSON lines (``None``: standard output), plus a
    Parquet copy next to it with ``parquet`` (when pyarrow is installed); ``reject`` adds the
    unknown-input rule's columns.

    Raises:
        OutputError: the output cannot be created (permissions, a folder in the way).
    """
    extra: list[Sink] = []
    if parquet and out is not None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            pass
        else:  # before the rows file: it opens no file until its first rows, so nothing is left on error
            extra.append(ParquetSink(parquet_path(out), topk, reject=reject))
    return Sinks([(CsvSink if fmt == "csv" else JsonlSink)(out, topk, reject), *extra])


__all__ = ["Row", "RejectRule", "top_k", "prediction_rows", "rows_to_columns", "rows_from_columns", "Sink", "CsvSink",
           "JsonlSink", "ParquetSink", "Sinks", "open_sinks", "parquet_path", "printable", "path_b64", "FORMATS"]
