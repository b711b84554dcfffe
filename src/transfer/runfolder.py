"""The run folder written by ``transfer train`` (layout: docs/design.md), known in one place.

* :class:`RunLayout` / :class:`TrialPaths`: where every file of a run lives (paths only).
* :class:`RunFolder`: the reader. Every command that takes ``RUN`` opens it with
  :class:`RunFolder`, which checks that the folder is a run and names exactly what is
  missing.
* :class:`RunWriter`: the writer of the files ``transfer train`` owns (``run.json``,
  ``config.yaml``, ``dataset.json``, splits, trial records, the sweep table, ``best.json``),
  each written atomically.

No TensorFlow here; loading a trial's model goes through :meth:`TrialInfo.load_model`
(imports Keras lazily).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import RunFolderError
from .fsutil import read_json, write_json_atomic, write_text_atomic
from .models.build import load_model
from .tables import dict_rows, markdown, write_csv

RUN_FORMAT = "transfer-run"
RUN_VERSION = 1
SPLITS = ("train", "val", "test")
#: columns of ``trials/<name>/history.csv``
HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")
BAD_FILES_FIELDS = ("path", "reason")


def _json_dict(path: Path) -> dict:
    """A JSON object file, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


@dataclass(frozen=True)
class TrialPaths:
    """The files of one trial folder ``RUN/trials/<name>/``."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    trial_json = property(lambda self: self.dir / "trial.json")
    status_json = property(lambda self: self.dir / "status.json")
    history_csv = property(lambda self: self.dir / "history.csv")
    curves_png = property(lambda self: self.dir / "curves.png")
    model_keras = property(lambda self: self.dir / "model.keras")
    metrics_json = property(lambda self: self.dir / "metrics.json")
    #: the commit point of the resume checkpoint (names the epoch whose files below to load)
    state_json = property(lambda self: self.dir / "state.json")
    tensorboard = property(lambda self: self.dir / "tensorboard")

    def weights_at(self, epoch: int) -> Path:
        """The model's weights after ``epoch`` (resume checkpoint; the best epoch's become ``model.keras``)."""
        return self.dir / f"epoch-{int(epoch):04d}.weights.npz"

    def optimizer_at(self, epoch: int) -> Path:
        """The optimizer state after ``epoch`` (resume checkpoint)."""
        return self.dir / f"epoch-{int(epoch):04d}.optimizer.npz"

    def checkpoints(self) -> list[Path]:
        """Every resume-checkpoint file (``last.*``: the single checkpoint of earlier versions)."""
        return sorted([*self.dir.glob("epoch-*.weights.npz"), *self.dir.glob("epoch-*.optimizer.npz"),
                       *self.dir.glob("last.keras"), *self.dir.glob("last.optimizer.npz")])

    def history(self) -> list[dict]:
        """Rows of ``history.csv`` (numbers as float, ``epoch`` as int, empty cells as None)."""
        if not self.history_csv.is_file():
            return []
        out = []
        with open(self.history_csv, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                out.append({k: None if v in ("", None) else int(v) if k == "epoch" else float(v)
                            for k, v in row.items()})
        return out

    def metrics(self) -> dict:
        """``metrics.json`` (raises OSError / ValueError when missing or unreadable)."""
        return read_json(self.metrics_json)

    def status(self) -> dict:
        """``status.json`` (``{}`` when missing or unreadable)."""
        return _json_dict(self.status_json)

    def finished(self, status: dict | None = None) -> bool:
        """Finished = ``status.json`` says done and ``model.keras`` and ``metrics.json`` exist."""
        st = self.status() if status is None else status
        return st.get("state") == "done" and self.model_keras.is_file() and self.metrics_json.is_file()


class RunLayout:
    """Where everything of a run folder lives (paths only, no I/O). See docs/design.md."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    run_json = property(lambda self: self.path / "run.json")
    config_yaml = property(lambda self: self.path / "config.yaml")
    dataset_json = property(lambda self: self.path / "dataset.json")
    bad_files_csv = property(lambda self: self.path / "bad_files.csv")
    splits_dir = property(lambda self: self.path / "splits")
    trials_dir = property(lambda self: self.path / "trials")
    init_dir = property(lambda self: self.path / "init")
    #: the frozen-prefix caches of the trainer (internal; safe to delete when no train runs)
    cache_dir = property(lambda self: self.path / "cache")
    #: the audit's converted models and Keras references, by content (analysis/audit_cache.py; safe to delete)
    audit_cache_dir = property(lambda self: self.cache_dir / "audit-onnx")
    sweep_csv = property(lambda self: self.path / "sweep.csv")
    sweep_md = property(lambda self: self.path / "sweep.md")
    best_json = property(lambda self: self.path / "best.json")
    #: the rung decisions of a ``--schedule halving`` sweep (written as each is made; read back on resume)
    rungs_json = property(lambda self: self.path / "rungs.json")
    #: ``transfer rank``: the candidate backbones, best first
    rank_json = property(lambda self: self.path / "rank.json")
    rank_md = property(lambda self: self.path / "rank.md")
    report_html = property(lambda self: self.path / "report.html")
    report_md = property(lambda self: self.path / "report.md")
    bundle_dir = property(lambda self: self.path / "bundle")
    resolution_dir = property(lambda self: self.path / "resolution")

    duplicates_csv = property(lambda self: self.path / "duplicates.csv")

    def leaked_paths(self, split: str) -> set[str]:
        """Paths of ``split`` that have a duplicate in another split (``duplicates.csv``; empty
        when the run has none or kept its duplicate groups on one side)."""
        if not self.duplicates_csv.is_file():
            return set()
        with open(self.duplicates_csv, newline="", encoding="utf-8") as f:
            return {r["path"] for r in csv.DictReader(f) if r.get("split") == split and r.get("straddles") == "yes"}

    def rungs(self) -> dict:
        """``rungs.json`` (``{}`` when the run has none: a full sweep, or no rung decided yet)."""
        return _json_dict(self.rungs_json)

    def rank(self) -> dict:
        """``rank.json`` (``{}`` when ``transfer rank`` was not run into this folder)."""
        return _json_dict(self.rank_json)

    def saved_dataset(self) -> dict:
        """``dataset.json`` as saved (``{}`` when there is none yet or it cannot be read)."""
        return _json_dict(self.dataset_json)

    def split_csv_path(self, name: str, *, fold: int | None = None) -> Path:
        """``splits/<name>.csv``; a k-fold trial's train / val are ``splits/fold{k}/<name>.csv``."""
        if name not in SPLITS:
            raise RunFolderError(f"unknown split {name!r}; accepted: {', '.join(SPLITS)}")
        return self.splits_dir / f"fold{fold}" / f"{name}.csv" if fold and name != "test" else self.splits_dir / f"{name}.csv"

    def init_weights(self, backbone: str, init: str) -> Path:
        """The initial weights every trial of ``backbone`` with ``init`` starts from."""
        return self.init_dir / f"{backbone}-{init}.weights.h5"

    def cache_group(self, backbone: str, init: str) -> Path:
        """The caches (and linear probes) of the trials of ``backbone`` that start from ``init``."""
        return self.cache_dir / f"{backbone}-{init}"

    def trial_paths(self, name: str) -> TrialPaths:
        return TrialPaths(self.trials_dir / name)

    # outputs of the analysis commands, one folder per trial
    def features_dir(self, trial: str) -> Path:
        return self.path / "features" / trial

    def heads_dir(self, trial: str) -> Path:
        return self.path / "heads" / trial

    def evaluate_dir(self, trial: str) -> Path:
        return self.path / "evaluate" / trial

    def plots_dir(self, trial: str) -> Path:
        return self.path / "plots" / trial

    def gradcam_dir(self, trial: str) -> Path:
        return self.path / "gradcam" / trial

    def analysis_trials(self, area: str) -> list[str]:
        """Trial names that have a folder under ``features|heads|evaluate|plots|gradcam`` (sorted)."""
        if area not in ("features", "heads", "evaluate", "plots", "gradcam"):
            raise ValueError(f"unknown analysis area {area!r}")
        d = self.path / area
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


@dataclass(frozen=True)
class TrialInfo:
    """One trial folder: its ``trial.json``, status and files."""

    name: str
    path: Path
    meta: dict
    status: dict

    @property
    def files(self) -> TrialPaths:
        return TrialPaths(self.path)

    @property
    def finished(self) -> bool:
        return self.files.finished(self.status)

    @property
    def model_path(self) -> Path:
        return self.files.model_keras

    @property
    def metrics(self) -> dict:
        p = self.files.metrics_json
        if not p.is_file():
            raise RunFolderError(
                f"trial '{self.name}' has no metrics.json in {self.path}",
                hint="the trial did not finish; re-run the same `transfer train` command to resume it",
            )
        return read_json(p)

    @property
    def fold(self) -> int | None:
        """The k-fold this trial trained on (its train / val splits are ``splits/fold{k}/``)."""
        f = self.meta.get("fold")
        return int(f) if f else None

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.meta["image_size"]
        return int(h), int(w)

    def require_finished(self) -> "TrialInfo":
        if not self.finished:
            missing = [p.name for p in (self.files.model_keras, self.files.metrics_json) if not p.is_file()]
            state = self.status.get("state", "unknown")
            what = f"missing {', '.join(missing)}" if missing else f"state '{state}'"
            raise RunFolderError(
                f"trial '{self.name}' is not finished ({what}) in {self.path}",
                hint="re-run the same `transfer train` command to finish it, or pick another trial",
            )
        return self

    def load_model(self):
        """Load the trial's best model (Keras; imports TensorFlow)."""
        self.require_finished()

        return load_model(self.model_path)


class RunFolder(RunLayout):
    """A run folder. Raises :class:`RunFolderError` naming what is missing.

    Example::

        run = RunFolder("runs/digits")
        trial = run.trial("best")
        model = trial.load_model()
    """

    REQUIRED = ("run.json", "config.yaml", "dataset.json", "splits")

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        if not self.path.exists():
            raise RunFolderError(
                f"run folder not found: {self.path}",
                hint="give the folder a `transfer train` run wrote",
            )
        if not self.path.is_dir():
            raise RunFolderError(f"not a run folder (not a directory): {self.path}")
        missing = [r for r in self.REQUIRED if not (self.path / r).exists()]
        if missing:
            raise RunFolderError(
                f"{self.path} is not a complete run folder: missing {', '.join(missing)}",
                hint="train into it with `transfer train` first (or re-run that command to finish an interrupted run)",
            )
        info = read_json(self.run_json)
        if info.get("format") != RUN_FORMAT:
            raise RunFolderError(f"{self.run_json} is not a transfer run (format={info.get('format')!r})")
        self.info = info

    # -- dataset -----------------------------------------------------------------
    @property
    def dataset(self) -> dict:
        return read_json(self.dataset_json)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset["class_names"])

    @property
    def recipe(self) -> dict | None:
        """The pixel recipe the run was trained with (``dataset.json``; None: not recorded)."""
        r = self.dataset.get("preprocessing")
        return dict(r) if isinstance(r, dict) else None

    @property
    def data_root(self) -> Path:
        return Path(self.dataset["root"])

    def config(self) -> dict[str, Any]:
        import yaml

        with open(self.config_yaml, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}

    def split_csv(self, name: str, *, fold: int | None = None) -> Path:
        """The CSV of a split; a k-fold trial's train / val are its fold's (``splits/fold{k}/``)."""
        p = self.split_csv_path(name, fold=fold)
        if not p.is_file():
            raise RunFolderError(f"split file missing: {p}", hint="the run folder is incomplete; re-run `transfer train`")
        return p

    def split(self, name: str, *, fold: int | None = None) -> list[tuple[str, int]]:
        """Samples of a split as (path relative to the data root, label)."""
        p = self.split_csv(name, fold=fold)
        with open(p, newline="", encoding="utf-8") as f:
            return [(row["path"], int(row["label"])) for row in csv.DictReader(f)]

    def split_paths(self, name: str, *, fold: int | None = None) -> tuple[list[Path], list[int]]:
        """Absolute paths and labels of a split."""
        rows = self.split(name, fold=fold)
        root = self.data_root
        return [root / p for p, _ in rows], [lab for _, lab in rows]

    # -- trials ------------------------------------------------------------------
    def trials(self) -> list[TrialInfo]:
        out = []
        if self.trials_dir.is_dir():
            for d in sorted(self.trials_dir.iterdir()):
                tp = TrialPaths(d)
                if not tp.trial_json.is_file():
                    continue
                out.append(TrialInfo(d.name, d, read_json(tp.trial_json), tp.status()))
        return out

    def finished_trials(self) -> list[TrialInfo]:
        return [t for t in self.trials() if t.finished]

    @property
    def best_trial_name(self) -> str:
        if self.best_json.is_file():
            return read_json(self.best_json)["trial"]
        done = self.finished_trials()
        if not done:
            raise RunFolderError(
                f"{self.path} has no finished trial",
                hint="re-run the same `transfer train` command to finish the sweep",
            )
        return max(done, key=lambda t: t.metrics.get("val", {}).get("accuracy", 0.0)).name

    def trial(self, name: str = "best") -> TrialInfo:
        """A finished trial by name, or ``"best"``."""
        if name == "best":
            name = self.best_trial_name
        for t in self.trials():
            if t.name == name:
                return t.require_finished()
        names = [t.name for t in self.trials()]
        raise RunFolderError(
            f"no trial named {name!r} in {self.path}",
            hint=f"available: {', '.join(names) if names else '(none)'}; or use 'best'",
        )

    def select(self, which: str = "best") -> list[TrialInfo]:
        """``best`` | ``all`` (every finished trial) | a trial name | comma-separated names."""
        if which == "all":
            done = self.finished_trials()
            if not done:
                raise RunFolderError(f"{self.path} has no finished trial")
            return done
        return [self.trial(n.strip()) for n in which.split(",") if n.strip()]


class RunWriter(RunLayout):
    """Writes the files of a run folder that ``transfer train`` owns, each atomically.

    The reader is :class:`RunFolder`; both take their paths from :class:`RunLayout`, so the
    layout is spelled once. Analysis commands write their own folders (``features/``,
    ``heads/``, ...) at the paths :class:`RunLayout` gives them.
    """

    def check_target(self) -> None:
        """Refuse to write a run into a folder that holds something else.

        A new or empty folder, or a run folder (``run.json`` of this format), is fine; so is a
        folder holding only ``splits/`` (split files placed ahead of training, as the
        train-and-test-at-each-size resolution study does) and hidden files. Anything else
        could be overwritten (``best.json``, ``sweep.csv`` ...), so it is refused.

        Raises:
            RunFolderError: the folder is a file, another format's run, or holds other files.
        """
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunFolderError(f"the run folder {self.path} is a file", option="out")
        if self.run_json.is_file():
            info = _json_dict(self.run_json)
            if info.get("format") != RUN_FORMAT:
                raise RunFolderError(f"{self.path} holds a run.json that is not a transfer run "
                                     f"(format={info.get('format')!r})", hint="give a new or empty folder",
                                     option="out")
            return
        other = sorted(e.name + ("/" if e.is_dir() else "") for e in self.path.iterdir()
                       if not e.name.startswith(".") and e.name != self.splits_dir.name)
        if other:
            shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
            raise RunFolderError(
                f"{self.path} is not empty and is not a run folder (it holds {shown}); a run written there "
                "could overwrite those files",
                hint="give a new or empty folder, or the folder of an earlier run to resume it", option="out")

    def write_run_json(self, transfer_version: str) -> None:
        """``run.json`` once, when the run is made (its ``created`` time is kept on resume)."""
        if self.run_json.is_file():
            return
        from datetime import datetime, timezone

        write_json_atomic(self.run_json, {
            "format": RUN_FORMAT, "version": RUN_VERSION,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "transfer_version": transfer_version,
        })

    def write_config(self, yaml_text: str) -> None:
        write_text_atomic(self.config_yaml, yaml_text)

    def write_dataset(self, info: dict) -> None:
        write_json_atomic(self.dataset_json, info)

    # -- bad files ------------------------------------------------------------
    def write_bad_files(self, bad: Iterable) -> None:
        """``bad_files.csv`` from items with ``path`` and ``reason`` (the indexer's list)."""
        write_csv(self.bad_files_csv, BAD_FILES_FIELDS, [[b.path, b.reason] for b in bad])

    def merge_bad_files(self, found: dict[str, str]) -> int:
        """Add ``{path: reason}`` rows that ``bad_files.csv`` does not list yet; returns how many were new."""
        rows: dict[str, str] = {}
        if self.bad_files_csv.is_file():
            with open(self.bad_files_csv, newline="", encoding="utf-8") as f:
                rows = {r["path"]: r.get("reason", "") for r in csv.DictReader(f)}
        new = {p: r for p, r in found.items() if p not in rows}
        if new:
            write_csv(self.bad_files_csv, BAD_FILES_FIELDS, [[p, r] for p, r in {**rows, **new}.items()])
        return len(new)

    # -- one trial --------------------------------------------------------------
    def write_trial_meta(self, name: str, meta: dict) -> None:
        write_json_atomic(self.trial_paths(name).trial_json, meta)

    def write_status(self, name: str, state: str, epoch: int, error: str | None = None) -> None:
        write_json_atomic(self.trial_paths(name).status_json, {"state": state, "epoch": int(epoch), "error": error})

    def write_history(self, name: str, rows: Sequence[dict]) -> None:
        write_csv(self.trial_paths(name).history_csv, HISTORY_FIELDS, dict_rows(rows, HISTORY_FIELDS))

    def write_metrics(self, name: str, metrics: dict) -> None:
        write_json_atomic(self.trial_paths(name).metrics_json, metrics)

    def mark_failed(self, name: str, error: str) -> None:
        """``status.json`` = failed, at the last committed epoch of the resume state."""
        epoch = _json_dict(self.trial_paths(name).state_json).get("epoch", 0)
        self.write_status(name, "failed", int(epoch) if isinstance(epoch, int) else 0, error)

    def remove_leftovers(self, name: str) -> None:
        """Temporary files of a write a kill cut short (never read: every write is atomic)."""
        for leftover in self.trial_paths(name).dir.glob(".*.tmp*"):
            leftover.unlink(missing_ok=True)

    def remove_resume_checkpoint(self, name: str) -> None:
        """The resume checkpoint is internal; a finished trial drops it."""
        for path in self.trial_paths(name).checkpoints():
            path.unlink(missing_ok=True)

    # -- the sweep ----------------------------------------------------------------
    def write_sweep_table(self, header: Sequence[str], rows: Sequence[Sequence]) -> str:
        """``sweep.csv`` and ``sweep.md``; returns the Markdown."""
        md = markdown(header, rows)
        write_csv(self.sweep_csv, header, rows)
        write_text_atomic(self.sweep_md, md)
        return md

    def write_best(self, best: dict) -> None:
        write_json_atomic(self.best_json, best)

    def write_rungs(self, record: dict) -> None:
        """``rungs.json``: ``{"schedule": "halving", "rate", "rungs": [epochs], "order": [trial groups],
        "signals": {backbone: {...}}, "decisions": [{"rung", "epoch", "standings", "promoted", "stopped"}]}``."""
        write_json_atomic(self.rungs_json, record)

    def write_rank(self, backbones: list[dict], header: Sequence[str], rows: Sequence[Sequence], *,
                   seconds: float) -> str:
        """``rank.json`` (``{"backbones": [best first], "seconds"}``) and ``rank.md``; returns the Markdown."""
        write_json_atomic(self.rank_json, {"backbones": backbones, "seconds": seconds, "score": "LogME"})
        md = markdown(header, rows)
        write_text_atomic(self.rank_md, md)
        return md
