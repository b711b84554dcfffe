"""Trial-level behaviour: frozen BatchNorm, bad files met while training, resume after a kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import traceback
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.trainer import base_overrides, make_pattern_folder
from transfer.trainer.config import load_config
from transfer.trainer.fit import TrialData, TrialSpec, read_history, run_trial
from transfer.trainer.sweep import run_sweep

REPO = Path(__file__).resolve().parents[2]


def _bn_layers(model):
    import keras

    return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


@pytest.mark.slow  # two MobileNetV2 trials, ~3 min on 2 cores (test_pretrained_start_keeps_every_batchnorm_frozen stays fast)
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
    m = run_trial(tmp_path / "run", cfg, spec, TrialData.of(data, idx.class_names, train=train, val=val, test=val),
                  progress=lines.append)
    assert m["epochs_run"] == 1
    with open(tmp_path / "run" / "bad_files.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["path"].endswith("zz_broken.png") and r["reason"] for r in rows), rows
    assert json.loads((tmp_path / "run/trials/arc2-t100/status.json").read_text())["state"] == "done"


def _cmd(data, out, epochs, trainable="0,1"):
    return [sys.executable, "-m", "transfer.cli", "train", str(data), "--backbone", "arc2",
            "--trainable", trainable, "--weights", "none", "--epochs", str(epochs), "--image-size", "16",
            "--batch-size", "16", "--patience", "0", "--lr", "0.003", "--out", str(out)]


def _train_here(cmd, cwd: Path) -> tuple[int, str]:
    """``cmd`` (a :func:`_cmd` command line) run in this process by click's runner: the same
    command, exit code and standard error as the console script, without starting TensorFlow in
    a new process (only the run that is killed needs a process of its own). Returns the exit code
    and everything the command printed (a crash's traceback included)."""
    from click.testing import CliRunner

    from transfer.cli import cli

    args = cmd[cmd.index("transfer.cli") + 1:]
    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)
    crash = "" if r.exception is None or isinstance(r.exception, SystemExit) else "".join(
        traceback.format_exception(r.exception))
    return r.exit_code, r.output + crash  # click >= 8.2: output is standard output and error as a terminal shows them


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
    t1, t2 = out / "trials" / "arc2-t000", out / "trials" / "arc2-t100"
    killed_at = _kill_when(_cmd(pattern_folder, out, epochs), tmp_path, env, t2, deadline=240, ready=lambda: (
        _state(t1 / "status.json").get("state") == "done" and _state(t2 / "state.json").get("epoch", 0) >= 2))
    assert 2 <= killed_at < epochs
    mtime1 = (t1 / "model.keras").stat().st_mtime_ns
    assert _state(t2 / "status.json").get("state") == "running"

    code, said = _train_here(_cmd(pattern_folder, out, epochs), tmp_path)  # progress lines go to standard error
    assert code == 0, said
    assert "arc2-t000: already done" in said
    assert f"[arc2-t100] resuming after epoch {killed_at}" in said
    assert f"[arc2-t100] epoch {killed_at + 1}/{epochs}" in said
    assert f"[arc2-t100] epoch {killed_at}/{epochs}" not in said
    assert (t1 / "model.keras").stat().st_mtime_ns == mtime1
    hist = read_history(t2 / "history.csv")
    assert [h["epoch"] for h in hist] == list(range(1, epochs + 1))
    assert json.loads((t2 / "status.json").read_text())["state"] == "done"
    assert not list(out.rglob("*.tmp*"))  # no half-written leftovers that a reader could pick up
    # exact resume: the same history as a run that was never killed (data order, Dropout
    # generators and optimizer state are part of the checkpoint); the uninterrupted run trains
    # only arc2-t100 (every trial starts from the run's seed, so arc2-t000 before it changes nothing)
    ref = tmp_path / "uninterrupted"
    code, said = _train_here(_cmd(pattern_folder, ref, epochs, trainable="1"), tmp_path)
    assert code == 0, said
    _same_history(hist, read_history(ref / "trials" / "arc2-t100" / "history.csv"))


def _same_history(got: list[dict], want: list[dict]) -> None:
    assert [h["epoch"] for h in got] == [h["epoch"] for h in want]
    for a, b in zip(got, want):
        for k in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["epoch"], k, a[k], b[k])


def _kill_when(cmd, tmp_path: Path, env, tdir: Path, *, deadline: float, ready) -> int:
    """Run ``cmd``, SIGKILL it as soon as ``ready()``; returns the last epoch ``tdir`` finished."""
    log = open(tmp_path / "kill.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    until = time.time() + deadline
    try:
        while not ready():
            assert proc.poll() is None, (tmp_path / "kill.log").read_text()
            if time.time() > until:
                pytest.fail(f"the run did not get there in {deadline:.0f} s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return _state(tdir / "state.json")["epoch"]


def _kill_after(cmd, tdir: Path, epoch: int, tmp_path: Path, env) -> int:
    return _kill_when(cmd, tmp_path, env, tdir, deadline=300,
                      ready=lambda: _state(tdir / "state.json").get("epoch", 0) >= epoch)


def test_a_cached_trial_killed_and_resumed_has_the_history_of_an_uninterrupted_one(pattern_folder, tmp_path):
    """The trainable part of arc2 trains on the cached frozen part (shuffled rows, Dropout);
    killed mid-run and resumed it must reproduce the uninterrupted history."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO / "src"))
    epochs = 8

    def cmd(out):
        return [sys.executable, "-m", "transfer.cli", "train", str(pattern_folder), "--backbone", "arc2",
                "--trainable", "0.5", "--weights", "none", "--epochs", str(epochs), "--image-size", "16",
                "--batch-size", "16", "--patience", "0", "--lr", "0.003", "--out", str(out)]

    tdir = tmp_path / "run" / "trials" / "arc2-t050"
    killed_at = _kill_after(cmd(tmp_path / "run"), tdir, 3, tmp_path, env)
    assert killed_at < epochs
    code, said = _train_here(cmd(tmp_path / "run"), tmp_path)
    assert code == 0 and f"resuming after epoch {killed_at}" in said, said
    code, said = _train_here(cmd(tmp_path / "ref"), tmp_path)
    assert code == 0, said
    got = read_history(tdir / "history.csv")
    _same_history(got, read_history(tmp_path / "ref" / "trials" / "arc2-t050" / "history.csv"))
    m = json.loads((tdir / "metrics.json").read_text())
    assert m["cache"]["mode"] == "cached"


def test_two_stage_from_random_weights_trains_batchnorm_in_the_fine_tuning_stage():
    """Without pretrained weights the BatchNorm statistics are 0 / 1 and must be learned in
    every stage (the one-stage path did; the fine-tuning stage of two-stage did not)."""
    from transfer.trainer.fit import plan_stages

    cfg = load_config(None, {"data": "d", "out": "r", "backbones": "mobilenet_v2", "trainable": "0.5",
                             "two_stage": True, "weights": "none"})
    spec = TrialSpec(name="mobilenet_v2-t050", group="mobilenet_v2-t050", fold=None, backbone="mobilenet_v2",
                     init="scratch", weights="none", trainable=0.5, freeze_by="layers", image_size=(32, 32))
    head, finetune = plan_stages(cfg, spec)
    assert head.probe and head.fraction == 0.0  # a pooled backbone's head stage is the linear probe
    assert finetune.fraction == 0.5 and finetune.train_bn
    pretrained = TrialSpec(**{**spec.__dict__, "init": "pretrained", "weights": "imagenet"})
    assert not plan_stages(cfg, pretrained)[1].train_bn  # pretrained statistics stay frozen
