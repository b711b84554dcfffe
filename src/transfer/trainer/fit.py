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
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .._lazy import import_keras
from ..fsutil import read_json
from ..models.freeze import apply_freeze, count_params
from ..progress import ProgressLike, as_progress
from ..runfolder import RunWriter, TrialPaths
from . import loop
from .config import TrainConfig
from .epochs import EpochHooks, EpochRecorder, StageEnd, TrialState, load_weights, restore_optimizer, restore_rng
from .head_init import lp_ft_head, probe_stage
from .measure import TrainedTrial, evaluate_trial
from .plan import (Stage, TrialData, TrialSpec, plan_stages, resume_point, stage_bounds, stage_epochs, trial_name,
                   uses_lp_ft)
from .stage_data import TrainRows, stage_data
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
    opt = (keras.optimizers.SGD(learning_rate=lr, momentum=0.9) if cfg.optimizer == "sgd"
           else keras.optimizers.Adam(learning_rate=lr))
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
    train_rows: TrainRows | None = None


def _run_stage(trial: Trial, stages: list[Stage], index: int, state: TrialState, history: list) -> _StageOutcome:
    """Train stage ``index`` (from where a resumed trial left it); ``state`` and ``history`` are
    updated in place."""
    stage = stages[index]
    summary = apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    resumed_stage = state.stage == stage.name
    state.stage = stage.name
    start, end = stage_epochs(index, stages, state.epoch)
    first = end - stage.epochs  # the epoch count before the stage's first epoch
    if stage.probe:
        if start >= end:
            return _StageOutcome(asdict(summary))
        probe = probe_stage(trial, stage, state, history, end)
        return _StageOutcome(asdict(summary), head=probe.head_record(), cache=probe.cache, train_rows=probe.train_rows)
    head = lp_ft_head(trial, stage) if uses_lp_ft(trial.cfg, trial.spec) and state.epoch == 0 else None
    data = stage_data(trial, stage)
    _compile(data.model, trial.cfg, stage.lr)  # recompile after every change of `trainable`
    saved_optimizer = trial.files.paths.optimizer_at(state.epoch)
    if resumed_stage and start > first and saved_optimizer.is_file():
        if not restore_optimizer(data.model.optimizer, data.model.trainable_variables, saved_optimizer):
            trial.say("note: the saved optimizer state does not fit; the optimizer starts afresh")
    if index > 0 and not resumed_stage:
        state.wait, state.stopped = 0, False
    hooks = EpochHooks(sources=data.sources, refresh_bn=data.refresh_bn, validate=data.validate)
    recorder = EpochRecorder(trial.files, (trial.model, data.model), state, history,
                             end=StageEnd(end, stage_bounds(stages)[-1], trial.cfg.patience), hooks=hooks,
                             say=trial.progress.say)
    callbacks = [recorder.callback()]
    if trial.cfg.tensorboard:
        callbacks.append(import_keras().callbacks.TensorBoard(log_dir=str(trial.files.paths.tensorboard)))
    if start < end:
        loop.fit(data.model, data.train, initial_epoch=start, epochs=end, callbacks=callbacks)
    batchnorm = data.refresh_bn.record() if data.refresh_bn is not None else None
    return _StageOutcome(asdict(summary), head=head, cache=data.record, batchnorm=batchnorm,
                         train_rows=data.train_rows)


def _train_trial(trial: Trial) -> TrainedTrial:
    """Train every stage of a trial (resuming after the last committed epoch); writes ``model.keras``."""
    trial.writer.write_trial_meta(trial.spec.name, trial.meta())
    stages = plan_stages(trial.cfg, trial.spec)
    state = TrialState.load(trial.files.paths.state_json) or TrialState()
    history = _resume(trial, state)
    if not history:
        state = TrialState()
    trial.files.status("running", state.epoch)
    point = resume_point(state.epoch, state.stopped, stage_bounds(stages))
    state.epoch = point.epoch
    head, cache, batchnorm = {"init": "resumed" if history else "random"}, None, None
    freeze, train_rows = None, None
    for index in range(point.stage, len(stages)):
        out = _run_stage(trial, stages, index, state, history)
        freeze, train_rows = out.freeze, out.train_rows
        head = out.head if out.head is not None else head
        cache = out.cache if out.cache is not None else cache
        batchnorm = out.batchnorm if out.batchnorm is not None else batchnorm
        if state.stopped and index == len(stages) - 1:
            break
        state.stopped = False
    trial.files.write_model(trial.model, state)  # the best epoch's weights (the last ones if none improved)
    return TrainedTrial(history=history, best_epoch=int(state.best_epoch), last_epoch=int(state.epoch),
                        params=count_params(trial.model), freeze=freeze, head=head, cache=cache, batchnorm=batchnorm,
                        probe_only=all(s.probe for s in stages), train_rows=train_rows)


def run_trial(run_dir: str | os.PathLike, cfg: TrainConfig, spec: TrialSpec, data: TrialData, *,
              progress: ProgressLike = None, siblings=()) -> dict:
    """Train (or resume, or skip) one trial and return its metrics.

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
    p = as_progress(progress)
    writer = RunWriter(run_dir)
    paths = writer.trial_paths(spec.name)
    if paths.finished():
        return read_json(paths.metrics_json)
    strategy = make_strategy(cfg.strategy)
    if strategy is None:
        trial = open_trial(writer, cfg, spec, data, siblings=siblings, progress=p)
        trained = _train_trial(trial)
    else:
        p.say(f"  [{spec.name}] {cfg.strategy} strategy: {strategy.num_replicas_in_sync} replica(s) on "
              f"{', '.join(strategy.extended.worker_devices)}")
        with strategy.scope():
            trial = open_trial(writer, cfg, spec, data, siblings=siblings, progress=p,
                               replicas=int(strategy.num_replicas_in_sync))
            trained = _train_trial(trial)
    return evaluate_trial(trial, trained)


def mark_failed(run_dir: str | os.PathLike, name: str, error: str) -> None:
    """Record a failed trial in its ``status.json``."""
    RunWriter(run_dir).mark_failed(name, error)


__all__ = ["TrialSpec", "TrialData", "Stage", "trial_name", "plan_stages", "run_trial", "is_finished",
           "read_history", "mark_failed", "build_trial_model"]
