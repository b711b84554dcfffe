"""Read-only view of a run folder written by ``transfer train`` (layout: docs/design.md).

Every command that takes ``RUN`` opens it with :class:`RunFolder`, which checks that
the folder is a run and names exactly what is missing. No TensorFlow here; loading a
trial's model goes through :meth:`TrialInfo.load_model` (imports Keras lazily).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunFolderError
from .fsutil import read_json

RUN_FORMAT = "transfer-run"


@dataclass(frozen=True)
class TrialInfo:
    """One trial folder: its ``trial.json``, status and files."""

    name: str
    path: Path
    meta: dict
    status: dict

    @property
    def finished(self) -> bool:
        return (
            self.status.get("state") == "done"
            and (self.path / "model.keras").is_file()
            and (self.path / "metrics.json").is_file()
        )

    @property
    def model_path(self) -> Path:
        return self.path / "model.keras"

    @property
    def metrics(self) -> dict:
        p = self.path / "metrics.json"
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
            missing = [f for f in ("model.keras", "metrics.json") if not (self.path / f).is_file()]
            state = self.status.get("state", "unknown")
            what = f"missing {', '.join(missing)}" if missing else f"state '{state}'"
            raise RunFolderError(
                f"trial '{self.name}' is not finished ({what}) in {self.path}",
                hint="re-run the same `transfer train` command to finish it, or pick another --trial",
            )
        return self

    def load_model(self):
        """Load the trial's best model (Keras; imports TensorFlow)."""
        self.require_finished()
        from .models.build import load_model

        return load_model(self.model_path)


class RunFolder:
    """A run folder. Raises :class:`RunFolderError` naming what is missing.

    Example:
        >>> run = RunFolder("runs/digits")          # doctest: +SKIP
        >>> trial = run.trial("best")               # doctest: +SKIP
        >>> model = trial.load_model()              # doctest: +SKIP
    """

    REQUIRED = ("run.json", "config.yaml", "dataset.json", "splits")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise RunFolderError(
                f"run folder not found: {self.path}",
                hint="give the --out folder of a `transfer train` run",
            )
        if not self.path.is_dir():
            raise RunFolderError(f"not a run folder (not a directory): {self.path}")
        missing = [r for r in self.REQUIRED if not (self.path / r).exists()]
        if missing:
            raise RunFolderError(
                f"{self.path} is not a complete run folder: missing {', '.join(missing)}",
                hint="run `transfer train DATA --out RUN` first (or re-run it to finish an interrupted run)",
            )
        info = read_json(self.path / "run.json")
        if info.get("format") != RUN_FORMAT:
            raise RunFolderError(f"{self.path / 'run.json'} is not a transfer run (format={info.get('format')!r})")
        self.info = info

    # -- dataset -----------------------------------------------------------------
    @property
    def dataset(self) -> dict:
        return read_json(self.path / "dataset.json")

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset["class_names"])

    @property
    def data_root(self) -> Path:
        return Path(self.dataset["root"])

    def config(self) -> dict[str, Any]:
        import yaml

        with open(self.path / "config.yaml", encoding="utf-8") as f:
            return yaml.safe_load(f) or {}

    def split_csv(self, name: str, *, fold: int | None = None) -> Path:
        """The CSV of a split; a k-fold trial's train / val are its fold's (``splits/fold{k}/``)."""
        if name not in ("train", "val", "test"):
            raise RunFolderError(f"unknown split {name!r}; accepted: train, val, test")
        base = self.path / "splits"
        p = base / f"fold{fold}" / f"{name}.csv" if fold and name != "test" else base / f"{name}.csv"
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
        tdir = self.path / "trials"
        out = []
        if tdir.is_dir():
            for d in sorted(tdir.iterdir()):
                if not (d / "trial.json").is_file():
                    continue
                status = read_json(d / "status.json") if (d / "status.json").is_file() else {}
                out.append(TrialInfo(d.name, d, read_json(d / "trial.json"), status))
        return out

    def finished_trials(self) -> list[TrialInfo]:
        return [t for t in self.trials() if t.finished]

    @property
    def best_trial_name(self) -> str:
        p = self.path / "best.json"
        if p.is_file():
            return read_json(p)["trial"]
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
