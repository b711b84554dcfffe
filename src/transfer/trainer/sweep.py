"""A freeze sweep: every backbone x trainable fraction (+ random init, + k folds).

``run_sweep`` prepares the run folder (:func:`transfer.trainer.prepare.prepare_run`: index
the dataset, make or reuse the splits, write ``run.json`` / ``config.yaml`` /
``dataset.json``), plans the trials (:func:`transfer.trainer.plan.plan_trials`), runs every
trial (finished trials are skipped, an interrupted one resumes) in this one process or as Ray
tasks, then writes the sweep table ``sweep.csv`` / ``sweep.md`` (rows train / val / test
accuracy, parameter counts, epochs and seconds per epoch; columns backbone x trainable
fraction) and ``best.json``. With ``--schedule halving`` the trials train rung by rung
(:mod:`transfer.trainer.halving`) and the best trial is chosen among those trained to the full
budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..locks import locked
from ..progress import Progress, ProgressLike, as_progress, clock
from ..runfolder import RunWriter
from .cache import CacheSpaceError
from .config import TrainConfig
from .distributed import RayJob, run_trials_ray
from .fit import record_failure, run_trial
from .halving import run_halving
from .plan import TrialSpec, duplicate_random_trials, plan_trials, resolve_image_size
from .prepare import PreparedRun, check_options, prepare_run
from .schedule import Schedule, plan_schedule


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


# -- running the trials ------------------------------------------------------------------

def _entry(spec: TrialSpec) -> dict:
    return {"name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
            "init": spec.init, "trainable": spec.trainable, "state": None, "metrics": None}


def _finished_metrics(run: PreparedRun, spec: TrialSpec) -> dict | None:
    paths = run.writer.trial_paths(spec.name)
    return paths.metrics() if paths.finished() else None


def _run_one(run: PreparedRun, config: TrainConfig, spec: TrialSpec, entry: dict, label: str, p: Progress,
             siblings: tuple[float, ...]) -> None:
    """Train one trial into ``entry``; a failure is recorded and the sweep goes on."""
    t0 = time.perf_counter()
    data = run.trial_data(spec)
    try:
        entry["metrics"] = run_trial(run.writer.path, config, spec, data, progress=p, siblings=siblings)
        entry["state"] = "done"
        m = entry["metrics"]
        p.say(f"{label} {spec.name}: done  val_acc {_f(m['val']['accuracy'])}  test_acc {_f(m['test']['accuracy'])}"
              f"  ({clock(time.perf_counter() - t0)})")
    except (KeyboardInterrupt, CacheSpaceError):  # no disk for the cache: stop before any other trial
        raise
    except Exception as exc:  # a failed trial is recorded; the sweep goes on
        record_failure(run.writer, spec.name, entry, exc, p.say, label)


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


def _run_halving(run: PreparedRun, config: TrainConfig, specs: list[TrialSpec], schedule, ray, p: Progress
                 ) -> list[dict]:
    entries = {s.name: _entry(s) for s in specs}
    for spec in specs:
        done = _finished_metrics(run, spec)
        if done is not None:
            entries[spec.name].update(metrics=done, state="done")
    p.say(f"sweep by successive halving: {len(specs)} trial(s) into {run.writer.path}, rungs at epoch(s) "
          f"{', '.join(map(str, schedule.rungs))}, the best 1/{schedule.rate} go on"
          f"{' (on Ray)' if ray is not None else ''}; {sum(e['state'] == 'done' for e in entries.values())} done")
    run_halving(run, config, specs, schedule, entries, p, ray=ray)
    return [entries[s.name] for s in specs]


def _run_on_ray(run: PreparedRun, config: TrainConfig, specs: list[TrialSpec], opts, p: Progress) -> list[dict]:
    entries, jobs = {s.name: _entry(s) for s in specs}, []
    for spec in specs:
        done = _finished_metrics(run, spec)
        if done is not None:
            entries[spec.name].update(metrics=done, state="done")
            p.say(f"trial {spec.name}: already done, skipped")
        else:
            jobs.append(RayJob(spec, run.trial_data(spec), run.siblings(spec, specs)))
    p.say(f"sweep on Ray: {len(specs)} trial(s) into {run.writer.path}, {len(jobs)} to run")
    if jobs:
        outcome = run_trials_ray(run.writer.path, config, jobs, opts=opts, progress=p)
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


def _epochs(m: dict) -> str | None:
    """Epochs trained, and why fewer than the plan's (a rung stopped it, or early stopping)."""
    done, budget = m.get("epochs_trained"), m.get("epochs_budget")
    if done is None:
        return None
    if m.get("stopped"):
        st = m["stopped"]
        return f"{done} of {budget} (stopped at rung {st.get('rung')}: place {st.get('place')} of {st.get('of')})"
    if budget is not None and done < budget:
        return f"{done} of {budget} (early stopping)"
    return f"{done}"


ROWS = (
    ("train accuracy", lambda m: m["train"]["accuracy"], "{:.3f}"),
    ("val accuracy", lambda m: m["val"]["accuracy"], "{:.3f}"),
    ("test accuracy", lambda m: m["test"]["accuracy"], "{:.3f}"),
    ("trainable params", lambda m: m["params"]["trainable"], "{:,.0f}"),
    ("non-trainable params", lambda m: m["params"]["non_trainable"], "{:,.0f}"),
    ("epochs", _epochs, None),
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
    """Best trial by val accuracy (tie -> lower val loss); k folds: best group by mean, then its best fold.

    Only trials trained to the full budget compete: a trial a rung of ``--schedule halving``
    stopped (``stopped`` in its metrics) is in the table, never the best.
    """
    done = [t for t in trials if t.get("metrics") and not t["metrics"].get("stopped")]
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


def _finish(run: PreparedRun, trials: list[dict], schedule: Schedule) -> SweepResult:
    """The sweep table, best trial and failures of a finished sweep (local or Ray). ``best.json``
    names the schedule the sweep ran (and, when halving was asked for and it ran as a full sweep,
    why: the note it printed)."""
    result = SweepResult(run_dir=run.writer.path, trials=trials)
    for t in trials:
        if t["state"] == "failed":
            result.failed[t["name"]] = run.writer.trial_paths(t["name"]).status().get("error") or "failed"
    header, rows = sweep_table(trials)
    result.table_md = run.writer.write_sweep_table(header, rows)
    result.best = pick_best(trials)
    if result.best:
        result.best["schedule"] = schedule.kind
        if schedule.note:
            result.best["schedule_note"] = schedule.note
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
    p = as_progress(progress)
    _, run_dir = check_options(config)
    RunWriter(run_dir).check_target()
    with locked(run_dir, purpose="train"):
        run, specs = prepare_run(config, p)
        schedule = plan_schedule(config, specs)
        if schedule.note:
            p.say(f"note: {schedule.note}")
        if schedule.halving:
            trials = _run_halving(run, config, specs, schedule, ray, p)
        else:
            trials = _run_local(run, config, specs, p) if ray is None else _run_on_ray(run, config, specs, ray, p)
        return _finish(run, trials, schedule)


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


#: the trial list (``plan_trials``, ...) is planned in :mod:`transfer.trainer.plan` and the run folder
#: prepared in :mod:`transfer.trainer.prepare`; both are importable from here, where a sweep is run
__all__ = ["SweepResult", "run_sweep", "sweep_table", "pick_best", "plan_trials", "duplicate_random_trials",
           "resolve_image_size", "prepare_run", "PreparedRun"]
