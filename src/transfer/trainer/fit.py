"""Run one trial of a sweep into ``RUN/trials/<name>/`` (layout: docs/design.md).

Order of work in a trial:

1. ``keras.utils.set_random_seed(seed)`` and TensorFlow op determinism.
2. Build the classifier; load the shared initial weights
   ``RUN/init/<backbone>-<init>.weights.h5`` (written by the first trial of that
   backbone + init), so every trial of a backbone starts from the same weights.
3. ``apply_freeze`` (random-init trials: everything trainable, BatchNorm trainable),
   then compile. With ``two_stage``: head-only epochs first, then unfreeze to the
   fraction and recompile with ``fine_tune_lr``.
4. Train epoch by epoch. After every epoch, in this order and each file atomically:
   ``history.csv``, ``model.keras`` (if val_loss improved), ``last.keras`` (with the
   optimizer state), ``state.json`` (the commit point: last finished epoch and the
   early-stopping state), ``status.json``. A kill loses at most the epoch in progress.
5. Evaluate ``model.keras`` (the best epoch) on train / val / test -> ``metrics.json``;
   ``curves.png``; ``status.json`` = done. ``last.keras`` is then removed.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from .._lazy import import_keras, import_tensorflow
from ..errors import ConfigError, TransferError  # noqa: F401  (re-exported)
from ..fsutil import atomic_path, read_json, write_json_atomic, write_text_atomic
from .config import TrainConfig

HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


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

    @property
    def train_bn(self) -> bool:
        return self.init == "random"


def trial_name(backbone: str, trainable: float | None, *, random_init: bool = False, fold: int | None = None) -> str:
    """Trial name of docs/design.md: ``mobilenet_v2-t030``, ``arc2-random``, ``...-f2``.

    Example:
        >>> trial_name("mobilenet_v2", 0.3)
        'mobilenet_v2-t030'
    """
    base = f"{backbone}-random" if random_init else f"{backbone}-t{int(round(float(trainable) * 100)):03d}"
    return f"{base}-f{fold}" if fold else base


def is_finished(trial_dir: Path) -> bool:
    """A trial is finished when status says done and model.keras + metrics.json exist."""
    st = trial_dir / "status.json"
    if not st.is_file():
        return False
    try:
        state = read_json(st).get("state")
    except (OSError, ValueError):
        return False
    return state == "done" and (trial_dir / "model.keras").is_file() and (trial_dir / "metrics.json").is_file()


# -- small helpers ---------------------------------------------------------------------

def _write_status(tdir: Path, state: str, epoch: int, error: str | None = None) -> None:
    write_json_atomic(tdir / "status.json", {"state": state, "epoch": int(epoch), "error": error})


def _write_history(path: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in HISTORY_FIELDS})
    write_text_atomic(path, buf.getvalue())


def read_history(path: Path) -> list[dict]:
    """Rows of a ``history.csv`` (numbers as float, epoch as int)."""
    if not path.is_file():
        return []
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            r: dict = {}
            for k, v in row.items():
                if v in ("", None):
                    r[k] = None
                elif k == "epoch":
                    r[k] = int(v)
                else:
                    r[k] = float(v)
            out.append(r)
    return out


def append_bad_files(run_dir: Path, data_root: Path, failed: Sequence) -> int:
    """Merge files that failed during training into ``RUN/bad_files.csv``; returns how many were new."""
    if not failed:
        return 0
    path = run_dir / "bad_files.csv"
    rows: dict[str, str] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows[row["path"]] = row.get("reason", "")
    new = 0
    for item in failed:
        p = getattr(item, "path", None)
        reason = getattr(item, "reason", "")
        if p is None and isinstance(item, (tuple, list)):
            p, reason = item[0], (item[1] if len(item) > 1 else "")
        p = Path(str(p))
        try:
            rel = str(p.resolve().relative_to(Path(data_root).resolve())) if p.is_absolute() else str(p)
        except ValueError:
            rel = str(p)
        if rel not in rows:
            rows[rel] = f"during training: {reason}" if reason else "during training"
            new += 1
    if new:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "reason"])
        for k, v in rows.items():
            w.writerow([k, v])
        write_text_atomic(path, buf.getvalue())
    return new


def _set_determinism(seed: int) -> None:
    tf = import_tensorflow()
    keras = import_keras()
    keras.utils.set_random_seed(int(seed))
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # pragma: no cover - older TF
        pass


def _make_optimizer(cfg: TrainConfig, lr: float):
    keras = import_keras()
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    return keras.optimizers.Adam(learning_rate=lr)


def _compile(model, cfg: TrainConfig, lr: float) -> None:
    keras = import_keras()
    if cfg.loss == "l1":
        loss = keras.losses.MeanAbsoluteError(name="l1")
        acc = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(name="crossentropy")
        acc = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=_make_optimizer(cfg, lr), loss=loss, metrics=[acc])


def _current_lr(model) -> float:
    try:
        return float(model.optimizer.learning_rate.numpy())
    except Exception:  # pragma: no cover
        return float("nan")


def _save_keras(model, path: Path) -> None:
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def _source(data_root, samples, cfg: TrainConfig, spec: TrialSpec, *, train: bool, replicas: int = 1):
    from ..data.batches import BatchSource

    # Under a mirrored strategy every batch must split evenly over the replicas (an
    # empty or uneven per-replica batch fails inside TensorFlow): batches are padded
    # with repeats of their own images. Only training and the per-epoch validation see
    # the padding; the final metrics are computed on one device without it.
    return BatchSource(
        data_root,
        list(samples),
        cfg.batch_size,
        tuple(spec.image_size),
        shuffle=train,
        seed=cfg.seed,
        augment=tuple(cfg.augment) if train else (),
        drop_remainder=False,
        pad_to_multiple=replicas,
    )


def _init_weights_path(run_dir: Path, spec: TrialSpec) -> Path:
    return run_dir / "init" / f"{spec.backbone}-{spec.init}.weights.h5"


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
    init_path = _init_weights_path(run_dir, spec)
    if init_path.is_file():
        model.load_weights(init_path)
    else:
        with atomic_path(init_path, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
    return model, info


def _stages(cfg: TrainConfig, spec: TrialSpec) -> list[dict]:
    pretrained = spec.init == "pretrained"
    lr = cfg.lr_for(spec.trainable, pretrained)
    if spec.init == "random":
        return [{"name": "main", "epochs": cfg.epochs, "fraction": 1.0, "lr": lr, "train_bn": True}]
    if cfg.two_stage and spec.trainable > 0 and cfg.head_epochs > 0:
        return [
            {"name": "head", "epochs": cfg.head_epochs, "fraction": 0.0, "lr": lr, "train_bn": False},
            {"name": "finetune", "epochs": cfg.epochs, "fraction": spec.trainable,
             "lr": cfg.fine_tune_lr_for(lr), "train_bn": cfg.train_bn},
        ]
    # Without pretrained weights the BatchNormalization statistics are the initial
    # mean 0 / variance 1, not knowledge worth keeping: the unfrozen part learns them.
    train_bn = cfg.train_bn or spec.init == "scratch"
    return [{"name": "main", "epochs": cfg.epochs, "fraction": spec.trainable, "lr": lr, "train_bn": train_bn}]


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


def _apply_stage(model, info, cfg: TrainConfig, spec: TrialSpec, stage: dict):
    from ..models.freeze import apply_freeze

    summary = apply_freeze(model, info, stage["fraction"], by=spec.freeze_by, train_bn=stage["train_bn"])
    if spec.init in ("random", "scratch"):
        _fast_bn_statistics(model)
    _compile(model, cfg, stage["lr"])  # recompile after every change of `trainable`
    return summary


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
    progress: Callable[[str], None] = print,
) -> dict:
    """Train (or resume, or skip) one trial and return its metrics.

    With ``cfg.strategy == "mirrored"`` the model is built, loaded, compiled, trained
    and evaluated inside a ``tf.distribute.MirroredStrategy`` scope (one replica per
    device; see :func:`transfer.trainer.strategy.make_strategy`); the run folder it
    writes is the same.

    Args:
        run_dir: the run folder.
        cfg: the resolved configuration.
        spec: the trial (backbone, init, fraction, image size, ...).
        data_root: the dataset folder the samples are relative to.
        class_names: class names (index = label).
        train, val, test: lists of ``transfer.data.folder.Sample``.
        progress: receives one line per epoch.

    Returns:
        The content of ``metrics.json``.

    Raises:
        TransferError: bad backbone / weights / size (from the model builder).

    Example:
        >>> run_trial("runs/d", cfg, spec, data_root="data/d", class_names=names,
        ...           train=tr, val=va, test=te)   # doctest: +SKIP
    """
    tdir = Path(run_dir) / "trials" / spec.name
    kw = dict(data_root=data_root, class_names=class_names, train=train, val=val, test=test, progress=progress)
    if cfg.strategy == "default" or is_finished(tdir):
        done = _train_trial(run_dir, cfg, spec, replicas=1, **kw)
    else:
        from .strategy import make_strategy

        strategy = make_strategy(cfg.strategy)
        progress(f"  [{spec.name}] {cfg.strategy} strategy: {strategy.num_replicas_in_sync} replica(s) on "
                 f"{', '.join(strategy.extended.worker_devices)}")
        with strategy.scope():
            done = _train_trial(run_dir, cfg, spec, replicas=int(strategy.num_replicas_in_sync), **kw)
    # the final evaluation runs outside any strategy scope: exact metrics on one device
    return done() if callable(done) else done


def _train_trial(run_dir, cfg: TrainConfig, spec: TrialSpec, *, data_root, class_names, train, val, test,
                 progress, replicas: int):
    """Train a trial; returns its metrics when it was already finished, else a function
    that evaluates the best model and writes ``metrics.json`` (called by :func:`run_trial`)."""
    keras = import_keras()
    run_dir = Path(run_dir)
    tdir = run_dir / "trials" / spec.name
    tdir.mkdir(parents=True, exist_ok=True)
    if is_finished(tdir):
        return read_json(tdir / "metrics.json")
    for leftover in tdir.glob(".*.tmp*"):  # temp files of a write cut short by a kill
        leftover.unlink(missing_ok=True)
    num_classes = len(class_names)

    # model: fresh from the shared init, or the resume checkpoint
    model, info = build_trial_model(run_dir, cfg, spec, num_classes)
    write_json_atomic(tdir / "trial.json", {
        "name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
        "init": spec.init, "weights": spec.weights, "trainable": spec.trainable,
        "freeze_by": spec.freeze_by, "image_size": list(spec.image_size),
        "gradcam_layer": info.gradcam_layer, "feature_dim": int(info.feature_dim),
        "num_classes": num_classes, "preprocess": info.preprocess,
    })
    stages = _stages(cfg, spec)
    bounds = []  # cumulative epoch end of each stage
    total = 0
    for s in stages:
        total += s["epochs"]
        bounds.append(total)

    state = {"epoch": 0, "stage": 0, "best_val_loss": None, "best_epoch": 0, "wait": 0,
             "stopped": False, "stage_applied": None}
    last, state_path = tdir / "last.keras", tdir / "state.json"
    history: list[dict] = []
    if last.is_file() and state_path.is_file():
        state.update(read_json(state_path))
        from ..models import build as _build  # noqa: F401  (registers custom objects)

        model = keras.saving.load_model(last, compile=True)
        history = [r for r in read_history(tdir / "history.csv") if r["epoch"] <= state["epoch"]]
        progress(f"  [{spec.name}] resuming after epoch {state['epoch']}")
    freeze_summary = None

    one_hot = cfg.loss == "l1"
    from .keras_data import make_dataset

    train_src = _source(data_root, train, cfg, spec, train=True, replicas=replicas)
    train_ds = make_dataset(train_src, num_classes=num_classes, one_hot=one_hot, workers=cfg.workers)
    val_ds = None
    if len(val):
        val_src = _source(data_root, val, cfg, spec, train=False, replicas=replicas)
        val_ds = make_dataset(val_src, num_classes=num_classes, one_hot=one_hot, workers=cfg.workers)
    monitor = "val_loss" if val_ds is not None else "loss"
    _write_status(tdir, "running", state["epoch"])

    class _Epochs(keras.callbacks.Callback):
        def __init__(self, stage_end: int):
            super().__init__()
            self.stage_end = stage_end
            self.t0 = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            train_ds.set_epoch(epoch)
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            sec = time.perf_counter() - self.t0
            e = epoch + 1
            row = {"epoch": e, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
                   "val_loss": logs.get("val_loss"), "val_accuracy": logs.get("val_accuracy"),
                   "lr": _current_lr(self.model), "seconds": round(sec, 3)}
            history.append(row)
            _write_history(tdir / "history.csv", history)
            cur = logs.get(monitor)
            improved = cur is not None and (state["best_val_loss"] is None or cur < state["best_val_loss"])
            if improved:
                state["best_val_loss"], state["best_epoch"], state["wait"] = float(cur), e, 0
                _save_keras(self.model, tdir / "model.keras")
            else:
                state["wait"] += 1
            stop = cfg.patience > 0 and state["wait"] >= cfg.patience
            if stop:
                self.model.stop_training = True
            _save_keras(self.model, last)
            state["epoch"] = e
            state["stopped"] = bool(stop and e < self.stage_end)
            write_json_atomic(state_path, state)
            _write_status(tdir, "running", e)
            va = row["val_accuracy"]
            vl = row["val_loss"]
            progress(
                f"  [{spec.name}] epoch {e}/{total}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}"
                + (f"  val_loss {vl:.4f}  val_acc {va:.4f}" if vl is not None else "")
                + f"  {sec:.1f}s" + ("  (early stop)" if stop else "")
            )
            new_bad = append_bad_files(run_dir, Path(data_root), _new_failures())

            if new_bad:
                progress(f"  [{spec.name}] warning: {new_bad} file(s) could not be read; listed in bad_files.csv")

    seen_failed: set[str] = set()

    def _new_failures():
        out = []
        for src in (train_src, getattr(val_ds, "source", None)):
            for f in getattr(src, "failed", []) or []:
                key = str(getattr(f, "path", f))
                if key not in seen_failed:
                    seen_failed.add(key)
                    out.append(f)
        return out

    # which stage is next?
    stage_idx = 0
    while stage_idx < len(stages) and state["epoch"] >= bounds[stage_idx]:
        stage_idx += 1
    if state["stopped"] and stage_idx < len(stages):
        # early stop inside stage `stage_idx`: the stage is over
        if stage_idx == len(stages) - 1:
            stage_idx = len(stages)
        else:
            state["epoch"] = bounds[stage_idx]
            stage_idx += 1
    for si in range(stage_idx, len(stages)):
        stage = stages[si]
        if state.get("stage_applied") != stage["name"]:
            freeze_summary = _apply_stage(model, info, cfg, spec, stage)
            state["stage_applied"] = stage["name"]
            if si > 0:
                state["wait"] = 0
                state["stopped"] = False
        start = max(state["epoch"], bounds[si] - stage["epochs"])
        callbacks = [_Epochs(bounds[si])]
        if cfg.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tdir / "tensorboard")))
        if start < bounds[si]:
            model.fit(train_ds, validation_data=val_ds, initial_epoch=start, epochs=bounds[si],
                      callbacks=callbacks, verbose=0, shuffle=False)
        if state.get("stopped") and si == len(stages) - 1:
            break
        state["stopped"] = False

    if not (tdir / "model.keras").is_file():  # no epoch improved (NaN losses): keep the last model
        _save_keras(model, tdir / "model.keras")
    from ..models.freeze import count_params

    params = count_params(model)
    return partial(_evaluate_trial, run_dir, cfg, spec, data_root=data_root, num_classes=num_classes,
                   one_hot=one_hot, splits=(("train", train), ("val", val), ("test", test)), history=history,
                   state=state, freeze_summary=freeze_summary, params=params)


def _evaluate_trial(run_dir: Path, cfg: TrainConfig, spec: TrialSpec, *, data_root, num_classes, one_hot, splits,
                    history, state, freeze_summary, params) -> dict:
    """Evaluate the trial's best model on every split and write ``metrics.json`` / ``status.json``."""
    from .keras_data import make_dataset

    tdir = run_dir / "trials" / spec.name
    last = tdir / "last.keras"
    # evaluate the best model
    from ..models.build import load_model

    best = load_model(tdir / "model.keras")
    _compile(best, cfg, 1e-3)
    metrics: dict = {}
    for split, samples in splits:
        if not len(samples):
            metrics[split] = {"accuracy": None, "loss": None}
            continue
        src = _source(data_root, samples, cfg, spec, train=False)
        ds = make_dataset(src, num_classes=num_classes, one_hot=one_hot, workers=cfg.workers)
        res = best.evaluate(ds, verbose=0, return_dict=True)
        metrics[split] = {"accuracy": float(res["accuracy"]), "loss": float(res["loss"])}
        append_bad_files(run_dir, Path(data_root), getattr(src, "failed", []))
    p_tr, p_nt = _params(params)
    secs = [r["seconds"] for r in history if r.get("seconds") is not None]
    metrics.update({
        "params": {"trainable": p_tr, "non_trainable": p_nt, "total": p_tr + p_nt},
        "seconds_per_epoch": (sum(secs) / len(secs)) if secs else None,
        "epochs_run": len(history),
        "best_epoch": int(state["best_epoch"]),
    })
    if freeze_summary is not None:
        metrics["freeze"] = {k: v for k, v in asdict(freeze_summary).items()} if hasattr(freeze_summary, "__dataclass_fields__") else None
    if history:
        from ..plots import plot_curves

        plot_curves(history, tdir / "curves.png", title=spec.name)
    write_json_atomic(tdir / "metrics.json", metrics)
    _write_status(tdir, "done", state["epoch"])
    for p in (last,):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return metrics


def _params(params) -> tuple[int, int]:
    """(trainable, non_trainable) from count_params' result (mapping, object or pair)."""
    if isinstance(params, dict):
        return int(params.get("trainable", 0)), int(params.get("non_trainable", 0))
    if hasattr(params, "trainable"):
        return int(params.trainable), int(params.non_trainable)
    return int(params[0]), int(params[1])


def mark_failed(run_dir: str | os.PathLike, name: str, error: str) -> None:
    """Record a failed trial in its ``status.json``."""
    tdir = Path(run_dir) / "trials" / name
    tdir.mkdir(parents=True, exist_ok=True)
    epoch = 0
    sp = tdir / "state.json"
    if sp.is_file():
        try:
            epoch = int(read_json(sp).get("epoch", 0))
        except (OSError, ValueError):
            pass
    _write_status(tdir, "failed", epoch, error)


__all__ = ["TrialSpec", "trial_name", "run_trial", "is_finished", "read_history", "mark_failed",
           "build_trial_model", "append_bad_files", "HISTORY_FIELDS", "ConfigError", "TransferError"]
