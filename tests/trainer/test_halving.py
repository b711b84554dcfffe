"""Sweeps by successive halving on a tiny image folder (arc2 at 16x16, random weights): the rung
decisions, what a stopped trial's metrics say, the same numbers as a full sweep for the trials
that go on, resume after a kill, and a trial trained rung by rung traced once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.trainer import base_overrides
from transfer.runfolder import RunFolder, RunLayout
from transfer.trainer.config import load_config
from transfer.trainer.sweep import run_sweep


@pytest.fixture(scope="module")
def noisy_folder(tmp_path_factory):
    """Harder than the default patterns (more noise, more classes): trials differ after an epoch."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data") / "noisy"
    rng = np.random.default_rng(3)
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(16):
            img = rng.integers(0, 160, size=(16, 16, 3), dtype=np.uint8)
            img[c * 4:(c + 1) * 4, :, c % 3] = np.clip(img[c * 4:(c + 1) * 4, :, c % 3].astype(int) + 90, 0, 255)
            Image.fromarray(img).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def _cfg(data, out, **kw):
    return load_config(None, base_overrides(data, out, **{"trainable": "0,0.5,1", "epochs": 3, **kw}))


@pytest.fixture(scope="module")
def both(noisy_folder, tmp_path_factory):
    """The same three-trial sweep by halving (rungs at epochs 1 and 3, the best third goes on) and in full."""
    root = tmp_path_factory.mktemp("runs")
    lines: list[str] = []
    halving = run_sweep(_cfg(noisy_folder, root / "halving", schedule="halving"), progress=lines.append)
    full = run_sweep(_cfg(noisy_folder, root / "full"), progress=lambda s: None)
    return halving, full, lines


def _metrics(run, name):
    return RunFolder(run).trial(name).metrics if RunFolder(run).trial(name).finished else None


def test_the_rung_decision_is_recorded_and_the_stopped_trials_say_where_and_why(both):
    halving, _, lines = both
    assert halving.ok, halving.failed
    run = RunLayout(halving.run_dir)
    record = run.rungs()
    assert record["schedule"] == "halving" and record["rungs"] == [1, 3] and record["rate"] == 3
    assert set(record["signals"]) == {"arc2"} and record["signals"]["arc2"]["feature_dim"] == 64
    (d,) = record["decisions"]
    assert d["rung"] == 1 and d["epoch"] == 1 and len(d["promoted"]) == 1 and len(d["stopped"]) == 2
    # the decision is the documented ranking of what the trials' files say: val accuracy of the saved
    # epoch, then more trainable parameters, then the name
    from transfer.trainer.schedule import Standing, decide

    standings = [Standing.from_dict(s) for s in d["standings"]]
    assert decide(1, 1, standings, 3).to_dict() == d
    for s in standings:
        hist = run.trial_paths(s.trial).history()
        assert s.accuracy == next(r["val_accuracy"] for r in hist if r["epoch"] == 1)
    (winner,) = d["promoted"]
    for name in d["stopped"]:
        m = _metrics(halving.run_dir, name)
        assert m["stopped"]["epoch"] == 1 and m["stopped"]["rung"] == 1 and m["epochs_trained"] == 1
        assert m["epochs_budget"] == 3 and "successive halving" in m["stopped"]["why"]
        assert len(run.trial_paths(name).history()) == 1 and run.trial_paths(name).model_keras.is_file()
    m = _metrics(halving.run_dir, winner)
    assert m["stopped"] is None and m["epochs_trained"] == 3
    best = json.loads(run.best_json.read_text())
    assert best["trial"] == winner  # only trials trained to the full budget are chosen
    md = run.sweep_md.read_text()
    assert "| epochs |" in md and "1 of 3 (stopped at rung 1: place" in md
    assert any(ln.startswith("rung 1 (epoch 1): 1 of 3 go on") for ln in lines)
    assert any("arc2: LogME" in ln for ln in lines)


def test_a_trial_that_goes_on_has_the_numbers_it_has_in_a_full_sweep(both):
    halving, full, _ = both
    (winner,) = RunLayout(halving.run_dir).rungs()["decisions"][0]["promoted"]
    h = RunLayout(halving.run_dir).trial_paths(winner)
    f = RunLayout(full.run_dir).trial_paths(winner)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(h.history()) == strip(f.history())
    mh, mf = h.metrics(), f.metrics()
    for split in ("train", "val", "test"):
        assert mh[split] == mf[split], split
    # and a stopped trial's numbers are those of the epoch it saved: the full sweep's same trial at epoch 1
    stopped = RunLayout(halving.run_dir).rungs()["decisions"][0]["stopped"][0]
    assert strip(RunLayout(halving.run_dir).trial_paths(stopped).history()) == \
        strip(RunLayout(full.run_dir).trial_paths(stopped).history())[:1]


def test_the_report_shows_the_rungs(both):
    from transfer.analysis.report import write_report

    halving, _, _ = both
    write_report(halving.run_dir)
    md = RunLayout(halving.run_dir).report_md.read_text()
    assert "Successive halving: validation accuracy at each rung" in md and "rung 1 (epoch 1)" in md
    assert "stopped at epoch 1" in md and "trained to the full budget" in md


def test_evaluation_reads_the_cache_and_gives_the_numbers_of_the_saved_model_on_the_images(both):
    """Val and test of a trial with a frozen part come from its cache through the saved model's trained
    layers; the saved model run on the images gives the same numbers."""
    from transfer.data.stream import batches
    from transfer.models.build import load_model
    from transfer.trainer.probe import head_numbers

    _, full, _ = both
    run = RunFolder(full.run_dir)
    trial = run.trial("arc2-t050")
    m = trial.metrics
    assert "cache" in m["features_from"]["val"] and "cache" in m["features_from"]["test"]
    model = load_model(trial.model_path)
    import keras

    feats_model = keras.Model(model.inputs, model.get_layer("features").output)
    kernel, bias = model.get_layer("probs").get_weights()
    for split in ("val", "test"):
        paths, labels = run.split_paths(split)
        feats = []
        for b in batches([(str(p), None) for p in paths], (16, 16), batch=16, recipe=run.recipe):
            assert len(b.ok_index) == len(b.items)
            feats.append(np.asarray(feats_model(b.x, training=False)))
        loss, acc = head_numbers(np.concatenate(feats), np.asarray(labels), kernel, bias, "crossentropy")
        assert acc == m[split]["accuracy"] and loss == pytest.approx(m[split]["loss"], rel=1e-5), split


def test_a_schedule_with_one_trial_runs_as_a_plain_sweep_and_says_so(pattern_folder, tmp_path):
    lines: list[str] = []
    res = run_sweep(_cfg(pattern_folder, tmp_path / "one", trainable="1", epochs=2, schedule="halving"),
                    progress=lines.append)
    assert res.ok and any("has one: it runs as a plain sweep" in ln for ln in lines)
    run = RunLayout(res.run_dir)
    assert not run.rungs_json.exists() and run.trial_paths("arc2-t100").metrics()["epochs_trained"] == 2


def test_a_trial_trained_rung_by_rung_in_one_process_is_traced_once(pattern_folder, tmp_path):
    from transfer.runfolder import RunWriter
    from transfer.trainer.fit import TrialRun
    from transfer.trainer.prepare import prepare_run

    cfg = _cfg(pattern_folder, tmp_path / "run", trainable="0.5", epochs=3)
    run, (spec,) = prepare_run(cfg)
    data = run.trial_data(spec)
    trial = TrialRun.open(RunWriter(tmp_path / "run").path, cfg, spec, data)
    trial.train(until=1)
    stage = trial.open_stage
    assert trial.epoch == 1 and not trial.ended and stage is not None
    trial.pause()
    assert RunLayout(tmp_path / "run").trial_paths(spec.name).status()["state"] == "paused"
    trial.train(until=2)
    trial.train()
    assert trial.ended and trial.epoch == 3
    assert stage.step._fn.experimental_get_tracing_count() == 1  # one train step for the three calls
    assert stage.data.validate.step._fn.experimental_get_tracing_count() == 1
    m = trial.finish()
    assert m["epochs_trained"] == 3 and m["stopped"] is None


@pytest.mark.slow
def test_killed_mid_rung_the_sweep_resumes_to_the_same_decisions_and_trains_no_epoch_twice(noisy_folder, tmp_path):
    """Rungs at epochs 1, 2, 3 (rate 2): the sweep is killed after the first epoch of rung 2's second
    trial; the resumed sweep reads rung 1's decision back and each (trial, epoch) is trained once."""
    import re

    kw = dict(trainable="0,0.3,0.6,1", schedule="halving", halving_rate=2)
    ref = run_sweep(_cfg(noisy_folder, tmp_path / "ref", **kw), progress=lambda s: None)
    order = RunLayout(ref.run_dir).rungs()["decisions"][1]["standings"]
    second = [s["trial"] for s in order if s["state"] == "training"][1]

    seen: list[str] = []

    def killer(line: str) -> None:
        seen.append(line)
        if f"[{second}] epoch 2/3" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(_cfg(noisy_folder, tmp_path / "run", **kw), progress=killer)
    run = RunLayout(tmp_path / "run")
    stopped_at_1 = run.rungs()["decisions"][0]["stopped"]
    stamps = {n: run.trial_paths(n).metrics_json.stat().st_mtime_ns for n in stopped_at_1}
    again: list[str] = []
    res = run_sweep(_cfg(noisy_folder, tmp_path / "run", **kw), progress=again.append)
    assert res.ok and any(ln.startswith("rung 1 (epoch 1) (recorded)") for ln in again)
    assert {n: run.trial_paths(n).metrics_json.stat().st_mtime_ns for n in stopped_at_1} == stamps
    trained = [m.groups() for ln in seen + again if (m := re.search(r"\[(\S+)\] epoch (\d+)/3", ln))]
    assert len(trained) == len(set(trained)), trained  # no (trial, epoch) trained twice
    assert run.rungs()["decisions"] == RunLayout(ref.run_dir).rungs()["decisions"]
    for d in (run, RunLayout(ref.run_dir)):
        assert json.loads(d.best_json.read_text())["trial"] == json.loads(run.best_json.read_text())["trial"]


def _train_args(data, out, *more):
    return ["train", str(data), "--backbone", "arc2", "--weights", "none", "--image-size", "16", "--batch-size", "16",
            "--patience", "0", "--lr", "3e-3", "--workers", "1", "--out", str(out), *more]


def test_from_the_cli_fewer_epochs_than_rungs_runs_a_plain_sweep_says_so_and_best_json_records_it(pattern_folder,
                                                                                                   tmp_path):
    from click.testing import CliRunner

    from transfer.cli import cli

    res = CliRunner().invoke(cli, _train_args(pattern_folder, tmp_path / "run", "--trainable", "0,1", "--epochs", "2",
                                              "--schedule", "halving", "--first-rung", "2"))
    assert res.exit_code == 0, res.output
    assert "successive halving needs at least two rungs, and --epochs 2 with a first rung of 2" in res.output
    run = RunLayout(tmp_path / "run")
    assert not run.rungs_json.exists()
    for name in ("arc2-t000", "arc2-t100"):
        m = run.trial_paths(name).metrics()
        assert m["stopped"] is None and m["epochs_trained"] == 2
    best = json.loads(run.best_json.read_text())
    assert best["schedule"] == "full" and "at least two rungs" in best["schedule_note"]


def _history_rows(run: RunLayout, name: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in run.trial_paths(name).history()]


@pytest.mark.slow
def test_from_the_cli_a_sweep_killed_mid_rung_resumes_to_the_recorded_decisions_and_trains_nothing_twice(
        noisy_folder, tmp_path):
    """``transfer train --schedule halving`` SIGKILLed between the two trials of rung 2 (rungs at epochs 1, 2,
    3; rate 2), then run again: rung 1's recorded decision is read back, the trials it stopped are not
    opened again, and every trial's history is that of an uninterrupted sweep (each epoch once)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(repo / "src"))
    more = ("--trainable", "0,0.3,0.6,1", "--epochs", "3", "--schedule", "halving", "--halving-rate", "2")

    def cmd(out):
        return [sys.executable, "-m", "transfer.cli", *_train_args(noisy_folder, out, *more)]

    proc = subprocess.Popen(cmd(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("rung 2/3 (epoch 2), trial 2/2"):  # the first trial of rung 2 has trained it
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    run = RunLayout(tmp_path / "run")
    record = run.rungs()
    assert [d["rung"] for d in record["decisions"]] == [1]
    stopped = record["decisions"][0]["stopped"]
    stamps = {n: run.trial_paths(n).metrics_json.stat().st_mtime_ns for n in stopped}

    again = subprocess.run(cmd(tmp_path / "run"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "rung 1 (epoch 1) (recorded)" in again.stderr
    assert not any(f"[{n}]" in again.stderr for n in stopped)  # stopped trials are not opened again
    assert {n: run.trial_paths(n).metrics_json.stat().st_mtime_ns for n in stopped} == stamps

    ref = subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    ref_run = RunLayout(tmp_path / "ref")
    assert run.rungs()["decisions"] == ref_run.rungs()["decisions"]
    assert json.loads(run.best_json.read_text())["trial"] == json.loads(ref_run.best_json.read_text())["trial"]
    for name in ("arc2-t000", "arc2-t030", "arc2-t060", "arc2-t100"):
        rows = _history_rows(run, name)
        assert rows == _history_rows(ref_run, name), name  # each epoch once, the numbers of an uninterrupted sweep
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
