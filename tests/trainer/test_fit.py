"""Trial-level behaviour: frozen BatchNorm, bad files met while training, resume after a kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transfer.trainer.config import load_config
from transfer.trainer.fit import TrialSpec, read_history, run_trial
from transfer.trainer.sweep import run_sweep

from trainer_helpers import base_overrides, make_pattern_folder

REPO = Path(__file__).resolve().parents[2]


def _bn_layers(model):
    import keras

    return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_frozen_batchnorm_statistics_unchanged(pattern_folder, tmp_path):
    """mobilenet_v2 with the last 30 % trainable: frozen BN keeps its moving statistics,
    trainable weights move; the random-init trial (BN trainable) does update them."""
    from transfer.models.build import build_classifier, load_model

    cfg = load_config(None, base_overrides(
        pattern_folder, tmp_path / "run", backbones="mobilenet_v2", trainable="0.3", random_init=True,
        image_size=32, epochs=1, lr=1e-3))
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok, res.failed
    for trial, init in (("mobilenet_v2-t030", "scratch"), ("mobilenet_v2-random", "random")):
        ref, _ = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="none", num_classes=3,
                                  dropout=cfg.dropout, seed=cfg.seed)
        ref.load_weights(res.run_dir / "init" / f"mobilenet_v2-{init}.weights.h5")
        trained = load_model(res.run_dir / "trials" / trial / "model.keras")
        before = {l.name: [w.copy() for w in l.get_weights()] for l in _bn_layers(ref)}
        bns = _bn_layers(trained)
        assert bns
        changed_bn = 0
        for l in bns:
            mm_b, mv_b = before[l.name][2], before[l.name][3]
            mm_a, mv_a = l.get_weights()[2], l.get_weights()[3]
            same = np.array_equal(mm_a, mm_b) and np.array_equal(mv_a, mv_b)
            if not l.trainable:
                assert same, f"{trial}: frozen BN {l.name} changed its moving statistics"
            changed_bn += not same
        if init == "scratch":
            assert any(not l.trainable for l in bns)
            # without pretrained weights the BN statistics of the unfrozen part are learnt
            assert changed_bn > 0
            # the trainable part did learn: some kernel differs from the shared init
            diffs = [not np.array_equal(a, b) for a, b in zip(ref.get_weights(), trained.get_weights())]
            assert any(diffs)
        else:
            assert changed_bn > 0  # random init trains BN (train_bn=True)


def test_pretrained_start_keeps_every_batchnorm_frozen(pattern_folder, tmp_path):
    """Starting from weights (a local file here, ImageNet online), BN layers stay in
    inference mode even inside the trainable part (Keras transfer-learning guide)."""
    from transfer.models.build import build_classifier, load_model

    ref, _ = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="none", num_classes=3, seed=1)
    wfile = tmp_path / "pre.weights.h5"
    ref.save_weights(wfile)
    cfg = load_config(None, base_overrides(
        pattern_folder, tmp_path / "run", backbones="mobilenet_v2", trainable="0.3",
        weights=str(wfile), image_size=32, epochs=1, lr=1e-3))
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok, res.failed
    trained = load_model(res.run_dir / "trials" / "mobilenet_v2-t030" / "model.keras")
    start = {l.name: l.get_weights() for l in _bn_layers(ref)}
    for l in _bn_layers(trained):
        w = l.get_weights()
        assert np.array_equal(w[2], start[l.name][2]) and np.array_equal(w[3], start[l.name][3]), l.name


def test_bad_file_met_while_training(pattern_folder, tmp_path):
    """A file that cannot be decoded when its batch is read: training goes on, the file
    is listed in RUN/bad_files.csv."""
    from transfer.data.folder import index_folder

    data = make_pattern_folder(tmp_path / "data", per_class=8)
    idx = index_folder(data)
    bad = data / "c1" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # after indexing: met only in training
    sample_cls = type(idx.samples[0])
    first = idx.samples[0].path
    bad_path = str(bad) if Path(str(first)).is_absolute() else "c1/zz_broken.png"
    train = list(idx.samples[:18]) + [sample_cls(bad_path, 1)]
    val = list(idx.samples[18:])
    cfg = load_config(None, base_overrides(data, tmp_path / "run", trainable="1", epochs=1))
    spec = TrialSpec(name="arc2-t100", group="arc2-t100", fold=None, backbone="arc2", init="scratch",
                     weights="none", trainable=1.0, freeze_by="layers", image_size=(16, 16))
    lines: list[str] = []
    m = run_trial(tmp_path / "run", cfg, spec, data_root=data, class_names=idx.class_names,
                  train=train, val=val, test=val, progress=lines.append)
    assert m["epochs_run"] == 1
    with open(tmp_path / "run" / "bad_files.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["path"].endswith("zz_broken.png") and r["reason"] for r in rows), rows
    assert json.loads((tmp_path / "run/trials/arc2-t100/status.json").read_text())["state"] == "done"


def _cmd(data, out, epochs):
    return [sys.executable, "-m", "transfer.cli", "train", str(data), "--backbone", "arc2",
            "--trainable", "0,1", "--weights", "none", "--epochs", str(epochs), "--image-size", "16",
            "--batch-size", "16", "--patience", "0", "--lr", "0.003", "--out", str(out)]


def _state(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_resume_after_kill(pattern_folder, tmp_path):
    """SIGKILL during the second trial: the first is not retrained, the second continues
    from its last finished epoch; the final history has every epoch exactly once."""
    out = tmp_path / "run"
    epochs = 15
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO / "src"))
    log = open(tmp_path / "log1.txt", "w")
    proc = subprocess.Popen(_cmd(pattern_folder, out, epochs), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    t1, t2 = out / "trials" / "arc2-t000", out / "trials" / "arc2-t100"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if _state(t1 / "status.json").get("state") == "done" and _state(t2 / "state.json").get("epoch", 0) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "log1.txt").read_text()
            time.sleep(0.05)
        else:
            pytest.fail("the sweep did not reach trial 2 in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed_at = _state(t2 / "state.json")["epoch"]
    assert 2 <= killed_at < epochs
    mtime1 = (t1 / "model.keras").stat().st_mtime_ns
    assert _state(t2 / "status.json").get("state") == "running"

    r = subprocess.run(_cmd(pattern_folder, out, epochs), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    said = r.stdout + r.stderr  # progress lines go to standard error
    assert "arc2-t000: already done" in said
    assert f"[arc2-t100] resuming after epoch {killed_at}" in said
    assert f"[arc2-t100] epoch {killed_at + 1}/{epochs}" in said
    assert f"[arc2-t100] epoch {killed_at}/{epochs}" not in said
    assert (t1 / "model.keras").stat().st_mtime_ns == mtime1
    hist = read_history(t2 / "history.csv")
    assert [h["epoch"] for h in hist] == list(range(1, epochs + 1))
    assert json.loads((t2 / "status.json").read_text())["state"] == "done"
    assert not list(out.rglob("*.tmp*"))  # no half-written leftovers that a reader could pick up
