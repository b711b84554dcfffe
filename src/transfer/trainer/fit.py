"""Run one trial of a sweep into ``RUN/trials/<name>/`` (layout: docs/design.md).

Order of work in a trial (:func:`run_trial`):

1. Plan it (:mod:`transfer.trainer.plan`): its stages (:func:`~transfer.trainer.plan.plan_stages`),
   the epoch each ends at, and where a resumed trial continues.
2. Open it (:func:`transfer.trainer.trial.open_trial`): ``keras.utils.set_random_seed(seed)``
   and TensorFlow op determinism; build the classifier and load the shared initial weights
   ``RUN/init/<backbone>-<init>.weights.h5`` (written by the first trial of that
   backbone + init), so every trial of a backbone starts from the same weights; the
   frozen-prefix cache builder, keyed by those weights. Under ``--strategy mirrored`` this
   and the training run inside the strategy's scope.
3. Write ``trial.json``; load the resume checkpoint when there is one (weights,
   random-generator states; the history up to it).
4. For each stage left: ``apply_freeze`` (random-init trials: everything trainable,
   BatchNorm trainable), then find the :class:`~transfer.models.split.Cut` between the
   frozen prefix and the part that trains.

   * A stage that trains only the softmax head on pooled features fits it to convergence
     (:func:`transfer.trainer.head_init.probe_stage`, the fit in :mod:`transfer.trainer.probe`):
     one full-batch fit, one history row.
   * Otherwise pretrained starts get the linear probe as their initial head (LP-FT,
     :func:`transfer.trainer.head_init.lp_ft_head`) unless it is turned off, and the
     trainable part trains epoch by epoch on the data of :mod:`transfer.trainer.stage_data`:
     the frozen prefix's cached output (:mod:`transfer.trainer.cache`) or, with the cache
     off or augmentation without cached views, images through the prefix in inference mode
     (a stage with no frozen part reads its images' decoded pixels from a cache instead of
     decoding them every epoch, unless augmentation or the cache is off). The epochs run in
     :mod:`transfer.trainer.loop` (the model's own ``train_step``; ``Model.fit`` under a
     distribution strategy). :class:`~transfer.trainer.epochs.EpochRecorder` recomputes
     population BatchNormalization statistics (when they train), validates, and writes the
     history, the best model, the resume checkpoint and the resume state after every epoch.
5. Write ``model.keras`` from the best epoch's weights.
6. Evaluate it (:func:`transfer.trainer.measure.evaluate_trial`) on the train / val / test
   images, the way a user runs it -> ``metrics.json``; ``curves.png``; ``status.json`` =
   done. The resume checkpoint is then removed.

:func:`run_trial` does all of it; :class:`TrialRun` does it in parts, for a sweep that trains
its trials rung by rung (:mod:`transfer.trainer.halving`): ``train(until=E)`` trains up to
epoch ``E`` and keeps the open stage (model, data, compiled optimizer, traced step), so the
next ``train`` continues without building or tracing anything again; ``finish(stopped=...)``
does steps 5 and 6 at whatever epoch the trial stands, recording why it stopped there.
"""

from __future__ import annotations

import os
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from .._lazy import import_keras
from ..errors import TransferError
from ..fsutil import read_json
from ..models.freeze import apply_freeze, count_params
from ..progress import ProgressLike, as_progress
from ..runfolder import RunWriter, TrialPaths
from . import loop
from .config import TrainConfig
from .epochs import EpochHooks, EpochRecorder, StageEnd, TrialState, load_weights, restore_optimizer, restore_rng
from .head_init import linear_probe, lp_ft_head, probe_stage
from .measure import TrainedTrial, evaluate_trial
from .optim import make_optimizer
from .plan import (Stage, TrialData, TrialSpec, plan_stages, resume_point, stage_bounds, stage_epochs, trial_name,
                   uses_lp_ft)
from .stage_data import stage_data
from .strategy import make_strategy
from .trial import Trial, build_trial_model, open_trial


def is_finished(trial_dir: Path) -> bool:
    """A trial is finished when status says done and model.keras + metrics.json exist."""
    return TrialPaths(Path(trial_dir)).finished()


def read_history(path: Path) -> list[dict]:
    """Rows of a ``history.csv`` (numbers as float, epoch as int)."""
    return TrialPaths(Path(path).parent).history() if Path(path).name == "history.csv" else []


def _compile(model, cfg: TrainConfig, lr: float) -> None:
    keras = import_keras()
    opt = make_optimizer(cfg, lr)
    if cfg.loss == "l1":
        loss = keras.losses.MeanAbsoluteError(name="l1")
        acc = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(name="crossentropy")
        acc = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=opt, loss=loss, metrics=[acc])
    # the optimizer's slot variables now, not inside the first traced step: a tf.function
    # that creates variables is traced twice (MobileNetV2's train step: 26 s -> 14 s to trace)
    opt.build(model.trainable_variables)


def _resume(trial: Trial, state: TrialState) -> list[dict]:
    """Load the resume checkpoint into the trial (model, random-generator states); the history up to it."""
    paths = trial.files.paths
    if state.epoch == 0:
        return []
    if not load_weights(trial.model, paths.weights_at(state.epoch)):
        trial.say(f"note: the checkpoint of epoch {state.epoch} ({paths.weights_at(state.epoch).name}) is missing or "
                  "not this model's; the trial starts again from its first epoch")
        return []
    trial.say(f"resuming after epoch {state.epoch}")
    restore_rng(trial.model, state.rng)
    return [r for r in paths.history() if r["epoch"] <= state.epoch]


@dataclass(frozen=True)
class _StageOutcome:
    """What one stage leaves for the evaluation (None: the stage did not change it)."""

    freeze: dict
    head: dict | None = None
    cache: dict | None = None
    batchnorm: dict | None = None
    rows: dict | None = None


class _OpenStage:
    """One stage of a trial opened for training: its freeze applied, its head started, its data
    read and its model compiled, kept while the trial is open so that training it further (the
    next rung of a sweep) builds and traces nothing again."""

    def __init__(self, run: "TrialRun", index: int):
        trial, state = run.trial, run.state
        self.run, self.index = run, index
        self.stage = stage = run.stages[index]
        summary = apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by,
                               train_bn=stage.train_bn)
        self.freeze = asdict(summary)
        resumed_stage = state.stage == stage.name
        state.stage = stage.name
        state.trainable_params = int(summary.trainable_params)
        self.start, self.end = stage_epochs(index, run.stages, state.epoch)
        first = self.end - stage.epochs  # the epoch count before the stage's first epoch
        self.data = self.recorder = self.step = self.probe = None
        self.callbacks: list = []
        self.head = None
        if index > 0 and not resumed_stage:
            state.wait, state.stopped = 0, False
        if stage.probe:
            return
        if uses_lp_ft(trial.cfg, trial.spec) and state.epoch == 0:
            self.head = state.head = lp_ft_head(trial, stage)
        self.data = data = stage_data(trial, stage)
        _compile(data.model, trial.cfg, stage.lr)  # recompile after every change of `trainable`
        saved_optimizer = trial.files.paths.optimizer_at(state.epoch)
        if resumed_stage and self.start > first and saved_optimizer.is_file():
            if not restore_optimizer(data.model.optimizer, data.model.trainable_variables, saved_optimizer):
                trial.say("note: the saved optimizer state does not fit; the optimizer starts afresh")
        hooks = EpochHooks(sources=data.sources, refresh_bn=data.refresh_bn, validate=data.validate)
        self.recorder = EpochRecorder(trial.files, (trial.model, data.model), state, run.history,
                                      end=StageEnd(self.end, run.budget, trial.cfg.patience), hooks=hooks,
                                      say=trial.progress.say)
        self.callbacks = [self.recorder.callback()]
        if trial.cfg.tensorboard:
            self.callbacks.append(import_keras().callbacks.TensorBoard(log_dir=str(trial.files.paths.tensorboard)))
        self.step = loop.StepFunction(data.model, "train_step")  # traced once for the stage, however often it trains

    @property
    def done(self) -> bool:
        """Nothing is left to train in this stage (its last epoch, or early stopping, ended it)."""
        state = self.run.state
        return state.epoch >= self.end or state.stopped

    def train(self, goal: int) -> None:
        """Train up to epoch ``min(goal, stage end)`` (a probe stage: its one step)."""
        run, state = self.run, self.run.state
        if self.stage.probe:
            if state.epoch < self.end:
                self.probe = probe_stage(run.trial, self.stage, state, run.history, self.end)
            return
        stop = min(int(goal), self.end)
        if state.epoch < stop and not state.stopped:
            loop.fit(self.data.model, self.data.train, initial_epoch=max(state.epoch, self.start), epochs=stop,
                     callbacks=self.callbacks, step=self.step)

    def outcome(self) -> _StageOutcome:
        """What the stage leaves for the evaluation. A probe stage that ran in another process gives
        its records from the saved probe (the fit is not repeated, no history row is added)."""
        if self.stage.probe:
            fit = self.probe or linear_probe(self.run.trial, self.stage)
            return _StageOutcome(self.freeze, head=fit.head_record(), cache=fit.cache, rows=fit.rows)
        refresh = self.data.refresh_bn
        batchnorm = refresh.record() if refresh is not None else None
        return _StageOutcome(self.freeze, head=self.head, cache=self.data.record,
                             batchnorm=batchnorm or self.run.state.batchnorm, rows=self.data.rows)


class TrialRun:
    """One trial opened for training, which may stop at any epoch and go on later.

    :meth:`train` trains up to an epoch (or to the end of its plan); :meth:`finish` writes
    ``model.keras`` from the best epoch so far and evaluates it into ``metrics.json``. Between
    two calls of :meth:`train` the open stage (model, data, compiled optimizer, traced step) is
    kept, so a sweep that trains its trials rung by rung in one process builds and traces each
    trial once; reopened in another process, a trial continues from its checkpoint, with the
    history of an uninterrupted run.

    Example::

        run = TrialRun.open("runs/d", cfg, spec, data)
        run.train(until=1)          # the first rung
        metrics = run.finish()      # or run.train() to the end of its plan, then finish()
    """

    def __init__(self, trial: Trial, strategy=None):
        self.trial, self.strategy = trial, strategy
        self.stages = plan_stages(trial.cfg, trial.spec)
        self.bounds = stage_bounds(self.stages)
        trial.writer.write_trial_meta(trial.spec.name, trial.meta())
        state = TrialState.load(trial.files.paths.state_json) or TrialState()
        self.history = _resume(trial, state)
        if not self.history:
            state = TrialState()
        self.state = state
        trial.files.status("running", state.epoch)
        point = resume_point(state.epoch, state.stopped, self.bounds)
        state.epoch = point.epoch
        self.next_stage = point.stage
        self.open_stage: _OpenStage | None = None
        self.last: _StageOutcome | None = None  # the outcome of the last stage that ended in this process
        self.head = state.head or {"init": "resumed" if self.history else "random"}
        self.cache = None

    @classmethod
    def open(cls, run_dir: str | os.PathLike, cfg: TrainConfig, spec: TrialSpec, data: TrialData, *,
             progress: ProgressLike = None, siblings=()) -> "TrialRun":
        """Open (or reopen) a trial; see :func:`run_trial` for the arguments."""
        p = as_progress(progress)
        writer = RunWriter(run_dir)
        strategy = make_strategy(cfg.strategy)
        if strategy is None:
            return cls(open_trial(writer, cfg, spec, data, siblings=siblings, progress=p))
        p.say(f"  [{spec.name}] {cfg.strategy} strategy: {strategy.num_replicas_in_sync} replica(s) on "
              f"{', '.join(strategy.extended.worker_devices)}")
        with strategy.scope():
            trial = open_trial(writer, cfg, spec, data, siblings=siblings, progress=p,
                               replicas=int(strategy.num_replicas_in_sync))
            return cls(trial, strategy)

    @property
    def budget(self) -> int:
        """The epochs of its whole plan (epochs count across stages)."""
        return self.bounds[-1]

    @property
    def epoch(self) -> int:
        return int(self.state.epoch)

    @property
    def ended(self) -> bool:
        """Its training is over: the last stage's last epoch, or early stopping in the last stage."""
        return self.next_stage >= len(self.stages)

    def pause(self) -> None:
        """Say in ``status.json`` that the trial waits (at a rung of the sweep) with epochs left."""
        self.trial.files.status("paused", self.epoch)

    def _scope(self):
        return self.strategy.scope() if self.strategy is not None else nullcontext()

    def train(self, until: int | None = None) -> None:
        """Train up to epoch ``until`` (None: to the end of the plan), stage after stage."""
        goal = self.budget if until is None else min(int(until), self.budget)
        with self._scope():
            while not self.ended and self.state.epoch < goal:
                if self.open_stage is None:
                    self.open_stage = _OpenStage(self, self.next_stage)
                stage = self.open_stage
                if stage.done:  # reopened at its end: nothing to train
                    self._close_stage()
                    continue
                stage.train(goal)
                if stage.done:
                    self._close_stage()
                elif self.state.epoch < goal:  # pragma: no cover - the loop trains to the goal or stops
                    break

    def _close_stage(self) -> None:
        stage = self.open_stage
        self.last = stage.outcome()
        if self.last.head is not None:  # how the head started stays known after the stage (and on resume)
            self.head = self.state.head = self.last.head
        stopped_last = self.state.stopped and stage.index == len(self.stages) - 1
        self.open_stage = None
        self.next_stage = len(self.stages) if stopped_last else stage.index + 1
        if not stopped_last:
            self.state.stopped = False

    def _records(self) -> _StageOutcome | None:
        """The records of the stage the trial ended in (or stands in), opening it when this process
        has not (a trial reopened to be evaluated trains nothing)."""
        if self.open_stage is not None:
            return self.open_stage.outcome()
        if self.last is not None:
            return self.last
        if not self.history:
            return None
        with self._scope():
            stage = _OpenStage(self, min(self.next_stage, len(self.stages) - 1))
            return stage.outcome()

    def finish(self, stopped: dict | None = None) -> dict:
        """Write ``model.keras`` from the best epoch so far and evaluate it (``metrics.json``).

        Args:
            stopped: why the trial stops before the end of its plan (``stopped`` of
                ``metrics.json``: the epoch, the rung, its place); None when it ended.

        Returns:
            The content of ``metrics.json``.
        """
        out = self._records()
        head = out.head if out is not None and out.head is not None else self.head
        with self._scope():
            self.trial.files.write_model(self.trial.model, self.state)  # the best epoch (the last if none improved)
        trained = TrainedTrial(history=self.history, best_epoch=int(self.state.best_epoch),
                               last_epoch=int(self.state.epoch), params=count_params(self.trial.model),
                               freeze=out.freeze if out else None, head=head, cache=out.cache if out else None,
                               batchnorm=out.batchnorm if out else self.state.batchnorm,
                               probe_only=all(s.probe for s in self.stages),
                               rows=(out.rows or {}) if out else {}, budget=self.budget, stopped=stopped)
        self.open_stage = None
        return evaluate_trial(self.trial, trained)


def run_trial(run_dir: str | os.PathLike, cfg: TrainConfig, spec: TrialSpec, data: TrialData, *,
              progress: ProgressLike = None, siblings=()) -> dict:
    """Train (or resume, or skip) one trial to the end of its plan and return its metrics.

    With ``cfg.strategy == "mirrored"`` the model is built, loaded, compiled and trained
    inside a ``tf.distribute.MirroredStrategy`` scope (one replica per device; see
    :func:`transfer.trainer.strategy.make_strategy`); the final evaluation runs outside it,
    on one device, so the metrics are exact. The run folder it writes is the same.

    Args:
        run_dir: the run folder.
        cfg: the resolved configuration.
        spec: the trial (backbone, init, fraction, image size, ...).
        data: its images (data folder, class names, train / val / test samples).
        progress: receives one line per epoch (a :class:`~transfer.progress.Progress`,
            a line callable, or None for silence).
        siblings: trainable fractions of the sweep's other trials of this backbone, initial
            weights and fold: their frozen-prefix caches are built in the same pass.

    Returns:
        The content of ``metrics.json``.

    Raises:
        TransferError: bad backbone / weights / size (from the model builder), not enough
            disk for the cache.

    Example::

        data = TrialData.of("data/d", names, train=tr, val=va, test=te)
        metrics = run_trial("runs/d", cfg, spec, data)
    """
    paths = RunWriter(run_dir).trial_paths(spec.name)
    if paths.finished():
        return read_json(paths.metrics_json)
    run = TrialRun.open(run_dir, cfg, spec, data, progress=progress, siblings=siblings)
    run.train()
    return run.finish()


def failure_text(exc: BaseException) -> str:
    """The one-line record of a trial that raised (``status.json``'s ``error``)."""
    return exc.message if isinstance(exc, TransferError) else f"{type(exc).__name__}: {exc}"


def record_failure(writer: RunWriter, name: str, entry: dict, exc: BaseException, say, label: str) -> None:
    """A trial that raised, recorded so the sweep can go on: its ``status.json`` (failed, with
    :func:`failure_text`), the sweep's ``entry`` state and one progress line (the traceback too
    with ``TRANSFER_DEBUG=1``). Callers re-raise Ctrl-C and a full cache disk before this."""
    msg = failure_text(exc)
    if os.environ.get("TRANSFER_DEBUG") == "1":
        traceback.print_exception(exc)
    writer.mark_failed(name, msg)
    entry["state"] = "failed"
    say(f"{label} {name}: FAILED: {msg}")


def mark_failed(run_dir: str | os.PathLike, name: str, error: str) -> None:
    """Record a failed trial in its ``status.json``."""
    RunWriter(run_dir).mark_failed(name, error)


__all__ = ["TrialSpec", "TrialData", "Stage", "trial_name", "plan_stages", "run_trial", "TrialRun", "is_finished",
           "read_history", "mark_failed", "build_trial_model"]
