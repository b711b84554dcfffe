"""Preparing a sweep's run folder before its trials train: check the options, index the data
folder, make (or read back) the splits with their duplicate groups, and write ``run.json``,
``config.yaml``, ``dataset.json``, ``bad_files.csv`` and ``duplicates.csv`` (layout:
docs/design.md). A resumed run reads its splits back and must see the same classes and the
options that change results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .._lazy import require
from ..data import splits as S
from ..data.dedupe import grouped_split, sample_groups
from ..data.folder import index_folder
from ..data.image import PREPROCESSING
from ..errors import ConfigError, DataError, TransferError
from ..progress import Progress, ProgressLike, as_progress, clock
from ..runfolder import RunWriter
from ..tables import write_csv
from .config import PREPARED_KEYS, RESULT_KEYS, TrainConfig, config_from_yaml_text
from .plan import TrialData, TrialSpec, duplicate_random_trials, plan_trials


@dataclass
class PreparedRun:
    """A run folder ready for its trials: the dataset's classes and the split of each trial."""

    writer: RunWriter
    data_root: Path
    class_names: list[str]
    method: str
    parts: dict[str, list]
    folds: list[tuple[list, list]]

    def siblings(self, spec: TrialSpec, specs: list[TrialSpec]) -> tuple[float, ...]:
        """Trainable fractions of the trials sharing ``spec``'s backbone, initial weights and fold
        (their frozen-prefix caches are built in one pass)."""
        return tuple(s.trainable for s in specs
                     if (s.backbone, s.init, s.weights, s.fold) == (spec.backbone, spec.init, spec.weights, spec.fold))

    def trial_data(self, spec: TrialSpec) -> TrialData:
        """The images of a trial: train, val and test (its fold's train / val with ``--kfold``)."""
        if spec.fold:
            tr, va = self.folds[spec.fold - 1]
        else:
            tr, va = self.parts["train"], self.parts["val"]
        return TrialData.of(self.data_root, self.class_names, tr, va, self.parts["test"])


def check_options(config: TrainConfig) -> tuple[Path, Path]:
    """(data root, run folder) after the checks that need no work."""
    if not config.data:
        raise ConfigError("no dataset folder given", hint="give the image folder to train on", option="data")
    if not config.out:
        raise ConfigError("no run folder given", hint="give the folder the run is written to", option="out")
    data_root = Path(config.data).resolve()
    run_dir = Path(config.out)
    o = run_dir.resolve()
    if o == data_root or data_root in o.parents:  # the run's folders would be indexed as classes next time
        raise ConfigError(f"the run folder {run_dir} is inside the data folder {config.data}",
                          hint="put the run folder outside the dataset, e.g. runs/NAME", option="out")
    for backbone in config.backbones:
        weights = config.weights_for(backbone)
        if weights not in ("imagenet", "none") and not Path(weights).is_file():
            raise ConfigError(f"initial weights {weights}{f' of {backbone}' if weights != config.weights else ''}: "
                              "no such file", hint="give a Keras weights/model file, or imagenet / none",
                              option="weights")
    if config.tensorboard:  # a missing package fails here, not inside every trial
        require("tensorboard", purpose="TensorBoard logs")
    return data_root, run_dir


def _has_trials(writer: RunWriter) -> bool:
    """Whether any trial of the run has started (its ``trial.json`` is written when it opens)."""
    return writer.trials_dir.is_dir() and any(writer.trial_paths(d.name).trial_json.is_file()
                                              for d in writer.trials_dir.iterdir())


def _check_existing(writer: RunWriter, cfg: TrainConfig, *, trains: bool = True) -> None:
    """A run folder that exists must have been made with the options that change results; before
    any trial has started (a folder ``transfer rank`` prepared), or for a command that trains
    nothing, only with the same split and initial weights (:data:`~transfer.trainer.config.PREPARED_KEYS`)."""
    if not writer.config_yaml.is_file():
        return
    try:
        old = config_from_yaml_text(writer.config_yaml.read_text(encoding="utf-8"))
    except TransferError as exc:
        raise ConfigError(f"the run folder {writer.path} holds an unreadable config.yaml: {exc.message}",
                          hint="use a new run folder", option="out") from exc
    diff = cfg.result_diff(old, RESULT_KEYS if trains and _has_trials(writer) else PREPARED_KEYS)
    if diff:
        od, nd = old.to_dict(), cfg.to_dict()
        detail = "; ".join(f"{k}: {od.get(k)!r} -> {nd.get(k)!r}" for k in diff)
        raise ConfigError(
            f"{writer.path} already holds a run with a different configuration ({detail})",
            hint="re-run with the same options to resume it, or give a new run folder",
        )


def _check_same_classes(writer: RunWriter, data_root: Path, names: list[str]) -> None:
    """A resumed run must see the classes it was made with: the split files, trained models
    and label indices all refer to them (a renamed or added class folder would silently
    relabel every prediction)."""
    old = list(writer.saved_dataset().get("class_names") or [])
    if old and old != list(names):
        gone, new = [c for c in old if c not in names], [c for c in names if c not in old]
        what = "; ".join(x for x in (f"gone: {', '.join(gone)}" if gone else "",
                                     f"new: {', '.join(new)}" if new else "") if x) or "same names, other order"
        raise DataError(f"the classes of {data_root} changed since {writer.path} was made ({what})",
                        hint="restore the class folders as they were to resume, or train into a new run folder")


def _index(config: TrainConfig, writer: RunWriter, data_root: Path, p: Progress):
    """Index the data folder; an unusable one is refused (its bad files still listed)."""
    index = index_folder(data_root, workers=config.workers, strict=False, allow_nested=config.allow_nested,
                         allow_case_clash=config.allow_case_clash)
    if index.problems:  # unusable as is: keep the list of bad files where the user will look
        if index.bad:
            writer.write_bad_files(index.bad)
        more = f" (and {len(index.problems) - 1} more problem(s))" if len(index.problems) > 1 else ""
        raise DataError(index.problems[0] + more,
                        hint=(f"every bad file is listed in {writer.bad_files_csv}; " if index.bad else "")
                        + f"`transfer data check {config.data}` shows the whole dataset")
    _check_same_classes(writer, data_root, index.class_names)
    for w in index.warnings:
        p.say(f"warning: {w}")
    if index.ignored:
        ex = ", ".join(b.path for b in index.ignored[:3]) + (" ..." if len(index.ignored) > 3 else "")
        p.say(f"note: {len(index.ignored)} file(s) in {data_root} are not used ({ex}); "
              f"`transfer data check {config.data}` says why")
    if index.bad:
        p.say(f"warning: {len(index.bad)} file(s) in {data_root} cannot be read and are skipped; "
              f"see {writer.bad_files_csv}")
    if not writer.bad_files_csv.is_file():
        writer.write_bad_files(index.bad)
    return index


def _given_splits(writer: RunWriter, cfg: TrainConfig, index, groups) -> tuple[dict[str, list], bool]:
    """The folder's own train/ val/ test/ (val carved from train/ when there is no val/); (parts, carved).

    With ``groups`` (``--dedupe``) val is carved group-wise and the val / test members of a group
    that has members in an earlier split (train, then val) are left out: the folders cannot be
    re-split, so a copy of a training image is not validated or tested on."""
    if cfg.kfold:
        raise ConfigError(
            f"{cfg.kfold}-fold cross-validation needs one pool of images to fold, but {cfg.data} already has "
            f"its own train/ val/ test/ folders",
            hint="train without k folds to use the given split, or point at a folder of class folders",
            option="kfold")
    parts = {k: list(index.given_splits.get(k, [])) for k in ("train", "val", "test")}
    carve = not parts["val"] and cfg.val > 0 and len(parts["train"]) > 1
    if all(writer.split_csv_path(k).is_file() for k in ("train", "val", "test")):
        return {k: S.read_split_csv(writer.split_csv_path(k)) for k in ("train", "val", "test")}, carve
    if carve:  # the usual published layout (train/ + test/): validation images come out of train/
        def carve_val(samples):
            return S.split_samples(samples, method=cfg.split, val=cfg.val, test=0.0, seed=cfg.seed)

        carved = _grouped(parts["train"], groups, carve_val) if groups is not None else carve_val(parts["train"])
        parts["train"], parts["val"] = carved["train"], carved["val"]
    if groups is not None:
        parts = _leave_out_copies(parts, groups)
    for k, v in parts.items():
        S.write_split_csv(writer.split_csv_path(k), v)
    return parts, carve


def _grouped(samples: list, groups: list[list[str]] | None, split) -> dict[str, list]:
    """``split(samples)`` with every duplicate group (paths) on one side (:func:`~transfer.data.dedupe.grouped_split`)."""
    at = {s.path: i for i, s in enumerate(samples)}
    idx = [[at[p] for p in g if p in at] for g in (groups or [])]
    return grouped_split(samples, [g for g in idx if len(g) > 1], split)


def _splits_of(group: list[str], where: dict[str, str]) -> list[str]:
    """The splits a duplicate group has members in, in train / val / test order."""
    present = {where.get(q) for q in group}
    return [k for k in ("train", "val", "test") if k in present]


def _leave_out_copies(parts: dict[str, list], groups: list[list[str]]) -> dict[str, list]:
    """Drop the val / test members of groups that have a member in an earlier split."""
    where = {s.path: k for k, v in parts.items() for s in v}
    drop = set()
    for g in groups:
        later = _splits_of(g, where)[1:]
        drop.update(q for q in g if where.get(q) in later)
    return {k: [s for s in v if s.path not in drop] for k, v in parts.items()}


def _kfold_splits(writer: RunWriter, cfg: TrainConfig, index, groups) -> tuple[dict, list]:
    folds_range = range(1, cfg.kfold + 1)
    test_csv = writer.split_csv_path("test")
    if test_csv.is_file() and all(writer.split_csv_path("val", fold=k).is_file() for k in folds_range):
        test = S.read_split_csv(test_csv)
        folds = [(S.read_split_csv(writer.split_csv_path("train", fold=k)),
                  S.read_split_csv(writer.split_csv_path("val", fold=k))) for k in folds_range]
    else:
        def kfold(samples):  # as named parts, so that duplicate groups can follow their representative
            test, folds = S.kfold_splits(samples, cfg.kfold, seed=cfg.seed, test=cfg.test)
            return {"test": test, **{f"{n}{k}": part for k, pair in enumerate(folds, 1)
                                     for n, part in zip(("train", "val"), pair)}}

        named = _grouped(index.samples, groups, kfold) if groups is not None else kfold(index.samples)
        test = named["test"]
        folds = [(named[f"train{k}"], named[f"val{k}"]) for k in folds_range]
        for k, (tr, va) in zip(folds_range, folds):
            S.write_split_csv(writer.split_csv_path("train", fold=k), tr)
            S.write_split_csv(writer.split_csv_path("val", fold=k), va)
        S.write_split_csv(test_csv, test)
    # train/val csv of fold 1 so that readers that know no folds find a split
    if not writer.split_csv_path("train").is_file():
        S.write_split_csv(writer.split_csv_path("train"), folds[0][0])
        S.write_split_csv(writer.split_csv_path("val"), folds[0][1])
    return {"train": folds[0][0], "val": folds[0][1], "test": test}, folds


def _prepare_splits(writer: RunWriter, cfg: TrainConfig, index, groups=None) -> tuple[str, dict, list]:
    """Returns (method, {"train","val","test"}, folds [(train, val)] or []); method "given+val" when the
    validation images were carved from the given train/. ``groups`` (duplicate groups of paths,
    with ``--dedupe``) stay on one side."""
    if getattr(index, "given_splits", None):
        parts, carved = _given_splits(writer, cfg, index, groups)
        return ("given+val" if carved else "given"), parts, []
    if cfg.kfold:
        return ("kfold", *_kfold_splits(writer, cfg, index, groups))
    if all(writer.split_csv_path(k).is_file() for k in ("train", "val", "test")):
        parts = {k: S.read_split_csv(writer.split_csv_path(k)) for k in ("train", "val", "test")}
    else:
        def split(samples):
            return S.split_samples(samples, method=cfg.split, val=cfg.val, test=cfg.test, seed=cfg.seed)

        parts = _grouped(index.samples, groups, split) if groups is not None else split(index.samples)
        for k in ("train", "val", "test"):
            S.write_split_csv(writer.split_csv_path(k), parts[k])
    return cfg.split, parts, []


def _write_run_files(writer: RunWriter, config: TrainConfig, index, data_root: Path, method: str, parts,
                     duplicates: dict | None, *, trains: bool = True) -> None:
    """``config.yaml`` and ``dataset.json``; a resumed run keeps the pixel recipe and duplicate
    record its first trials were made with. A command that trains nothing writes ``config.yaml``
    only into a folder that has none (a sweep's own stays)."""
    saved = writer.saved_dataset()
    split = {"method": "given" if method == "given+val" else method,
             # the fractions the split used (a given split and k folds ignore the val fraction / method)
             "val": config.val if method in ("stratified", "random", "given+val") else None,
             "test": config.test if not method.startswith("given") else None, "seed": config.seed,
             "kfold": config.kfold, "dedupe": bool(config.dedupe)}
    if method == "given+val":  # no val/ folder: that fraction of the given train/ images, per class, seeded
        split.update({"val_from": "train", "val_method": config.split})
    if trains or not writer.config_yaml.is_file():
        writer.write_config(config.to_yaml())
    writer.write_dataset({
        "root": str(data_root), "class_names": list(index.class_names),
        "num_images": len(index.samples), "num_bad": len(index.bad),
        "preprocessing": saved.get("preprocessing") or PREPROCESSING, "split": split,
        "counts": {k: len(v) for k, v in parts.items()},
        "duplicates": duplicates if duplicates is not None else saved.get("duplicates"),
    })


def prepare_run(config: TrainConfig, progress: ProgressLike = None, *,
                trains: bool = True) -> tuple[PreparedRun, list[TrialSpec]]:
    """Check the options, index the data and write the run folder's own files.

    ``trains`` False: for a command that trains nothing (``transfer rank``): an existing run
    folder must only have the same split and initial weights, and keeps its ``config.yaml``.

    Returns:
        The prepared run and the trial plan.

    Raises:
        ConfigError: missing data / run folder, a backbone size below its minimum, or an
            existing run folder whose saved config differs in an option that changes results.
        DataError: an unusable dataset (from the indexer), or changed classes on resume.
    """
    p = as_progress(progress)
    data_root, run_dir = check_options(config)
    specs = plan_trials(config)  # validates backbones and sizes before any work
    scratch = sorted({s.backbone for s in specs if config.weights_for(s.backbone) == "imagenet" and s.init == "scratch"})
    if scratch:
        p.say(f"note: {', '.join(scratch)} ha{'s' if len(scratch) == 1 else 've'} no ImageNet weights; "
              "trained from random weights")
    dup = duplicate_random_trials(config, specs)
    if dup:
        p.say(f"note: no extra random-init trial for {', '.join(dup)}: it starts from random weights already, "
              f"so its t100 trial is the random-init trial")
    writer = RunWriter(run_dir)
    _check_existing(writer, config, trains=trains)
    writer.write_run_json(__version__)  # first: the folder is a run from now on
    index = _index(config, writer, data_root, p)
    fresh = not writer.split_csv_path("test").is_file()  # the split is made now (else read back)
    groups = _duplicate_groups(config, index, data_root, p) if fresh else None
    method, parts, folds = _prepare_splits(writer, config, index, groups if config.dedupe else None)
    duplicates = _record_duplicates(writer, config, groups, parts) if fresh else None
    _write_run_files(writer, config, index, data_root, method, parts, duplicates, trains=trains)
    _warn_duplicates(writer, duplicates or writer.saved_dataset().get("duplicates"), p)
    for w in S.split_warnings(parts, list(index.class_names)):
        p.say(f"warning: {w}")
    if method == "given+val":
        p.say(f"note: {data_root} has train/ and test/ but no val/: {len(parts['val'])} validation images "
              f"({config.val:g} of train/, {config.split}, seed {config.seed}) are held out of train/")
    if not parts["val"] and not folds:
        p.say("warning: no validation images: early stopping watches the training loss and the best trial "
              "is chosen by training accuracy" + (" (the given split has no val/ folder)" if method == "given"
                                                  else " (val fraction 0)"))
    return PreparedRun(writer, data_root, list(index.class_names), method, parts, folds), specs


# -- duplicates across the split ---------------------------------------------------------

def _duplicate_groups(config: TrainConfig, index, data_root: Path, p: Progress) -> list[list[str]]:
    """Groups (sample paths) of identical or near-identical images (:func:`transfer.data.dedupe.sample_groups`)."""
    t0 = time.perf_counter()
    groups = sample_groups(index.samples, data_root, workers=config.workers)
    paths = [[index.samples[i].path for i in g] for g in groups]
    p.say(f"duplicates: {len(paths)} group(s) of identical or near-identical images among {len(index.samples)} "
          f"({clock(time.perf_counter() - t0)})")
    return paths


def _record_duplicates(writer: RunWriter, config: TrainConfig, groups: list[list[str]], parts: dict) -> dict:
    """Write ``duplicates.csv`` (every member of every group, its split, whether the group straddles
    the split, what was done) and return the ``dataset.json`` record."""
    where = {s.path: k for k, v in parts.items() for s in v}
    rows, copies, straddling = [], {"val": 0, "test": 0}, 0
    for n, g in enumerate(groups, 1):
        homes = _splits_of(g, where)
        crosses, first = len(homes) > 1, (homes or [None])[0]
        straddling += crosses
        for q in g:
            split = where.get(q, "")
            if not split:
                action = "left out (a copy is in an earlier split)" if config.dedupe else "not in the split"
            elif crosses and split != first:
                copies[split] += 1
                action = "kept (a copy is in an earlier split)"
            else:
                action = "kept"
            rows.append([n, q, split or "-", "yes" if crosses else "no", action])
    write_csv(writer.duplicates_csv, ("group", "path", "split", "straddles", "action"), rows)
    left_out = sum(1 for r in rows if r[2] == "-" and config.dedupe)
    return {"groups": len(groups), "images": sum(len(g) for g in groups), "straddling_groups": straddling,
            "val_with_copy": copies["val"], "test_with_copy": copies["test"], "left_out": left_out,
            "dedupe": bool(config.dedupe), "list": writer.duplicates_csv.name}


def _warn_duplicates(writer: RunWriter, rec: dict | None, p: Progress) -> None:
    if not rec:
        return
    if rec.get("straddling_groups"):
        p.say(f"warning: {rec['straddling_groups']} group(s) of duplicate images straddle the split "
              f"({rec.get('test_with_copy', 0)} test and {rec.get('val_with_copy', 0)} val image(s) have a copy in an "
              f"earlier split): test accuracy counts them and may be overstated (metrics.json also gives it without "
              f"them); the list: {writer.duplicates_csv}; training with dedupe (--dedupe) keeps each group on one side")
    elif rec.get("dedupe") and rec.get("groups"):
        p.say(f"duplicates: {rec['groups']} group(s) kept on one side of the split"
              + (f"; {rec['left_out']} copie(s) in the given val/test folders left out" if rec.get("left_out") else "")
              + f" ({writer.duplicates_csv})")
