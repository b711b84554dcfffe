"""A freeze sweep: every backbone x trainable fraction (+ random init, + k folds).

``run_sweep`` indexes the dataset, makes (or reuses) the splits, writes the run
folder's ``run.json`` / ``config.yaml`` / ``dataset.json``, runs every trial (finished
trials are skipped, an interrupted one resumes), then writes ``sweep.csv``,
``sweep.md`` (report A's table 1: rows train / val / test accuracy, parameter counts and
seconds per epoch; columns backbone x trainable) and ``best.json``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, DataError, TransferError
from ..fsutil import read_json, write_json_atomic, write_text_atomic
from .config import TrainConfig, config_from_yaml_text
from .fit import TrialSpec, is_finished, mark_failed, run_trial, trial_name


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


def _fmt_time(sec: float) -> str:
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def resolve_image_size(cfg: TrainConfig, backbone: str) -> tuple[int, int]:
    """Input size of a backbone: ``cfg.image_size`` or the backbone default (never below its minimum)."""
    from ..models.registry import get_backbone

    spec = get_backbone(backbone)
    min_size = int(getattr(spec, "min_size", 1) or 1)
    if cfg.image_size is not None:
        if cfg.image_size < min_size:
            raise ConfigError(
                f"--image-size {cfg.image_size} is below the minimum input size of {backbone} ({min_size})",
                hint=f"use --image-size {min_size} or more for {backbone}, or leave it unset for its default "
                     f"({spec.default_size})",
            )
        s = int(cfg.image_size)
    else:
        s = max(int(spec.default_size), min_size)
    return (s, s)


def duplicate_random_trials(cfg: TrainConfig, specs: list[TrialSpec] | None = None) -> list[str]:
    """Backbones whose ``--random-init`` trial :func:`plan_trials` skipped: they start from
    random weights already (``--weights none``, or no published weights) and
    ``--trainable`` has 1.0, so that trial *is* the random-init one."""
    if not cfg.random_init:
        return []
    have = {s.backbone for s in (plan_trials(cfg) if specs is None else specs) if s.init == "random"}
    return [bb for bb in cfg.backbones if bb not in have]


def plan_trials(cfg: TrainConfig) -> list[TrialSpec]:
    """The trial list of a config, in run order (names of docs/design.md).

    Example:
        >>> [t.name for t in plan_trials(cfg)]     # doctest: +SKIP
        ['arc2-t000', 'arc2-t100', 'arc2-random']
    """
    out: list[TrialSpec] = []
    folds = list(range(1, cfg.kfold + 1)) if cfg.kfold else [None]
    from ..models.registry import get_backbone

    seen: dict[str, float] = {}
    for bb in cfg.backbones:
        size = resolve_image_size(cfg, bb)
        weights = cfg.weights
        # "imagenet" means "the backbone's published weights where they exist": the
        # small CNNs of the course reports (arc2, arc3) have none and start from scratch,
        # so one command can sweep e.g. mobilenet_v2,arc2 (see pretrained_note()).
        if weights == "imagenet" and not get_backbone(bb).pretrainable:
            weights = "none"
        init = "scratch" if weights == "none" else "pretrained"
        variants = [(float(t), False) for t in cfg.trainable]
        # a backbone that already starts from random weights: its full fine-tuning trial
        # *is* the random-init trial (same init, same training); do not train it twice
        if cfg.random_init and not (init == "scratch" and 1.0 in {t for t, _ in variants}):
            variants.append((1.0, True))
        for t, rnd in variants:
            group = trial_name(bb, t, random_init=rnd)
            if group in seen:  # names round to whole percent: 0.3 and 0.304 would share a folder
                raise ConfigError(f"--trainable {t:g} and {seen[group]:g} of {bb} are both trial {group} "
                                  "(trial names round to whole percent)",
                                  hint="list each fraction once, at least 0.01 apart")
            seen[group] = t
            for k in folds:
                out.append(TrialSpec(
                    name=trial_name(bb, t, random_init=rnd, fold=k), group=group, fold=k, backbone=bb,
                    init="random" if rnd else init, weights="none" if rnd else weights,
                    trainable=t, freeze_by=cfg.freeze_by, image_size=size,
                ))
    return out


# -- run folder set-up -----------------------------------------------------------------

def _check_existing(run_dir: Path, cfg: TrainConfig) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = config_from_yaml_text(saved.read_text(encoding="utf-8"))
    except TransferError as exc:
        raise ConfigError(f"the run folder {run_dir} holds an unreadable config.yaml: {exc.message}",
                          hint="use a new --out folder") from exc
    diff = cfg.result_diff(old)
    if diff:
        od, nd = old.to_dict(), cfg.to_dict()
        detail = "; ".join(f"{k}: {od.get(k)!r} -> {nd.get(k)!r}" for k in diff)
        raise ConfigError(
            f"{run_dir} already holds a run with a different configuration ({detail})",
            hint="re-run with the same options to resume it, or give a new --out folder",
        )


def _check_same_classes(run_dir: Path, data_root: Path, names: list[str]) -> None:
    """A resumed run must see the classes it was made with: the split files, trained models
    and label indices all refer to them (a renamed or added class folder would silently
    relabel every prediction)."""
    p = run_dir / "dataset.json"
    if not p.is_file():
        return
    try:
        old = list(read_json(p).get("class_names") or [])
    except (OSError, ValueError):
        return
    if old and old != list(names):
        gone, new = [c for c in old if c not in names], [c for c in names if c not in old]
        what = "; ".join(x for x in (f"gone: {', '.join(gone)}" if gone else "",
                                     f"new: {', '.join(new)}" if new else "") if x) or "same names, other order"
        raise DataError(f"the classes of {data_root} changed since {run_dir} was made ({what})",
                        hint="restore the class folders as they were to resume, or train into a new --out")


def _prepare_splits(run_dir: Path, cfg: TrainConfig, index, progress) -> tuple[str, dict, list]:
    """Returns (method, {"train","val","test"}, folds [(train, val)] or [])."""
    from ..data import splits as S

    sdir = run_dir / "splits"
    given = getattr(index, "given_splits", None)
    if given:
        if cfg.kfold:
            raise ConfigError(
                f"--kfold {cfg.kfold} needs one pool of images to fold, but {cfg.data} already has its own "
                f"train/ val/ test/ folders",
                hint="drop --kfold to use the given split, or point at a folder of class folders")
        parts = {k: list(given.get(k, [])) for k in ("train", "val", "test")}
        if not (sdir / "train.csv").is_file():
            for k, v in parts.items():
                S.write_split_csv(sdir / f"{k}.csv", v)
        return "given", parts, []
    if cfg.kfold:
        if (sdir / "test.csv").is_file() and all((sdir / f"fold{k}" / "val.csv").is_file() for k in range(1, cfg.kfold + 1)):
            test = S.read_split_csv(sdir / "test.csv")
            folds = [(S.read_split_csv(sdir / f"fold{k}" / "train.csv"), S.read_split_csv(sdir / f"fold{k}" / "val.csv"))
                     for k in range(1, cfg.kfold + 1)]
        else:
            test, folds = S.kfold_splits(index.samples, cfg.kfold, seed=cfg.seed, test=cfg.test)
            for k, (tr, va) in enumerate(folds, 1):
                S.write_split_csv(sdir / f"fold{k}" / "train.csv", tr)
                S.write_split_csv(sdir / f"fold{k}" / "val.csv", va)
            S.write_split_csv(sdir / "test.csv", test)
        # train/val csv of fold 1 so that readers without --fold find a split
        if not (sdir / "train.csv").is_file():
            S.write_split_csv(sdir / "train.csv", folds[0][0])
            S.write_split_csv(sdir / "val.csv", folds[0][1])
        return "kfold", {"train": folds[0][0], "val": folds[0][1], "test": test}, folds
    if all((sdir / f"{k}.csv").is_file() for k in ("train", "val", "test")):
        parts = {k: S.read_split_csv(sdir / f"{k}.csv") for k in ("train", "val", "test")}
    else:
        parts = S.split_samples(index.samples, method=cfg.split, val=cfg.val, test=cfg.test, seed=cfg.seed)
        for k in ("train", "val", "test"):
            S.write_split_csv(sdir / f"{k}.csv", parts[k])
    return cfg.split, parts, []


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# -- tables ----------------------------------------------------------------------------

def _col_label(t: dict) -> str:
    if t["init"] == "random":
        return f"{t['backbone']} random"
    return f"{t['backbone']} {int(round(t['trainable'] * 100))}%"


def _mean_std(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


ROWS = (
    ("train accuracy", lambda m: m["train"]["accuracy"], "{:.3f}"),
    ("val accuracy", lambda m: m["val"]["accuracy"], "{:.3f}"),
    ("test accuracy", lambda m: m["test"]["accuracy"], "{:.3f}"),
    ("trainable params", lambda m: m["params"]["trainable"], "{:,.0f}"),
    ("non-trainable params", lambda m: m["params"]["non_trainable"], "{:,.0f}"),
    ("sec/epoch", lambda m: m["seconds_per_epoch"], "{:.1f}"),
)


def sweep_table(trials: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the sweep table (one column per trial group; folds -> mean ± std)."""
    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault(t["group"], []).append(t)
    header = ["metric"] + [_col_label(ts[0]) for ts in groups.values()]
    rows = []
    for label, get, fmt in ROWS:
        row = [label]
        for ts in groups.values():
            vals = []
            for t in ts:
                if t.get("metrics") is None:
                    continue
                try:
                    v = get(t["metrics"])
                except (KeyError, TypeError):
                    v = None
                if v is not None:
                    vals.append(float(v))
            if not vals:
                states = {t.get("state") for t in ts}
                row.append("failed" if "failed" in states else "-")
            elif len(ts) > 1:
                m, sd = _mean_std(vals)
                row.append(f"{fmt.format(m)} ± {fmt.format(sd)}")
            else:
                row.append(fmt.format(vals[0]))
        rows.append(row)
    return header, rows


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _render_csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def pick_best(trials: list[dict]) -> dict | None:
    """Best trial by val accuracy (tie -> lower val loss); k folds: best group by mean, then its best fold."""
    done = [t for t in trials if t.get("metrics")]
    if not done:
        return None

    def key(m):
        va = m["val"]["accuracy"] if m["val"]["accuracy"] is not None else (m["train"]["accuracy"] or 0.0)
        vl = m["val"]["loss"] if m["val"]["loss"] is not None else (m["train"]["loss"] or 0.0)
        return (va, -vl)

    groups: dict[str, list[dict]] = {}
    for t in done:
        groups.setdefault(t["group"], []).append(t)

    def gkey(ts):
        ks = [key(t["metrics"]) for t in ts]
        return (sum(k[0] for k in ks) / len(ks), sum(k[1] for k in ks) / len(ks))

    best_group = max(groups.values(), key=gkey)
    best = max(best_group, key=lambda t: key(t["metrics"]))
    va = best["metrics"]["val"]["accuracy"]
    # without validation images the choice rests on training accuracy: say so
    return {"trial": best["name"], "group": best["group"], "metric": "val_accuracy" if va is not None else "train_accuracy",
            "value": va if va is not None else best["metrics"]["train"]["accuracy"],
            "test_accuracy": best["metrics"]["test"]["accuracy"]}


# -- the sweep -------------------------------------------------------------------------

def run_sweep(config: TrainConfig, *, progress: Callable[[str], None] = print, ray=None) -> SweepResult:
    """Run (or resume) the whole sweep of ``config`` into ``config.out``.

    Args:
        config: the resolved configuration (``data`` and ``out`` set).
        progress: receives progress lines (sweep level and per epoch).

    Returns:
        A :class:`SweepResult`; ``failed`` names trials that raised (the sweep went on).

    Raises:
        ConfigError: missing data/out, a backbone size below its minimum, or an existing
            run folder whose saved config differs in a key that changes results.
        DataError: an unusable dataset (from the indexer).

    Example:
        >>> res = run_sweep(load_config(None, {"data": "data/digits", "out": "runs/d",
        ...                                    "backbones": "arc2", "epochs": 2}))  # doctest: +SKIP
        >>> print(res.table_md)                                                   # doctest: +SKIP
    """
    from ..data.folder import index_folder, write_bad_files_csv

    if not config.data:
        raise ConfigError("no dataset folder given", hint="transfer train DATA --out RUN")
    if not config.out:
        raise ConfigError("no output folder given", hint="add --out RUN")
    data_root = Path(config.data).resolve()
    run_dir = Path(config.out)
    o = run_dir.resolve()
    if o == data_root or data_root in o.parents:  # the run's folders would be indexed as classes next time
        raise ConfigError(f"--out {run_dir} is inside the data folder {config.data}",
                          hint="put the run folder outside the dataset, e.g. --out runs/NAME")
    if config.weights not in ("imagenet", "none") and not Path(config.weights).is_file():
        raise ConfigError(f"--weights {config.weights}: no such file",
                          hint="give a Keras weights/model file, or imagenet / none")
    specs = plan_trials(config)  # validates backbones and sizes before any work
    if config.tensorboard:  # a missing package fails here, not inside every trial
        from .._lazy import require

        require("tensorboard", purpose="--tensorboard")
    scratch = sorted({s.backbone for s in specs if config.weights == "imagenet" and s.init == "scratch"})
    if scratch:
        progress(f"note: {', '.join(scratch)} ha{'s' if len(scratch) == 1 else 've'} no ImageNet weights; "
                 "trained from random weights")
    dup = duplicate_random_trials(config, specs)
    if dup:
        progress(f"note: --random-init adds no trial for {', '.join(dup)}: it starts from random weights already, "
                 f"so its t100 trial is the random-init trial")
    _check_existing(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)

    index = index_folder(data_root, workers=config.workers, strict=False)
    if index.problems:  # unusable as is: keep the list of bad files where the user will look
        if index.bad:
            write_bad_files_csv(run_dir / "bad_files.csv", index.bad)
        more = f" (and {len(index.problems) - 1} more problem(s))" if len(index.problems) > 1 else ""
        raise DataError(index.problems[0] + more,
                        hint=(f"every bad file is listed in {run_dir / 'bad_files.csv'}; " if index.bad else "")
                        + f"`transfer data check {config.data}` shows the whole dataset")
    _check_same_classes(run_dir, data_root, index.class_names)
    for w in index.warnings:
        progress(f"warning: {w}")
    if index.ignored:
        ex = ", ".join(b.path for b in index.ignored[:3]) + (" ..." if len(index.ignored) > 3 else "")
        progress(f"note: {len(index.ignored)} file(s) in {data_root} are not used ({ex}); "
                 f"`transfer data check {config.data}` says why")
    if index.bad:
        progress(f"warning: {len(index.bad)} file(s) in {data_root} cannot be read and are skipped; "
                 f"see {run_dir / 'bad_files.csv'}")
    if not (run_dir / "bad_files.csv").is_file():
        write_bad_files_csv(run_dir / "bad_files.csv", index.bad)

    method, parts, folds = _prepare_splits(run_dir, config, index, progress)
    if not (run_dir / "run.json").is_file():
        write_json_atomic(run_dir / "run.json", {
            "format": "transfer-run", "version": 1,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "transfer_version": _version(),
        })
    write_text_atomic(run_dir / "config.yaml", config.to_yaml())
    from ..data.image import PREPROCESSING

    write_json_atomic(run_dir / "dataset.json", {
        "root": str(data_root), "class_names": list(index.class_names),
        "num_images": len(index.samples), "num_bad": len(index.bad),
        "preprocessing": PREPROCESSING,
        # the fractions the split used (a given split and k folds ignore --val / --split)
        "split": {"method": method, "val": config.val if method in ("stratified", "random") else None,
                  "test": config.test if method != "given" else None, "seed": config.seed, "kfold": config.kfold},
        "counts": {k: len(v) for k, v in parts.items()},
    })

    if not parts["val"] and not folds:
        progress("warning: no validation images: early stopping watches the training loss and the best trial "
                 "is chosen by training accuracy" + (" (the given split has no val/ folder)" if method == "given"
                                                     else " (--val 0)"))
    result = SweepResult(run_dir=run_dir)
    n = len(specs)
    if ray is not None:  # transfer.trainer.distributed.RayOptions: every pending trial as a Ray task
        return _finish(result, _sweep_on_ray(run_dir, config, specs, parts, folds, data_root, index, ray, progress))
    t_start = time.perf_counter()
    trained_secs: list[float] = []
    progress(f"sweep: {n} trial(s) into {run_dir} ({len(parts['train'])} train / {len(parts['val'])} val / "
             f"{len(parts['test'])} test images, {len(index.class_names)} classes)")
    for i, spec in enumerate(specs, 1):
        tdir = run_dir / "trials" / spec.name
        if spec.fold:
            tr, va = folds[spec.fold - 1]
            te = parts["test"]
        else:
            tr, va, te = parts["train"], parts["val"], parts["test"]
        elapsed = time.perf_counter() - t_start
        remaining = n - i + 1
        eta = (sum(trained_secs) / len(trained_secs) * remaining) if trained_secs else None
        entry = {"name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
                 "init": spec.init, "trainable": spec.trainable, "state": None, "metrics": None}
        if is_finished(tdir):
            entry["metrics"], entry["state"] = read_json(tdir / "metrics.json"), "done"
            progress(f"trial {i}/{n} {spec.name}: already done, skipped")
            result.trials.append(entry)
            continue
        progress(f"trial {i}/{n} {spec.name}  (elapsed {_fmt_time(elapsed)}"
                 + (f", ETA {_fmt_time(eta)}" if eta is not None else "") + ")")
        t0 = time.perf_counter()
        try:
            entry["metrics"] = run_trial(run_dir, config, spec, data_root=data_root,
                                         class_names=index.class_names, train=tr, val=va, test=te,
                                         progress=progress)
            entry["state"] = "done"
            m = entry["metrics"]
            progress(f"trial {i}/{n} {spec.name}: done  val_acc {_f(m['val']['accuracy'])}  "
                     f"test_acc {_f(m['test']['accuracy'])}  ({_fmt_time(time.perf_counter() - t0)})")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failed trial is recorded; the sweep goes on
            msg = exc.message if isinstance(exc, TransferError) else f"{type(exc).__name__}: {exc}"
            if os.environ.get("TRANSFER_DEBUG") == "1":
                traceback.print_exc()
            mark_failed(run_dir, spec.name, msg)
            entry["state"] = "failed"
            result.failed[spec.name] = msg
            progress(f"trial {i}/{n} {spec.name}: FAILED: {msg}")
        trained_secs.append(time.perf_counter() - t0)
        result.trials.append(entry)

    return _finish(result, result.trials)


def _split_parts(spec, parts, folds):
    if spec.fold:
        tr, va = folds[spec.fold - 1]
        return tr, va, parts["test"]
    return parts["train"], parts["val"], parts["test"]


def _sweep_on_ray(run_dir, config, specs, parts, folds, data_root, index, opts, progress) -> list[dict]:
    from .distributed import run_trials_ray

    entries, jobs = {}, []
    for spec in specs:
        entries[spec.name] = {"name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
                              "init": spec.init, "trainable": spec.trainable, "state": None, "metrics": None}
        tdir = run_dir / "trials" / spec.name
        if is_finished(tdir):
            entries[spec.name].update(metrics=read_json(tdir / "metrics.json"), state="done")
            progress(f"trial {spec.name}: already done, skipped")
        else:
            jobs.append((spec, *_split_parts(spec, parts, folds)))
    progress(f"sweep on Ray: {len(specs)} trial(s) into {run_dir}, {len(jobs)} to run")
    if jobs:
        outcome = run_trials_ray(run_dir, config, jobs, data_root=data_root, class_names=index.class_names,
                                 opts=opts, progress=progress)
        for name, (state, value) in outcome.items():
            if state == "done":
                entries[name].update(state="done", metrics=value)
            else:
                mark_failed(run_dir, name, value)
                entries[name]["state"] = "failed"
    return [entries[s.name] for s in specs]


def _finish(result: SweepResult, trials: list[dict]) -> SweepResult:
    """The sweep table, best trial and failures of a finished sweep (local or Ray)."""
    run_dir = result.run_dir
    result.trials = trials
    for t in trials:
        if t["state"] == "failed" and t["name"] not in result.failed:
            st = run_dir / "trials" / t["name"] / "status.json"
            result.failed[t["name"]] = (read_json(st).get("error") if st.is_file() else None) or "failed"
    header, rows = sweep_table(result.trials)
    result.table_md = render_markdown(header, rows)
    write_text_atomic(run_dir / "sweep.csv", _render_csv(header, rows))
    write_text_atomic(run_dir / "sweep.md", result.table_md)
    result.best = pick_best(result.trials)
    if result.best:
        write_json_atomic(run_dir / "best.json", result.best)
    return result


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"
