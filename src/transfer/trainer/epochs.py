"""The epoch loop's bookkeeping: the resume state of a trial, its files, and the recorder
of every epoch (history, checkpoints, early stopping, progress) that the loop calls as a
Keras callback.

Importing this module does not import TensorFlow: the recorder hands the loop a
``keras.callbacks.LambdaCallback`` (:meth:`EpochRecorder.callback`), made when a stage trains.
"""

from __future__ import annotations

import math
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .._lazy import import_keras
from ..errors import RunFolderError
from ..fsutil import atomic_path, read_json, write_json_atomic
from ..runfolder import RunWriter


@dataclass
class TrialState:
    """What a killed trial needs to continue (``state.json``, written last after every epoch).

    Attributes:
        epoch: last finished epoch (epochs count across stages).
        stage: name of the stage whose freeze the checkpoint has applied.
        best_loss: lowest monitored loss so far (``val_loss``, or ``loss`` without val images).
        best_epoch: the epoch ``model.keras`` was saved at.
        wait: epochs since the monitored loss last improved (early stopping).
        stopped: early stopping ended the current stage before its last epoch.
        rng: the random-generator states of the model's layers (Dropout masks): the
            data order is a function of (seed, epoch), so with these a resumed trial
            continues exactly as an uninterrupted one.
        trainable_params: trainable parameters of the stage the checkpoint has applied (a
            sweep's rung ranks trials by them after validation accuracy).
        head: how the head started (``head`` of ``metrics.json``), kept for a trial evaluated
            in another process than the one that started it.
        batchnorm: the last population BatchNormalization pass (``batchnorm`` of ``metrics.json``).
    """

    epoch: int = 0
    stage: str | None = None
    best_loss: float | None = None
    best_epoch: int = 0
    wait: int = 0
    stopped: bool = False
    rng: dict = field(default_factory=dict)
    trainable_params: int = 0
    head: dict | None = None
    batchnorm: dict | None = None

    @classmethod
    def load(cls, path: Path) -> "TrialState | None":
        """The saved state, or None when there is none (or it cannot be read)."""
        try:
            saved = read_json(path)
        except (OSError, ValueError):
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names}) if isinstance(saved, dict) else None

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    def improved(self, loss: float | None) -> bool:
        return loss is not None and not math.isnan(loss) and (self.best_loss is None or loss < self.best_loss)


class TrialFiles:
    """The files one trial writes while it trains, through :class:`RunWriter`."""

    def __init__(self, writer: RunWriter, name: str, data_root: Path):
        self.writer, self.name, self.data_root = writer, name, Path(data_root)
        self.paths = writer.trial_paths(name)
        self._reported: set[str] = set()

    def save_model(self, model, path: Path) -> None:
        with atomic_path(path, suffix=".keras") as tmp:
            model.save(tmp)

    def save_checkpoint(self, model, optimizer, state: TrialState) -> None:
        """The resume checkpoint of epoch ``state.epoch``: the model's weights and the optimizer
        state (``epoch-N.*.npz``), then ``state.json`` (the commit point), then ``status.json``.

        Only after the commit are the files of other epochs removed, except the best epoch's
        weights (``model.keras`` is written from them when training ends): a kill at any moment
        leaves the files the committed ``state.json`` names. Weights are a plain array file
        (a ``.keras`` save of MobileNetV2 takes ~1 s, walking Keras's object graph; this ~0.05 s).
        """
        epoch = int(state.epoch)
        save_weights(model, self.paths.weights_at(epoch))
        if optimizer is not None:
            save_optimizer(optimizer, self.paths.optimizer_at(epoch))
        state.rng = rng_states(model)
        state.save(self.paths.state_json)
        keep = {self.paths.weights_at(epoch), self.paths.optimizer_at(epoch), self.paths.weights_at(state.best_epoch)}
        for path in self.paths.checkpoints():
            if path not in keep:
                path.unlink(missing_ok=True)
        self.status("running", epoch)

    def write_model(self, model, state: TrialState) -> None:
        """``model.keras``: ``model`` with the best epoch's weights (its own when no epoch improved).

        Raises:
            RunFolderError: the best epoch's weights file is missing or not this model's.
        """
        if state.best_epoch:
            path = self.paths.weights_at(state.best_epoch)
            if not load_weights(model, path):
                raise RunFolderError(f"the weights of the best epoch ({state.best_epoch}) cannot be read: {path}",
                                    hint=f"delete {self.paths.state_json} to train the trial {self.name} again")
        self.save_model(model, self.paths.model_keras)

    def history(self, rows: Sequence[dict]) -> None:
        self.writer.write_history(self.name, rows)

    def status(self, state: str, epoch: int, error: str | None = None) -> None:
        self.writer.write_status(self.name, state, epoch, error)

    def bad_files(self, failed: Sequence) -> int:
        """List files a batch source could not decode in ``bad_files.csv`` (once each); returns how many were new."""
        found = {}
        for item in failed:
            key = str(item.path)
            if key in self._reported:
                continue
            self._reported.add(key)
            p = Path(key)
            try:
                rel = str(p.resolve().relative_to(self.data_root.resolve())) if p.is_absolute() else key
            except ValueError:
                rel = key
            found[rel] = f"during training: {item.reason}" if item.reason else "during training"
        return self.writer.merge_bad_files(found) if found else 0


@dataclass
class EpochHooks:
    """What a stage does around each epoch besides training.

    Attributes:
        sources: the datasets of the stage; the first (training) gets ``set_epoch`` at each
            epoch begin, and files any of them failed to decode are listed in bad_files.csv.
        refresh_bn: recomputes population BatchNormalization statistics (None: no
            BatchNormalization layer trains); runs before validation, so the per-epoch
            validation numbers use the statistics the saved model gets.
        validate: ``() -> (val_loss, val_accuracy)`` on the validation images (None: there are none).
    """

    sources: Sequence = ()
    refresh_bn: Callable | None = None
    validate: Callable[[], tuple[float, float]] | None = None


@dataclass(frozen=True)
class StageEnd:
    """When a stage's epochs end.

    Attributes:
        epoch: the epoch the stage ends at.
        total: epochs of the whole trial (for the progress line).
        patience: early stopping after this many epochs without improvement (0 = off).
    """

    epoch: int
    total: int
    patience: int


class EpochRecorder:
    """Records every epoch of one stage of a trial.

    After each epoch, in this order: population BatchNormalization statistics (when they
    train), validation, then each file atomically: ``history.csv``, the resume checkpoint
    (the epoch's weights and optimizer state; the best epoch's weights are kept until
    ``model.keras`` is written from them when training ends), ``state.json`` (the commit
    point: a kill loses at most the epoch in progress), ``status.json``; then one progress
    line and any file that failed to decode.

    Args:
        files: the trial's files.
        models: ``(contract model, trained model)``: the contract model's weights are what is
            saved; the trained model (the contract model, or its suffix on cached features)
            is the one the loop trains: its optimizer state is saved, its learning rate
            reported, and early stopping sets its ``stop_training``.
        state: the resume state; updated in place.
        history: the rows so far; appended to in place.
        end: where the stage ends and when early stopping ends it.
        hooks: data, BatchNormalization statistics and validation of the stage.
        say: receives the progress line.
    """

    def __init__(self, files: TrialFiles, models: tuple, state: TrialState, history: list[dict], *, end: StageEnd,
                 hooks: EpochHooks, say: Callable[[str], None]):
        self.files, self.state, self.rows = files, state, history
        self.flat, self.model = models
        self.stage_end, self.total, self.patience = end.epoch, end.total, end.patience
        self.hooks, self.say = hooks, say
        self.monitor = "val_loss" if hooks.validate is not None else "loss"
        self.bn_stats = None
        self._t0 = 0.0

    def callback(self):
        """The Keras callback the loop calls after and before each epoch."""
        keras = import_keras()
        return keras.callbacks.LambdaCallback(on_epoch_begin=self.on_epoch_begin, on_epoch_end=self.on_epoch_end)

    def on_epoch_begin(self, epoch, logs=None):
        for src in list(self.hooks.sources)[:1]:  # the training data: its order depends on the epoch
            src.set_epoch(epoch)
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.hooks.refresh_bn is not None:
            self.bn_stats = self.hooks.refresh_bn()
        val = self.hooks.validate() if self.hooks.validate is not None else (None, None)
        row = self._row(epoch + 1, logs or {}, val)
        self.rows.append(row)
        self.files.history(self.rows)
        stop = self._checkpoint(row)
        if stop:
            self.model.stop_training = True
        self._report(row, stop)

    def _row(self, epoch: int, logs: dict, val: tuple) -> dict:
        return {"epoch": epoch, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
                "val_loss": val[0], "val_accuracy": val[1],
                "lr": _learning_rate(self.model), "seconds": round(time.perf_counter() - self._t0, 3)}

    def _checkpoint(self, row: dict) -> bool:
        """Best model, resume checkpoint and state; returns True when early stopping ends the stage."""
        st = self.state
        best = st.improved(row.get(self.monitor))
        if best:
            st.best_loss, st.best_epoch, st.wait = float(row[self.monitor]), row["epoch"], 0
        else:
            st.wait += 1
        stop = self.patience > 0 and st.wait >= self.patience
        st.epoch = row["epoch"]
        st.stopped = bool(stop and row["epoch"] < self.stage_end)
        record = getattr(self.hooks.refresh_bn, "record", None)
        if record is not None:
            st.batchnorm = record()
        self.files.save_checkpoint(self.flat, self.model.optimizer, st)
        return stop

    def _report(self, row: dict, stop: bool) -> None:
        name = self.files.name
        val = (f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
               if row["val_loss"] is not None else "")
        self.say(f"  [{name}] epoch {row['epoch']}/{self.total}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}"
                 f"{val}  {row['seconds']:.1f}s" + ("  (early stop)" if stop else ""))
        failed = [f for src in self.hooks.sources for f in getattr(src, "failed", [])]
        new = self.files.bad_files(failed)
        if new:
            self.say(f"  [{name}] warning: {new} file(s) could not be read; listed in bad_files.csv")


def rng_states(model) -> dict:
    """The state of every random generator of ``model``'s layers (Dropout), by layer."""
    out = {}
    for layer in model.layers:
        for i, v in enumerate(v for v in layer.non_trainable_variables if "seed_generator_state" in v.path):
            out[f"{layer.name}/{i}"] = [int(a) for a in np.asarray(v.numpy()).ravel()]
    return out


def restore_rng(model, states: dict) -> None:
    for layer in model.layers:
        for i, v in enumerate(v for v in layer.non_trainable_variables if "seed_generator_state" in v.path):
            saved = states.get(f"{layer.name}/{i}")
            if saved is not None:
                v.assign(np.asarray(saved, dtype=v.dtype).reshape(v.shape))


def _read_arrays(path: Path) -> list[np.ndarray] | None:
    """The arrays of an ``np.savez`` file in order (None: missing, truncated or not such a file)."""
    try:
        with np.load(path) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _fits(arrays: list[np.ndarray] | None, variables) -> bool:
    return arrays is not None and len(arrays) == len(variables) and all(
        tuple(a.shape) == tuple(v.shape) for a, v in zip(arrays, variables))


def save_weights(model, path: Path) -> None:
    """Every weight of ``model`` (trainable or not: BatchNorm statistics, random-generator states) in order."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, *model.get_weights())


def load_weights(model, path: Path) -> bool:
    """Load :func:`save_weights`'s file into ``model``; False (nothing loaded) when it is missing,
    unreadable or made for another model."""
    arrays = _read_arrays(path)
    if not _fits(arrays, model.weights):
        return False
    model.set_weights(arrays)
    return True


def save_optimizer(optimizer, path: Path) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, *[np.asarray(v.numpy()) for v in optimizer.variables])


def restore_optimizer(optimizer, variables, path: Path) -> bool:
    """Load the saved optimizer state into ``optimizer`` (built for ``variables``); False when it does not fit."""
    arrays = _read_arrays(path)
    if arrays is None:
        return False
    optimizer.build(variables)
    if not _fits(arrays, optimizer.variables):
        return False
    for v, a in zip(optimizer.variables, arrays):
        v.assign(a)
    return True


def _learning_rate(model) -> float:
    keras = import_keras()
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - no optimizer
        return float("nan")
