"""A sweep trained rung by rung (``--schedule halving``; the schedule and its decisions:
:mod:`transfer.trainer.schedule`).

Order of work (:func:`run_halving`):

1. Cheap signals first (:mod:`transfer.trainer.rank`): each backbone's LogME score and linear
   probe on its initial pooled features, from the cache pass that computes every cut of the
   backbone for its trials. The trials train in that order (best backbone first), so the
   likely winners are the furthest along when a sweep is stopped; the signals are recorded in
   ``rungs.json`` and printed.
2. For each rung: every trial still in the sweep trains up to the rung's epoch (the last rung:
   to the end of its plan) and waits there (``status.json``: ``paused``). In one process the
   trials stay open between rungs (model, data, compiled optimizer, traced train step), so a
   trial that goes on builds and traces nothing again; on Ray each rung's trials are tasks. A
   trial whose plan ends before the rung (a one-step linear probe, early stopping) is evaluated
   and done.
3. The rung's decision (:func:`~transfer.trainer.schedule.decide`) is made from the trials'
   saved histories and recorded in ``rungs.json`` before anything acts on it; the stopped
   trials are then evaluated at the epoch they reached (``metrics.json`` says ``stopped``: the
   epoch, the rung, the place). A resumed sweep reads the recorded decisions back, so it makes
   the same ones, and a trial already at a rung's epoch is not opened again.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from ..errors import RunFolderError
from ..progress import Progress, clock
from ..runfolder import RunWriter
from .cache import CacheSpaceError
from .config import TrainConfig
from .distributed import RayJob, run_trials_ray
from .epochs import TrialState
from .fit import TrialRun, record_failure
from .plan import TrialSpec, plan_stages, resume_point, stage_bounds
from .prepare import PreparedRun
from .rank import backbone_signals, ranked
from .schedule import (COMPLETE, FAILED, TRAINING, RungRecord, Schedule, Standing, decide, group_standing)

#: trials kept open between rungs in one process; beyond it the longest-open is closed (it
#: reopens from its checkpoint, with the same history, if it goes on)
OPEN_TRIALS = 32


def file_standing(writer: RunWriter, cfg: TrainConfig, spec: TrialSpec) -> Standing:
    """Where a trial stands, from its files alone (``status.json``, ``state.json``, ``history.csv``,
    ``metrics.json``): the numbers of the epoch its ``model.keras`` holds or would hold."""
    paths = writer.trial_paths(spec.name)
    status = paths.status()
    if status.get("state") == "failed":
        return Standing(spec.name, int(status.get("epoch") or 0), None, None, 0, FAILED)
    if paths.finished(status):
        m = paths.metrics()
        epoch = int(m.get("epochs_trained") or status.get("epoch") or 0)
        best, params, state = int(m.get("best_epoch") or 0), int(m["params"]["trainable"]), COMPLETE
    else:
        st = TrialState.load(paths.state_json) or TrialState()
        bounds = stage_bounds(plan_stages(cfg, spec))
        done = resume_point(st.epoch, st.stopped, bounds).stage >= len(bounds)
        epoch, best, params = int(st.epoch), int(st.best_epoch), int(st.trainable_params)
        state = COMPLETE if done and epoch > 0 else TRAINING
    rows = [r for r in paths.history() if r["epoch"] <= epoch]
    row = next((r for r in rows if r["epoch"] == best), rows[-1] if rows else None)
    if row is None:
        return Standing(spec.name, epoch, None, None, params, state)
    val = row.get("val_accuracy") is not None
    return Standing(spec.name, epoch, row["val_accuracy"] if val else row.get("accuracy"),
                    row["val_loss"] if val else row.get("loss"), params, state)


class _Trials:
    """Trains and evaluates the sweep's trials here, keeping them open between rungs."""

    def __init__(self, run: PreparedRun, config: TrainConfig, specs: list[TrialSpec], entries: dict, p: Progress):
        self.run, self.config, self.specs, self.entries, self.p = run, config, specs, entries, p
        self.open: dict[str, TrialRun] = {}

    def _open(self, spec: TrialSpec) -> TrialRun:
        if spec.name in self.open:
            return self.open[spec.name]
        while len(self.open) >= OPEN_TRIALS:
            self.open.pop(next(iter(self.open)))
        data = self.run.trial_data(spec)
        trial = TrialRun.open(self.run.writer.path, self.config, spec, data, progress=self.p,
                              siblings=self.run.siblings(spec, self.specs))
        self.open[spec.name] = trial
        return trial

    def _guard(self, spec: TrialSpec, label: str, work: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            work()
        except (KeyboardInterrupt, CacheSpaceError):
            raise
        except Exception as exc:  # a failed trial is recorded; the sweep goes on
            self.open.pop(spec.name, None)
            record_failure(self.run.writer, spec.name, self.entries[spec.name], exc, self.p.say, label)
            return
        entry = self.entries[spec.name]
        if entry["state"] == "done":
            m = entry["metrics"]
            va = m["val"]["accuracy"]
            self.p.say(f"{label} {spec.name}: done at epoch {m.get('epochs_trained')}"
                       f"{' (stopped)' if m.get('stopped') else ''}  val_acc {'-' if va is None else f'{va:.4f}'}"
                       f"  ({clock(time.perf_counter() - t0)})")

    def _done(self, spec: TrialSpec, metrics: dict) -> None:
        self.open.pop(spec.name, None)
        self.entries[spec.name].update(state="done", metrics=metrics)

    def train(self, specs: list[TrialSpec], until: int | None, label: str) -> None:
        for i, spec in enumerate(specs, 1):
            def work(spec=spec):
                trial = self._open(spec)
                trial.train(until)
                if trial.ended:
                    self._done(spec, trial.finish())
                else:
                    trial.pause()

            self.p.say(f"{label}, trial {i}/{len(specs)} {spec.name}")
            self._guard(spec, label, work)

    def finish(self, specs: list[TrialSpec], stops: dict[str, dict], label: str) -> None:
        for spec in specs:
            def work(spec=spec):
                self._done(spec, self._open(spec).finish(stops[spec.name]))

            self._guard(spec, label, work)


class _RayTrials:
    """Trains and evaluates the sweep's trials as Ray tasks, one batch per rung."""

    def __init__(self, run: PreparedRun, config: TrainConfig, specs: list[TrialSpec], entries: dict, p: Progress,
                 opts):
        self.run, self.config, self.specs, self.entries, self.p, self.opts = run, config, specs, entries, p, opts

    def _submit(self, specs: list[TrialSpec], **kw) -> None:
        if not specs:
            return
        jobs = [RayJob(s, self.run.trial_data(s), self.run.siblings(s, self.specs)) for s in specs]
        out = run_trials_ray(self.run.writer.path, self.config, jobs, opts=self.opts, progress=self.p.say, **kw)
        for name, (state, value) in out.items():
            if state == "done":
                self.entries[name].update(state="done", metrics=value)
            elif state == "failed":
                self.run.writer.mark_failed(name, value)
                self.entries[name]["state"] = "failed"

    def train(self, specs: list[TrialSpec], until: int | None, label: str) -> None:
        self.p.say(f"{label}: {len(specs)} trial(s) on Ray")
        self._submit(specs, until=until)

    def finish(self, specs: list[TrialSpec], stops: dict[str, dict], label: str) -> None:
        self._submit(specs, stops=stops)


def _record(writer: RunWriter, schedule: Schedule) -> RungRecord:
    """The saved rung record, or a new one; a record of another schedule is refused."""
    saved = writer.rungs()
    if not saved:
        return RungRecord(rungs=schedule.rungs, rate=schedule.rate)
    record = RungRecord.from_dict(saved)
    if not record.matches(schedule):
        raise RunFolderError(f"{writer.rungs_json} records rungs {list(record.rungs)} at rate {record.rate}, not "
                             f"{list(schedule.rungs)} at rate {schedule.rate}",
                             hint="re-run with the options the sweep was started with, or use a new run folder")
    return record


def _order(specs: list[TrialSpec], signals: dict) -> list[TrialSpec]:
    """The trials, backbones by their signals (best first), each backbone's in plan order."""
    best = [s["backbone"] for s in sorted(signals.values(), key=lambda s: (-s["logme"],
                                                                            -(s["probe_val_accuracy"] or 0.0),
                                                                            s["backbone"]))]
    rank = {b: i for i, b in enumerate(best)}
    return sorted(specs, key=lambda s: (rank.get(s.backbone, len(rank)), specs.index(s)))


def _standings(writer: RunWriter, cfg: TrainConfig, specs: list[TrialSpec], groups: list[str]) -> list[Standing]:
    by_group: dict[str, list[Standing]] = {}
    for s in specs:
        if s.group in groups:
            by_group.setdefault(s.group, []).append(file_standing(writer, cfg, s))
    return [group_standing(g, by_group[g]) if len(by_group[g]) > 1 else replace(by_group[g][0], trial=g)
            for g in groups]


def _waits_at(standing: Standing, epoch: int) -> bool:
    return standing.state == TRAINING and standing.epoch >= epoch


def _say_decision(p: Progress, d, recorded: bool) -> None:
    p.say(f"rung {d.rung} (epoch {d.epoch}){' (recorded)' if recorded else ''}: {len(d.promoted)} of "
          f"{d.contenders} go on: {', '.join(d.promoted) or '-'}")
    for s in d.standings:
        acc = "-" if s.accuracy is None else f"{s.accuracy:.4f}"
        what = ("goes on" if s.trial in d.promoted else "stopped" if s.trial in d.stopped else s.state)
        p.say(f"  {s.trial:<28} epoch {s.epoch}  val_acc {acc}  {s.trainable_params:>12,} trainable  {what}")


def run_halving(run: PreparedRun, config: TrainConfig, specs: list[TrialSpec], schedule: Schedule, entries: dict,
                p: Progress, *, ray=None) -> None:
    """Train ``specs`` by successive halving into ``entries`` ({name: sweep entry}; finished trials
    already filled in). See the module docstring for the order of work."""
    writer = run.writer
    record = _record(writer, schedule)
    if not record.signals:
        p.say("cheap signals first: LogME and the linear probe on each backbone's initial pooled features")
        signals = backbone_signals(run, config, specs, p)
        record.signals = {b: s.to_dict() for b, s in signals.items()}
        record.order = [s.backbone for s in ranked(signals)]
        writer.write_rungs(record.to_dict())
    ordered = _order(specs, record.signals)
    runner = _Trials(run, config, specs, entries, p) if ray is None else _RayTrials(run, config, specs, entries, p, ray)
    groups = list(dict.fromkeys(s.group for s in ordered))
    last = len(schedule.rungs)
    for k, epoch in enumerate(schedule.rungs, 1):
        label = f"rung {k}/{last} (epoch {epoch}{', the full budget' if k == last else ''})"
        todo = [s for s in ordered if s.group in groups and entries[s.name]["state"] is None]
        if k < last:  # a trial already at the rung (a resumed sweep) is not opened again
            todo = [s for s in todo if not _waits_at(file_standing(writer, config, s), epoch)]
        runner.train(todo, None if k == last else epoch, label)
        if k == last:
            break
        decision = record.decision(k)
        if decision is None:
            decision = decide(k, epoch, _standings(writer, config, ordered, groups), schedule.rate)
            record.add(decision)
            writer.write_rungs(record.to_dict())  # recorded before anything acts on it
            _say_decision(p, decision, recorded=False)
        else:
            _say_decision(p, decision, recorded=True)
        stops = [s for s in ordered if s.group in decision.stopped and entries[s.name]["state"] is None]
        runner.finish(stops, {s.name: decision.stop_record(s.group) for s in stops}, f"rung {k}: stopped")
        groups = [g for g in groups if g in decision.promoted]


__all__ = ["run_halving", "file_standing", "OPEN_TRIALS"]
