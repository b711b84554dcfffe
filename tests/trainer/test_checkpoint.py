"""The resume checkpoint of a trial: per-epoch weight files, ``state.json`` as the commit
point, the best epoch's weights kept until ``model.keras`` is written from them."""

from __future__ import annotations

import numpy as np
import pytest

from transfer.errors import RunFolderError
from transfer.runfolder import RunWriter
from transfer.trainer.epochs import TrialFiles, TrialState, load_weights


def _model():
    import keras

    inputs = keras.Input((4,), name="image")
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    return model


def _epoch(files, model, state, epoch, loss):
    """What EpochRecorder does after an epoch: new weights, then the checkpoint."""
    model.get_layer("probs").set_weights([np.full((4, 3), float(epoch), np.float32), np.zeros(3, np.float32)])
    if state.improved(loss):
        state.best_loss, state.best_epoch = loss, epoch
    state.epoch = epoch
    files.save_checkpoint(model, model.optimizer, state)


def _names(files):
    return sorted(p.name for p in files.paths.checkpoints())


def test_the_committed_epoch_and_the_best_one_are_kept_and_model_keras_gets_the_best(tmp_path):
    from transfer.models.build import load_model

    files = TrialFiles(RunWriter(tmp_path / "run"), "t", tmp_path)
    files.paths.dir.mkdir(parents=True)
    model, state = _model(), TrialState()
    for epoch, loss in ((1, 1.0), (2, 0.5), (3, 0.7)):
        _epoch(files, model, state, epoch, loss)
    assert _names(files) == ["epoch-0002.weights.npz", "epoch-0003.optimizer.npz", "epoch-0003.weights.npz"]
    assert TrialState.load(files.paths.state_json).epoch == 3

    # a kill after the next epoch's weights were written but before state.json: the
    # committed epoch's files are untouched, and the orphan goes at the next commit
    model.get_layer("probs").set_weights([np.full((4, 3), 4.0, np.float32), np.zeros(3, np.float32)])
    from transfer.trainer.epochs import save_weights

    save_weights(model, files.paths.weights_at(4))
    fresh = _model()
    assert load_weights(fresh, files.paths.weights_at(TrialState.load(files.paths.state_json).epoch))
    assert np.all(fresh.get_layer("probs").get_weights()[0] == 3.0)
    _epoch(files, model, state, 4, 0.9)
    assert _names(files) == ["epoch-0002.weights.npz", "epoch-0004.optimizer.npz", "epoch-0004.weights.npz"]

    files.write_model(model, state)
    saved = load_model(files.paths.model_keras)
    assert np.all(saved.get_layer("probs").get_weights()[0] == 2.0)  # the best epoch, not the last
    assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), model.get_weights()))
    files.writer.remove_resume_checkpoint("t")
    assert _names(files) == []


def test_a_damaged_or_foreign_weights_file_is_not_loaded(tmp_path):
    files = TrialFiles(RunWriter(tmp_path / "run"), "t", tmp_path)
    files.paths.dir.mkdir(parents=True)
    model, state = _model(), TrialState()
    _epoch(files, model, state, 1, 1.0)
    path = files.paths.weights_at(1)
    before = [w.copy() for w in model.get_weights()]

    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert not load_weights(model, path)
    np.savez(path, np.zeros((5, 5)))  # another model's
    assert not load_weights(model, path)
    assert not load_weights(model, files.paths.weights_at(7))  # missing
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    with pytest.raises(RunFolderError, match=r"best epoch \(1\) cannot be read"):
        files.write_model(model, state)
    assert not files.paths.model_keras.exists()


def test_every_trial_starts_from_the_initial_weights_file_even_when_it_changes(pattern_folder, tmp_path):
    """The initial weights are read once per process (not once per trial), but a changed
    file is read again."""
    from helpers.trainer import base_overrides
    from transfer.trainer.config import load_config
    from transfer.trainer.fit import TrialSpec, build_trial_model

    cfg = load_config(None, base_overrides(pattern_folder, tmp_path / "run"))
    spec = TrialSpec(name="arc2-t100", group="arc2-t100", fold=None, backbone="arc2", init="scratch",
                     weights="none", trainable=1.0, freeze_by="layers", image_size=(16, 16))
    first, _ = build_trial_model(tmp_path / "run", cfg, spec, 3)
    init = tmp_path / "run" / "init" / "arc2-scratch.weights.h5"
    assert init.is_file()
    second, _ = build_trial_model(tmp_path / "run", cfg, spec, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))

    second.set_weights([w + 1.0 if w.dtype.kind == "f" else w for w in second.get_weights()])
    second.save_weights(init)
    third, _ = build_trial_model(tmp_path / "run", cfg, spec, 3)
    assert all(np.array_equal(a, b) for a, b in zip(third.get_weights(), second.get_weights()))


def test_a_damaged_checkpoint_restarts_the_trial_with_a_note(pattern_folder, tmp_path):
    """A trial whose state.json names an epoch whose weights file is truncated (or gone) is not
    resumed from it: it says so and trains again from its first epoch."""
    import json

    from helpers.trainer import base_overrides
    from transfer.trainer.config import load_config
    from transfer.trainer.fit import read_history
    from transfer.trainer.sweep import run_sweep

    cfg = load_config(None, base_overrides(pattern_folder, tmp_path / "run", trainable="1"))
    assert run_sweep(cfg, progress=lambda s: None).ok
    writer = RunWriter(tmp_path / "run")
    paths = writer.trial_paths("arc2-t100")
    # as if killed after epoch 1 was committed, with its weights file damaged since
    TrialState(epoch=1, stage=json.loads(paths.state_json.read_text())["stage"], best_loss=9.0,
               best_epoch=1).save(paths.state_json)
    writer.write_status("arc2-t100", "running", 1)
    paths.metrics_json.unlink()
    paths.weights_at(1).write_bytes(b"PK\x03\x04 truncated")
    said: list[str] = []
    assert run_sweep(cfg, progress=said.append).ok
    assert any("checkpoint of epoch 1" in s and "starts again" in s for s in said), said
    assert not any("resuming after epoch" in s for s in said)
    assert [h["epoch"] for h in read_history(paths.history_csv)] == [1, 2]
    assert json.loads(paths.status_json.read_text())["state"] == "done" and paths.checkpoints() == []
