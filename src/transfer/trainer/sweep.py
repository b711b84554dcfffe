"""A freeze sweep: every backbone x trainable fraction (+ random init, + k folds).

``run_sweep`` prepares the run folder (:func:`prepare_run`: index the dataset, make or
reuse the splits, write ``run.json`` / ``config.yaml`` / ``dataset.json``), runs every
trial (finished trials are skipped, an interrupted one resumes), then writes the sweep
table ``sweep.csv`` / ``sweep.md`` (rows train / val / test accuracy, parameter counts
and seconds per epoch; columns backbone x trainable fraction) and ``best.json``.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError, TransferError
from ..progress import Progress, ProgressLike, as_progress, clock
from ..runfolder import RunWriter
from .cache import CacheSpaceError
from .config import TrainConfig, config_from_yaml_text
from .fit import run_trial
from .plan import TrialData, TrialSpec, trial_name


@dataclass
class SweepResult:
    """What a sweep produced. ``failed`` maps trial name -> error message."""

    run_dir: Path
    trials: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    best: dict | None = None
    table_md: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed


def resolve_image_size(cfg: TrainConfig, backbone: str) -> tuple[int, int]:
    """Input size of a backbone: ``cfg.image_size`` or the backbone default (never below its minimum)."""
    from ..models.registry import get_backbone

    spec = get_backbone(backbone)
    min_size = int(getattr(spec, "min_size", 1) or 1)
    if cfg.image_size is None:
        s = max(int(spec.default_size), min_size)
        return (s, s)
    if cfg.image_size < min_size:
        raise ConfigError(
            f"image size {cfg.image_size} is below the minimum input size of {backbone} ({min_size})",
            hint=f"use an image size of {min_size} or more for {backbone}, or leave it unset for its default "
                 f"({spec.default_size})",
            option="image_size",
        )
    return (int(cfg.image_size), int(cfg.image_size))


def duplicate_random_trials(cfg: TrainConfig, specs: list[TrialSpec] | None = None) -> list[str]:
    """Backbones whose random-init trial :func:`plan_trials` skipped: they start from random
    weights already (weights "none", or no published weights) and the trainable fractions
    include 1.0, so that trial *is* the random-init one."""
    if not cfg.random_init:
        return []
    have = {s.backbone for s in (plan_trials(cfg) if specs is None else specs) if s.init == "random"}
    return [bb for bb in cfg.backbones if bb not in have]


def _variants(cfg: TrainConfig, init: str) -> list[tuple[float, bool]]:
    """(trainable fraction, random init) of each trial of one backbone."""
    variants = [(float(t), False) for t in cfg.trainable]
    # a backbone that already starts from random weights: its full fine-tuning trial
    # *is* the random-init trial (same init, same training); do not train it twice
    if cfg.random_init and not (init == "scratch" and 1.0 in {t for t, _ in variants}):
        variants.append((1.0, True))
    return variants


def plan_trials(cfg: TrainConfig) -> list[TrialSpec]:
    """The trial list of a config, in run order (names of docs/design.md).

    Example::

        [t.name for t in plan_trials(cfg)]   # ['arc2-t000', 'arc2-t100', 'arc2-random']
    """
    from ..models.registry import get_backbone

    out: list[TrialSpec] = []
    folds = list(range(1, cfg.kfold + 1)) if cfg.kfold else [None]
    for bb in cfg.backbones:
        size = resolve_image_size(cfg, bb)
        # "imagenet" means "the backbone's published weights where they exist": the
        # small CNNs (arc2, arc3) have none and start from scratch, so one command can
        # sweep e.g. mobilenet_v2,arc2
        weights = "none" if cfg.weights == "imagenet" and not get_backbone(bb).pretrainable else cfg.weights
        init = "scratch" if weights == "none" else "pretrained"
        seen: dict[str, float] = {}
        for t, rnd in _variants(cfg, init):
            group = trial_name(bb, t, random_init=rnd)
            if group in seen:  # names round to whole percent: 0.3 and 0.304 would share a folder
                raise ConfigError(f"trainable fractions {t:g} and {seen[group]:g} of {bb} are both trial {group} "
                                  "(trial names round to whole percent)",
                                  hint="list each fraction once, at least 0.01 apart", option="trainable")
            seen[group] = t
            out += [TrialSpec(name=trial_name(bb, t, random_init=rnd, fold=k), group=group, fold=k, backbone=bb,
                              init="random" if rnd else init, weights="none" if rnd else weights,
                              trainable=t, freeze_by=cfg.freeze_by, image_size=size) for k in folds]
    return out


# -- preparing the run folder -------------------------------------------------------------

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

    def samples_of(self, spec: TrialSpec) -> tuple[list, list, list]:
        """(train, val, test) of a trial: its fold's train / val with ``--kfold``."""
        if spec.fold:
            tr, va = self.folds[spec.fold - 1]
            return tr, va, self.parts["test"]
        return self.parts["train"], self.parts["val"], self.parts["test"]


def _check_options(config: TrainConfig) -> tuple[Path, Path]:
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
    if config.weights not in ("imagenet", "none") and not Path(config.weights).is_file():
        raise ConfigError(f"initial weights {config.weights}: no such file",
                          hint="give a Keras weights/model file, or imagenet / none", option="weights")
    if config.tensorboard:  # a missing package fails here, not inside every trial
        from .._lazy import require

        require("tensorboard", purpose="TensorBoard logs")
    return data_root, run_dir


def _check_existing(writer: RunWriter, cfg: TrainConfig) -> None:
    """A run folder that exists must have been made with the options that change results."""
    if not writer.config_yaml.is_file():
        return
    try:
        old = config_from_yaml_text(writer.config_yaml.read_text(encoding="utf-8"))
    except TransferError as exc:
        raise ConfigError(f"the run folder {writer.path} holds an unreadable config.yaml: {exc.message}",
                          hint="use a new run folder", option="out") from exc
    diff = cfg.result_diff(old)
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
    from ..data.folder import index_folder

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
    from ..data import splits as S

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
    from ..data.dedupe import grouped_split

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
    from ..data import splits as S

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
    from ..data import splits as S

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


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _write_run_files(writer: RunWriter, config: TrainConfig, index, data_root: Path, method: str, parts,
                     duplicates: dict | None) -> None:
    """``config.yaml`` and ``dataset.json``; a resumed run keeps the pixel recipe and duplicate
    record its first trials were made with."""
    from ..data.image import PREPROCESSING

    saved = writer.saved_dataset()
    split = {"method": "given" if method == "given+val" else method,
             # the fractions the split used (a given split and k folds ignore the val fraction / method)
             "val": config.val if method in ("stratified", "random", "given+val") else None,
             "test": config.test if not method.startswith("given") else None, "seed": config.seed,
             "kfold": config.kfold, "dedupe": bool(config.dedupe)}
    if method == "given+val":  # no val/ folder: that fraction of the given train/ images, per class, seeded
        split.update({"val_from": "train", "val_method": config.split})
    writer.write_config(config.to_yaml())
    writer.write_dataset({
        "root": str(data_root), "class_names": list(index.class_names),
        "num_images": len(index.samples), "num_bad": len(index.bad),
        "preprocessing": saved.get("preprocessing") or PREPROCESSING, "split": split,
        "counts": {k: len(v) for k, v in parts.items()},
        "duplicates": duplicates if duplicates is not None else saved.get("duplicates"),
    })


def prepare_run(config: TrainConfig, progress: ProgressLike = None) -> tuple[PreparedRun, list[TrialSpec]]:
    """Check the options, index the data and write the run folder's own files.

    Returns:
        The prepared run and the trial plan.

    Raises:
        ConfigError: missing data / run folder, a backbone size below its minimum, or an
            existing run folder whose saved config differs in an option that changes results.
        DataError: an unusable dataset (from the indexer), or changed classes on resume.
    """
    p = as_progress(progress)
    data_root, run_dir = _check_options(config)
    specs = plan_trials(config)  # validates backbones and sizes before any work
    scratch = sorted({s.backbone for s in specs if config.weights == "imagenet" and s.init == "scratch"})
    if scratch:
        p.say(f"note: {', '.join(scratch)} ha{'s' if len(scratch) == 1 else 've'} no ImageNet weights; "
              "trained from random weights")
    dup = duplicate_random_trials(config, specs)
    if dup:
        p.say(f"note: no extra random-init trial for {', '.join(dup)}: it starts from random weights already, "
              f"so its t100 trial is the random-init trial")
    writer = RunWriter(run_dir)
    _check_existing(writer, config)
    writer.write_run_json(_version())  # first: the folder is a run from now on
    index = _index(config, writer, data_root, p)
    fresh = not writer.split_csv_path("test").is_file()  # the split is made now (else read back)
    groups = _duplicate_groups(config, index, data_root, p) if fresh else None
    method, parts, folds = _prepare_splits(writer, config, index, groups if config.dedupe else None)
    duplicates = _record_duplicates(writer, config, groups, parts) if fresh else None
    _write_run_files(writer, config, index, data_root, method, parts, duplicates)
    _warn_duplicates(writer, duplicates or writer.saved_dataset().get("duplicates"), p)
    from ..data.splits import split_warnings

    for w in split_warnings(parts, list(index.class_names)):
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
    from ..data.dedupe import sample_groups

    t0 = time.perf_counter()
    groups = sample_groups(index.samples, data_root, workers=config.workers)
    paths = [[index.samples[i].path for i in g] for g in groups]
    p.say(f"duplicates: {len(paths)} group(s) of identical or near-identical images among {len(index.samples)} "
          f"({clock(time.perf_counter() - t0)})")
    return paths


def _record_duplicates(writer: RunWriter, config: TrainConfig, groups: list[list[str]], parts: dict) -> dict:
    """Write ``duplicates.csv`` (every member of every group, its split, whether the group straddles
    the split, what was done) and return the ``dataset.json`` record."""
    from ..tables import write_csv

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


# -- running the trials ------------------------------------------------------------------

def _entry(spec: TrialSpec) -> dict:
    return {"name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
            "init": spec.init, "trainable": spec.trainable, "state": None, "metrics": None}


def _finished_metrics(run: PreparedRun, spec: TrialSpec) -> dict | None:
    paths = run.writer.trial_paths(spec.name)
    return paths.metrics() if paths.finished() else None


def _error_text(exc: BaseException) -> str:
    return exc.message if isinstance(exc, TransferError) else f"{type(exc).__name__}: {exc}"


def _run_one(run: PreparedRun, config: TrainConfig, spec: TrialSpec, entry: dict, label: str, p: Progress,
             siblings: tuple[float, ...]) -> None:
    """Train one trial into ``entry``; a failure is recorded and the sweep goes on."""
    t0 = time.perf_counter()
    tr, va, te = run.samples_of(spec)
    try:
        data = TrialData.of(run.data_root, run.class_names, tr, va, te)
        entry["metrics"] = run_trial(run.writer.path, config, spec, data, progress=p, siblings=siblings)
        entry["state"] = "done"
        m = entry["metrics"]
        p.say(f"{label} {spec.name}: done  val_acc {_f(m['val']['accuracy'])}  test_acc {_f(m['test']['accuracy'])}"
              f"  ({clock(time.perf_counter() - t0)})")
    except (KeyboardInterrupt, CacheSpaceError):  # no disk for the cache: stop before any other trial
        raise
    except Exception as exc:  # a failed trial is recorded; the sweep goes on
        msg = _error_text(exc)
        if os.environ.get("TRANSFER_DEBUG") == "1":
            traceback.print_exc()
        run.writer.mark_failed(spec.name, msg)
        entry["state"] = "failed"
        p.say(f"{label} {spec.name}: FAILED: {msg}")


def _run_local(run: PreparedRun, config: TrainConfig, specs: list[TrialSpec], p: Progress) -> list[dict]:
    entries = [_entry(s) for s in specs]
    p.say(f"sweep: {len(specs)} trial(s) into {run.writer.path} ({len(run.parts['train'])} train / "
          f"{len(run.parts['val'])} val / {len(run.parts['test'])} test images, {len(run.class_names)} classes)")
    with p.bar(len(specs), "sweep", unit="trial") as bar:
        for i, (spec, entry) in enumerate(zip(specs, entries), 1):
            label = f"trial {i}/{len(specs)}"
            done = _finished_metrics(run, spec)
            if done is not None:
                entry.update(metrics=done, state="done")
                p.say(f"{label} {spec.name}: already done, skipped")
            else:
                p.say(f"{label} {spec.name}")
                _run_one(run, config, spec, entry, label, p, run.siblings(spec, specs))
            bar.update(1)
    return entries


def _run_on_ray(run: PreparedRun, config: TrainConfig, specs: list[TrialSpec], opts, p: Progress) -> list[dict]:
    from .distributed import run_trials_ray

    entries, jobs = {s.name: _entry(s) for s in specs}, []
    for spec in specs:
        done = _finished_metrics(run, spec)
        if done is not None:
            entries[spec.name].update(metrics=done, state="done")
            p.say(f"trial {spec.name}: already done, skipped")
        else:
            jobs.append((spec, *run.samples_of(spec), run.siblings(spec, specs)))
    p.say(f"sweep on Ray: {len(specs)} trial(s) into {run.writer.path}, {len(jobs)} to run")
    if jobs:
        outcome = run_trials_ray(run.writer.path, config, jobs, data_root=run.data_root,
                                 class_names=run.class_names, opts=opts, progress=p)
        for name, (state, value) in outcome.items():
            if state == "done":
                entries[name].update(state="done", metrics=value)
            else:
                run.writer.mark_failed(name, value)
                entries[name]["state"] = "failed"
    return [entries[s.name] for s in specs]


# -- the table and the best trial ----------------------------------------------------------

def _col_label(t: dict) -> str:
    if t["init"] == "random":
        return f"{t['backbone']} random"
    return f"{t['backbone']} {int(round(t['trainable'] * 100))}%"


def _mean_std(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def _megabytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _frozen_part(m: dict) -> str | None:
    """What the trial did with its frozen layers: cached (and how big), uncached, or none frozen."""
    c = m.get("cache") or {}
    if c.get("mode") == "cached":
        return f"cached {_megabytes(c.get('bytes') or 0)}"
    if c.get("mode") == "none" and c.get("pixels"):
        return f"- (pixels cached {_megabytes(c['pixels'].get('bytes') or 0)})"
    return {"uncached": "uncached", "none": "-"}.get(c.get("mode"))


ROWS = (
    ("train accuracy", lambda m: m["train"]["accuracy"], "{:.3f}"),
    ("val accuracy", lambda m: m["val"]["accuracy"], "{:.3f}"),
    ("test accuracy", lambda m: m["test"]["accuracy"], "{:.3f}"),
    ("trainable params", lambda m: m["params"]["trainable"], "{:,.0f}"),
    ("non-trainable params", lambda m: m["params"]["non_trainable"], "{:,.0f}"),
    ("sec/epoch", lambda m: m["seconds_per_epoch"], "{:.1f}"),
    ("frozen part", _frozen_part, None),
    ("prefix sec", lambda m: m["cost"]["prefix_seconds"], "{:.1f}"),
    ("train sec", lambda m: m["cost"]["train_seconds"], "{:.1f}"),
)


def _groups(trials: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault(t["group"], []).append(t)
    return groups


def _cell(ts: list[dict], get, fmt: str | None) -> str:
    vals = []
    for t in ts:
        try:
            v = get(t["metrics"]) if t.get("metrics") is not None else None
        except (KeyError, TypeError):
            v = None
        if v is not None:
            vals.append(v if fmt is None else float(v))
    if not vals:
        return "failed" if "failed" in {t.get("state") for t in ts} else "-"
    if fmt is None:  # text: the first fold's
        return str(vals[0])
    if len(ts) > 1:
        m, sd = _mean_std(vals)
        return f"{fmt.format(m)} ± {fmt.format(sd)}"
    return fmt.format(vals[0])


def sweep_table(trials: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the sweep table (one column per trial group; folds -> mean ± std).

    Besides accuracies and parameter counts, each trial says what it did with its frozen
    layers (cached and how big, uncached, or nothing frozen) and what that cost: seconds
    computing the frozen part's cache, and seconds training.
    """
    groups = _groups(trials)
    header = ["metric"] + [_col_label(ts[0]) for ts in groups.values()]
    rows = list(ROWS)
    if any((t.get("metrics") or {}).get("test_without_duplicates") for t in trials):  # the split leaks
        rows.insert(3, ("test acc. w/o copies", lambda m: m["test_without_duplicates"]["accuracy"], "{:.3f}"))
    return header, [[label] + [_cell(ts, get, fmt) for ts in groups.values()] for label, get, fmt in rows]


def _selection_key(m: dict) -> tuple[float, float]:
    """Higher val accuracy, then lower val loss (train numbers when there is no val split)."""
    va = m["val"]["accuracy"] if m["val"]["accuracy"] is not None else (m["train"]["accuracy"] or 0.0)
    vl = m["val"]["loss"] if m["val"]["loss"] is not None else (m["train"]["loss"] or 0.0)
    return (va, -vl)


def pick_best(trials: list[dict]) -> dict | None:
    """Best trial by val accuracy (tie -> lower val loss); k folds: best group by mean, then its best fold."""
    done = [t for t in trials if t.get("metrics")]
    if not done:
        return None

    def group_key(ts):
        ks = [_selection_key(t["metrics"]) for t in ts]
        return (sum(k[0] for k in ks) / len(ks), sum(k[1] for k in ks) / len(ks))

    best = max(max(_groups(done).values(), key=group_key), key=lambda t: _selection_key(t["metrics"]))
    va = best["metrics"]["val"]["accuracy"]
    # without validation images the choice rests on training accuracy: say so
    return {"trial": best["name"], "group": best["group"], "metric": "val_accuracy" if va is not None else "train_accuracy",
            "value": va if va is not None else best["metrics"]["train"]["accuracy"],
            "test_accuracy": best["metrics"]["test"]["accuracy"],
            "test_without_duplicates": best["metrics"].get("test_without_duplicates")}


def _finish(run: PreparedRun, trials: list[dict]) -> SweepResult:
    """The sweep table, best trial and failures of a finished sweep (local or Ray)."""
    result = SweepResult(run_dir=run.writer.path, trials=trials)
    for t in trials:
        if t["state"] == "failed":
            result.failed[t["name"]] = run.writer.trial_paths(t["name"]).status().get("error") or "failed"
    header, rows = sweep_table(trials)
    result.table_md = run.writer.write_sweep_table(header, rows)
    result.best = pick_best(trials)
    if result.best:
        run.writer.write_best(result.best)
    return result


def run_sweep(config: TrainConfig, *, progress: ProgressLike = None, ray=None) -> SweepResult:
    """Run (or resume) the whole sweep of ``config`` into ``config.out``.

    Args:
        config: the resolved configuration (``data`` and ``out`` set).
        progress: a :class:`~transfer.progress.Progress`, a line callable or None: a bar over
            the trials (with ETA on a terminal) and status lines per trial and epoch.
        ray: a :class:`~transfer.trainer.distributed.RayOptions` to run the pending trials as
            Ray tasks, or None to run them here.

    Returns:
        A :class:`SweepResult`; ``failed`` names trials that raised (the sweep went on).

    Raises:
        ConfigError: missing data/out, a backbone size below its minimum, or an existing
            run folder whose saved config differs in a key that changes results.
        RunFolderError: the run folder holds files that are not a run's.
        LockedError: another process is writing the run folder (it is named; :mod:`transfer.locks`).
        DataError: an unusable dataset (from the indexer).

    Example::

        res = run_sweep(load_config(None, {"data": "data/digits", "out": "runs/d",
                                           "backbones": "arc2", "epochs": 2}))
        print(res.table_md)
    """
    from ..locks import locked

    p = as_progress(progress)
    _, run_dir = _check_options(config)
    RunWriter(run_dir).check_target()
    with locked(run_dir, purpose="train"):
        run, specs = prepare_run(config, p)
        trials = _run_local(run, config, specs, p) if ray is None else _run_on_ray(run, config, specs, ray, p)
        return _finish(run, trials)


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"
