"""Run one trial of a sweep into ``RUN/trials/<name>/`` (layout: docs/design.md).

Order of work in a trial:

1. ``keras.utils.set_random_seed(seed)`` and TensorFlow op determinism.
2. Build the classifier; load the shared initial weights
   ``RUN/init/<backbone>-<init>.weights.h5`` (written by the first trial of that
   backbone + init), so every trial of a backbone starts from the same weights.
3. For each stage (:func:`plan_stages`): ``apply_freeze`` (random-init trials: everything
   trainable, BatchNorm trainable), then compile. With ``two_stage``: head-only epochs
   first, then unfreeze to the fraction and recompile with ``fine_tune_lr``.
4. Train epoch by epoch; :class:`~transfer.trainer.epochs.EpochRecorder` writes the
   history, the best model, the resume checkpoint and the resume state after every epoch.
5. Evaluate ``model.keras`` (the best epoch) on train / val / test -> ``metrics.json``;
   ``curves.png``; ``status.json`` = done. The resume checkpoint is then removed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .._lazy import import_keras, import_tensorflow
from ..fsutil import atomic_path, read_json
from ..progress import ProgressLike, as_progress
from ..runfolder import RunLayout, RunWriter
from .config import TrainConfig


@dataclass(frozen=True)
class TrialSpec:
    """What one trial trains (one column of the sweep table, or one fold of it)."""

    name: str
    group: str
    fold: int | None
    backbone: str
    init: str  # pretrained | random | scratch
    weights: str  # imagenet | none | PATH
    trainable: float
    freeze_by: str
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Stage:
    """A part of a trial with one freeze and one learning rate (``two_stage`` has two)."""

    name: str
    epochs: int
    fraction: float
    lr: float
    train_bn: bool


@dataclass
class TrainedTrial:
    """What training left for the final evaluation (see :func:`run_trial`)."""

    history: list[dict]
    best_epoch: int
    last_epoch: int
    params: tuple[int, int]
    freeze: dict | None


def trial_name(backbone: str, trainable: float | None, *, random_init: bool = False, fold: int | None = None) -> str:
    """Trial name of docs/design.md: ``mobilenet_v2-t030``, ``arc2-random``, ``...-f2``.

    Example::

        trial_name("mobilenet_v2", 0.3)              # 'mobilenet_v2-t030'
        trial_name("arc2", 1.0, random_init=True)    # 'arc2-random'
    """
    base = f"{backbone}-random" if random_init else f"{backbone}-t{int(round(float(trainable) * 100)):03d}"
    return f"{base}-f{fold}" if fold else base


def is_finished(trial_dir: Path) -> bool:
    """A trial is finished when status says done and model.keras + metrics.json exist."""
    from ..runfolder import TrialPaths

    return TrialPaths(Path(trial_dir)).finished()


def read_history(path: Path) -> list[dict]:
    """Rows of a ``history.csv`` (numbers as float, epoch as int)."""
    from ..runfolder import TrialPaths

    return TrialPaths(Path(path).parent).history() if Path(path).name == "history.csv" else []


def plan_stages(cfg: TrainConfig, spec: TrialSpec) -> list[Stage]:
    """The stages of a trial: one, or head-only then fine-tuning with ``two_stage``.

    Without pretrained weights (``init`` random or scratch) the BatchNormalization
    statistics are the initial mean 0 / variance 1, not knowledge worth keeping: the
    unfrozen part of a one-stage trial learns them.
    """
    lr = cfg.lr_for(spec.trainable, spec.init == "pretrained")
    if spec.init == "random":
        return [Stage("main", cfg.epochs, 1.0, lr, True)]
    if cfg.two_stage and spec.trainable > 0 and cfg.head_epochs > 0:
        return [Stage("head", cfg.head_epochs, 0.0, lr, False),
                Stage("finetune", cfg.epochs, spec.trainable, cfg.fine_tune_lr_for(lr), cfg.train_bn)]
    train_bn = cfg.train_bn or spec.init == "scratch"
    return [Stage("main", cfg.epochs, spec.trainable, lr, train_bn)]


# -- model -------------------------------------------------------------------------------

def _set_determinism(seed: int) -> None:
    tf = import_tensorflow()
    keras = import_keras()
    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


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


def build_trial_model(run_dir: Path, cfg: TrainConfig, spec: TrialSpec, num_classes: int):
    """Build the classifier of a trial and load (or create) the shared initial weights."""
    from ..models.build import build_classifier

    _set_determinism(cfg.seed)
    weights = "none" if spec.init in ("random", "scratch") else spec.weights
    h, w = spec.image_size
    model, info = build_classifier(
        spec.backbone, input_shape=(h, w, 3), weights=weights, num_classes=num_classes,
        dropout=cfg.dropout, seed=cfg.seed,
    )
    init_path = RunLayout(run_dir).init_weights(spec.backbone, spec.init)
    if init_path.is_file():
        model.load_weights(init_path)
    else:
        with atomic_path(init_path, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
    return model, info


def _fast_bn_statistics(model, momentum: float = 0.9) -> None:
    """Let BatchNormalization moving statistics catch up within a short run.

    Keras applications use momentum 0.99 (MobileNetV2: 0.999). From random weights,
    a few hundred steps then leave the moving mean / variance near their initial 0 / 1
    and validation (inference mode) collapses to chance while training accuracy rises.
    0.9 is PyTorch's default and converges in tens of steps.
    """
    keras = import_keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and layer.momentum > momentum:
            layer.momentum = momentum


def _apply_stage(model, info, cfg: TrainConfig, spec: TrialSpec, stage: Stage):
    from ..models.freeze import apply_freeze

    summary = apply_freeze(model, info, stage.fraction, by=spec.freeze_by, train_bn=stage.train_bn)
    if spec.init in ("random", "scratch"):
        _fast_bn_statistics(model)
    _compile(model, cfg, stage.lr)  # recompile after every change of `trainable`
    return summary


# -- data --------------------------------------------------------------------------------

def _source(data_root, samples, cfg: TrainConfig, spec: TrialSpec, *, train: bool, replicas: int = 1):
    from ..data.batches import BatchSource

    # Under a mirrored strategy every batch must split evenly over the replicas (an
    # empty or uneven per-replica batch fails inside TensorFlow): batches are padded
    # with repeats of their own images. Only training and the per-epoch validation see
    # the padding; the final metrics are computed on one device without it.
    return BatchSource(data_root, list(samples), cfg.batch_size, tuple(spec.image_size), shuffle=train,
                       seed=cfg.seed, augment=tuple(cfg.augment) if train else (), drop_remainder=False,
                       pad_to_multiple=replicas)


def _dataset(source, cfg: TrainConfig, num_classes: int):
    from .keras_data import make_dataset

    return make_dataset(source, num_classes=num_classes, one_hot=cfg.loss == "l1", workers=cfg.workers)


# -- the trial ---------------------------------------------------------------------------

def run_trial(
    run_dir: str | os.PathLike,
    cfg: TrainConfig,
    spec: TrialSpec,
    *,
    data_root: str | os.PathLike,
    class_names: Sequence[str],
    train: Sequence,
    val: Sequence,
    test: Sequence,
    progress: ProgressLike = None,
) -> dict:
    """Train (or resume, or skip) one trial and return its metrics.

    With ``cfg.strategy == "mirrored"`` the model is built, loaded, compiled and trained
    inside a ``tf.distribute.MirroredStrategy`` scope (one replica per device; see
    :func:`transfer.trainer.strategy.make_strategy`); the final evaluation runs outside it,
    on one device, so the metrics are exact. The run folder it writes is the same.

    Args:
        run_dir: the run folder.
        cfg: the resolved configuration.
        spec: the trial (backbone, init, fraction, image size, ...).
        data_root: the dataset folder the samples are relative to.
        class_names: class names (index = label).
        train, val, test: lists of ``transfer.data.folder.Sample``.
        progress: receives one line per epoch (a :class:`~transfer.progress.Progress`,
            a line callable, or None for silence).

    Returns:
        The content of ``metrics.json``.

    Raises:
        TransferError: bad backbone / weights / size (from the model builder).

    Example::

        metrics = run_trial("runs/d", cfg, spec, data_root="data/d", class_names=names,
                            train=tr, val=va, test=te)
    """
    p = as_progress(progress)
    writer = RunWriter(run_dir)
    paths = writer.trial_paths(spec.name)
    if paths.finished():
        return read_json(paths.metrics_json)
    kw = dict(data_root=Path(data_root), class_names=list(class_names), train=train, val=val, progress=p)
    if cfg.strategy == "default":
        trained = _train_trial(writer, cfg, spec, replicas=1, **kw)
    else:
        from .strategy import make_strategy

        strategy = make_strategy(cfg.strategy)
        p.say(f"  [{spec.name}] {cfg.strategy} strategy: {strategy.num_replicas_in_sync} replica(s) on "
              f"{', '.join(strategy.extended.worker_devices)}")
        with strategy.scope():
            trained = _train_trial(writer, cfg, spec, replicas=int(strategy.num_replicas_in_sync), **kw)
    return _evaluate_trial(writer, cfg, spec, trained, data_root=Path(data_root), num_classes=len(class_names),
                           splits=(("train", train), ("val", val), ("test", test)))


def _trial_meta(spec: TrialSpec, info, num_classes: int) -> dict:
    return {"name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
            "init": spec.init, "weights": spec.weights, "trainable": spec.trainable,
            "freeze_by": spec.freeze_by, "image_size": list(spec.image_size),
            "gradcam_layer": info.gradcam_layer, "feature_dim": int(info.feature_dim),
            "num_classes": num_classes, "preprocess": info.preprocess}


def _resume(files, state, model, say):
    """The resume checkpoint's model and the history up to its epoch (or the fresh model)."""
    keras = import_keras()
    from ..models import build as _build  # noqa: F401  (registers the custom layers)

    if state.epoch == 0 or not files.paths.last_keras.is_file():
        return model, []
    say(f"  [{files.name}] resuming after epoch {state.epoch}")
    model = keras.saving.load_model(files.paths.last_keras, compile=True)
    return model, [r for r in files.paths.history() if r["epoch"] <= state.epoch]


def _stage_bounds(stages: list[Stage]) -> list[int]:
    """The epoch each stage ends at (epochs count across stages)."""
    out, total = [], 0
    for s in stages:
        total += s.epochs
        out.append(total)
    return out


def _next_stage(state, bounds: list[int]) -> int:
    """Index of the stage a (resumed) trial continues with (``len(bounds)``: none left)."""
    i = sum(1 for b in bounds if state.epoch >= b)
    if state.stopped and i < len(bounds):  # early stopping ended stage i
        if i == len(bounds) - 1:
            return len(bounds)
        state.epoch = bounds[i]
        i += 1
    return i


def _train_trial(writer: RunWriter, cfg: TrainConfig, spec: TrialSpec, *, data_root: Path, class_names: list,
                 train, val, progress, replicas: int) -> TrainedTrial:
    """Train every stage of a trial (resuming after the last committed epoch)."""
    keras = import_keras()
    from ..models.freeze import count_params
    from .epochs import EpochRecorder, TrialFiles, TrialState

    files = TrialFiles(writer, spec.name, data_root)
    files.paths.dir.mkdir(parents=True, exist_ok=True)
    writer.remove_leftovers(spec.name)
    model, info = build_trial_model(writer.path, cfg, spec, len(class_names))
    writer.write_trial_meta(spec.name, _trial_meta(spec, info, len(class_names)))
    stages = plan_stages(cfg, spec)
    bounds = _stage_bounds(stages)
    state = TrialState.load(files.paths.state_json) or TrialState()
    model, history = _resume(files, state, model, progress.say)

    train_src = _source(data_root, train, cfg, spec, train=True, replicas=replicas)
    sources = [train_src]
    train_ds, val_ds = _dataset(train_src, cfg, len(class_names)), None
    if len(val):
        val_src = _source(data_root, val, cfg, spec, train=False, replicas=replicas)
        sources.append(val_src)
        val_ds = _dataset(val_src, cfg, len(class_names))
    files.status("running", state.epoch)

    freeze = None
    for si in range(_next_stage(state, bounds), len(stages)):
        stage = stages[si]
        if state.stage != stage.name:
            freeze = asdict(_apply_stage(model, info, cfg, spec, stage))
            state.stage = stage.name
            if si > 0:
                state.wait, state.stopped = 0, False
        start = max(state.epoch, bounds[si] - stage.epochs)
        recorder = EpochRecorder(files, model, state, history, stage_end=bounds[si], total=bounds[-1],
                                 patience=cfg.patience, monitor="val_loss" if val_ds is not None else "loss",
                                 sources=sources, say=progress.say)
        callbacks = [recorder]
        if cfg.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(files.paths.tensorboard)))
        if start < bounds[si]:
            model.fit(train_ds, validation_data=val_ds, initial_epoch=start, epochs=bounds[si],
                      callbacks=callbacks, verbose=0, shuffle=False)
        if state.stopped and si == len(stages) - 1:
            break
        state.stopped = False

    if not files.paths.model_keras.is_file():  # no epoch improved (NaN losses): keep the last model
        files.save_model(model, files.paths.model_keras)
    return TrainedTrial(history=history, best_epoch=int(state.best_epoch), last_epoch=int(state.epoch),
                        params=count_params(model), freeze=freeze)


def _evaluate_trial(writer: RunWriter, cfg: TrainConfig, spec: TrialSpec, trained: TrainedTrial, *,
                    data_root: Path, num_classes: int, splits) -> dict:
    """Evaluate the trial's best model on every split and write ``metrics.json`` / ``status.json``."""
    from ..models.build import load_model
    from .epochs import TrialFiles

    files = TrialFiles(writer, spec.name, data_root)
    best = load_model(files.paths.model_keras)
    _compile(best, cfg, 1e-3)
    metrics: dict = {}
    for split, samples in splits:
        if not len(samples):
            metrics[split] = {"accuracy": None, "loss": None}
            continue
        src = _source(data_root, samples, cfg, spec, train=False)
        res = best.evaluate(_dataset(src, cfg, num_classes), verbose=0, return_dict=True)
        metrics[split] = {"accuracy": float(res["accuracy"]), "loss": float(res["loss"])}
        files.bad_files(src.failed)
    p_tr, p_nt = trained.params
    secs = [r["seconds"] for r in trained.history if r.get("seconds") is not None]
    metrics.update({
        "params": {"trainable": p_tr, "non_trainable": p_nt, "total": p_tr + p_nt},
        "seconds_per_epoch": (sum(secs) / len(secs)) if secs else None,
        "epochs_run": len(trained.history),
        "best_epoch": trained.best_epoch,
        "freeze": trained.freeze,
    })
    if trained.history:
        from ..plots import plot_curves

        plot_curves(trained.history, files.paths.curves_png, title=spec.name)
    writer.write_metrics(spec.name, metrics)
    writer.write_status(spec.name, "done", trained.last_epoch)
    writer.remove_resume_checkpoint(spec.name)
    return metrics


def mark_failed(run_dir: str | os.PathLike, name: str, error: str) -> None:
    """Record a failed trial in its ``status.json``."""
    RunWriter(run_dir).mark_failed(name, error)


__all__ = ["TrialSpec", "Stage", "trial_name", "plan_stages", "run_trial", "is_finished", "read_history",
           "mark_failed", "build_trial_model"]
