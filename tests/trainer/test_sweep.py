"""Real sweeps on a tiny image folder (arc2 at 16x16, random weights, 2 epochs)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.trainer import base_overrides
from transfer.errors import ConfigError
from transfer.runfolder import RunFolder
from transfer.trainer.config import load_config
from transfer.trainer.sweep import run_sweep


@pytest.fixture(scope="module")
def sweep_run(pattern_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r1"
    cfg = load_config(None, base_overrides(pattern_folder, out))
    lines: list[str] = []
    res = run_sweep(cfg, progress=lines.append)
    return cfg, res, lines


def test_sweep_writes_the_layout(sweep_run):
    cfg, res, lines = sweep_run
    run = res.run_dir
    assert res.ok, res.failed
    for f in ("run.json", "config.yaml", "dataset.json", "bad_files.csv", "splits/train.csv",
              "splits/val.csv", "splits/test.csv", "init/arc2-scratch.weights.h5",
              "sweep.csv", "sweep.md", "best.json"):
        assert (run / f).is_file(), f
    ds = json.loads((run / "dataset.json").read_text())
    assert ds["class_names"] == ["c0", "c1", "c2"] and ds["num_images"] == 48
    assert sum(ds["counts"].values()) == 48 and ds["split"]["method"] == "stratified"
    for name in ("arc2-t000", "arc2-t100"):
        t = run / "trials" / name
        for f in ("trial.json", "status.json", "history.csv", "curves.png", "model.keras", "metrics.json"):
            assert (t / f).is_file(), (name, f)
        assert json.loads((t / "status.json").read_text())["state"] == "done"
        m = json.loads((t / "metrics.json").read_text())
        for split in ("train", "val", "test"):
            assert 0.0 <= m[split]["accuracy"] <= 1.0 and m[split]["loss"] >= 0
        assert m["epochs_run"] == 2 and 1 <= m["best_epoch"] <= 2 and m["seconds_per_epoch"] > 0
        assert m["params"]["total"] == m["params"]["trainable"] + m["params"]["non_trainable"]
        with open(t / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["epoch"] for r in rows] == ["1", "2"]
        meta = json.loads((t / "trial.json").read_text())
        assert meta["image_size"] == [16, 16] and meta["num_classes"] == 3 and meta["backbone"] == "arc2"
    m0 = json.loads((run / "trials/arc2-t000/metrics.json").read_text())
    m1 = json.loads((run / "trials/arc2-t100/metrics.json").read_text())
    assert m0["params"]["trainable"] < m1["params"]["trainable"]  # frozen backbone trains the head only
    md = (run / "sweep.md").read_text()
    assert "| metric | arc2 0% | arc2 100% |" in md
    for row in ("train accuracy", "val accuracy", "test accuracy", "trainable params", "sec/epoch"):
        assert row in md
    best = json.loads((run / "best.json").read_text())
    # best.json names the trial with the highest val accuracy (ties: the lower val loss)
    ms = {n: json.loads((run / "trials" / n / "metrics.json").read_text()) for n in ("arc2-t000", "arc2-t100")}
    want = max(ms, key=lambda n: (ms[n]["val"]["accuracy"], -ms[n]["val"]["loss"]))
    assert best["trial"] == want and best["metric"] == "val_accuracy"
    assert best["value"] == ms[want]["val"]["accuracy"] and best["test_accuracy"] == ms[want]["test"]["accuracy"]
    assert any("trial 1/2 arc2-t000" in ln for ln in lines)
    assert any("epoch 2/2" in ln and "val_acc" in ln for ln in lines)
    # the read-only view of later commands accepts the folder
    run = RunFolder(run)
    assert {t.name for t in run.finished_trials()} == {"arc2-t000", "arc2-t100"}
    model = run.trial("best").load_model()
    assert model.output_shape == (None, 3)
    # re-running skips finished trials
    again: list[str] = []
    run_sweep(cfg, progress=again.append)
    assert sum("already done" in ln for ln in again) == 2


def test_same_seed_same_result(sweep_run, tmp_path):
    cfg, res, _ = sweep_run
    cfg2 = load_config(None, base_overrides(cfg.data, tmp_path / "r2"))
    res2 = run_sweep(cfg2, progress=lambda s: None)
    from transfer.models.build import load_model

    for name in ("arc2-t000", "arc2-t100"):
        a = json.loads((res.run_dir / "trials" / name / "metrics.json").read_text())
        b = json.loads((res2.run_dir / "trials" / name / "metrics.json").read_text())
        for split in ("train", "val", "test"):
            assert a[split] == b[split]
        wa = load_model(res.run_dir / "trials" / name / "model.keras").get_weights()
        wb = load_model(res2.run_dir / "trials" / name / "model.keras").get_weights()
        for x, y in zip(wa, wb):
            np.testing.assert_array_equal(x, y)
    for s in ("train", "val", "test"):
        assert (res.run_dir / "splits" / f"{s}.csv").read_text() == (res2.run_dir / "splits" / f"{s}.csv").read_text()


def test_changed_config_is_refused(sweep_run):
    cfg, res, _ = sweep_run
    changed = load_config(None, base_overrides(cfg.data, res.run_dir, epochs=3, lr=0.01))
    with pytest.raises(ConfigError) as ei:
        run_sweep(changed, progress=lambda s: None)
    assert "epochs: 2 -> 3" in ei.value.message and "lr" in ei.value.message


def test_cli_flags_override_yaml(sweep_run, tmp_path):
    """--config values are overridden by explicit flags; the differing key is named."""
    from transfer.cli import cli

    cfg, res, _ = sweep_run
    y = tmp_path / "c.yaml"
    y.write_text(cfg.to_yaml().replace("\nepochs: 2\n", "\nepochs: 9\n"))
    r = CliRunner().invoke(cli, ["train", "--config", str(y)])
    assert r.exit_code == 2 and "epochs: 2 -> 9" in r.output, r.output
    # an explicit --epochs 2 wins over the YAML's 9: same config, so the run resumes (all done)
    r = CliRunner().invoke(cli, ["train", "--config", str(y), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "already done" in r.output and "best trial: " in r.output and "| metric |" in r.output
    r = CliRunner().invoke(cli, ["train", "--config", str(y), "--epochs", "2", "--optimizer", "rms"])
    assert r.exit_code == 2


def test_unknown_yaml_key_cli(tmp_path):
    from transfer.cli import cli

    y = tmp_path / "c.yaml"
    y.write_text("nonsense: 1\n")
    r = CliRunner().invoke(cli, ["train", "d", "--out", str(tmp_path / "o"), "--config", str(y)])
    assert r.exit_code == 2 and "nonsense" in r.output and "accepted keys" in r.output


def test_imagenet_default_trains_small_cnns_from_scratch(tmp_path):
    """--weights imagenet (the default) on a mixed sweep: the Keras application keeps
    ImageNet, arc2/arc3 (no published weights) start from random weights."""
    from transfer.trainer.sweep import plan_trials

    cfg = load_config(None, {"data": str(tmp_path), "out": str(tmp_path / "r"),
                             "backbones": "mobilenet_v2,arc2", "trainable": "0,1", "image_size": 32})
    by = {(t.backbone, t.trainable): t for t in plan_trials(cfg)}
    assert by[("mobilenet_v2", 0.0)].init == "pretrained" and by[("mobilenet_v2", 0.0)].weights == "imagenet"
    assert by[("arc2", 0.0)].init == "scratch" and by[("arc2", 1.0)].weights == "none"


def test_random_init_is_not_trained_twice(tmp_path):
    """A backbone that starts from random weights already: its t100 trial is the random-init
    trial, so --random-init adds nothing; with ImageNet weights (or without 1.0) it is added."""
    from transfer.trainer.sweep import duplicate_random_trials, plan_trials

    def names(**kw):
        cfg = load_config(None, {"data": str(tmp_path), "out": str(tmp_path / "r"), "backbones": "mobilenet_v2,arc2",
                                 "image_size": 32, "random_init": True, **kw})
        return [t.name for t in plan_trials(cfg)], duplicate_random_trials(cfg)

    got, dup = names(trainable="0,1", weights="none")
    assert got == ["mobilenet_v2-t000", "mobilenet_v2-t100", "arc2-t000", "arc2-t100"]
    assert dup == ["mobilenet_v2", "arc2"]
    got, dup = names(trainable="0,1", weights="imagenet")
    assert got == ["mobilenet_v2-t000", "mobilenet_v2-t100", "mobilenet_v2-random", "arc2-t000", "arc2-t100"]
    assert dup == ["arc2"]
    got, dup = names(trainable="0.3", weights="none")  # no t100 trial: the random one is kept
    assert got == ["mobilenet_v2-t030", "mobilenet_v2-random", "arc2-t030", "arc2-random"] and dup == []


def test_kfold_on_a_presplit_dataset_is_a_clear_error(tmp_path):
    from PIL import Image

    from transfer.cli import cli

    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "d" / split / c / f"{i}.png")
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "d"), "--backbone", "arc2", "--weights", "none",
                                 "--image-size", "16", "--kfold", "2", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert "--kfold: 2-fold cross-validation needs one pool of images" in r.output and "train/ val/ test/" in r.output
    assert "Traceback" not in r.output


def test_kfold_two_stage_l1_and_tensorboard_end_to_end(tmp_path):
    """The options only a full sweep exercises: --kfold 2 (one trial per fold, mean ± std
    in the table), --two-stage (head epochs, then fine-tuning at a lower lr), --loss l1,
    --tensorboard (event files)."""
    from helpers.trainer import make_pattern_folder

    data = make_pattern_folder(tmp_path / "data", per_class=12)
    cfg = load_config(None, base_overrides(data, tmp_path / "run", trainable="0.5", kfold=2, two_stage=True,
                                           head_epochs=1, epochs=1, loss="l1", tensorboard=True))
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok and not res.failed
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "trials").iterdir()) == ["arc2-t050-f1", "arc2-t050-f2"]
    for k in (1, 2):
        tdir = run / "trials" / f"arc2-t050-f{k}"
        with open(tdir / "history.csv", newline="") as fh:
            hist = list(csv.DictReader(fh))
        assert [int(r["epoch"]) for r in hist] == [1, 2]  # 1 head epoch + 1 fine-tuning epoch
        assert float(hist[1]["lr"]) < float(hist[0]["lr"])  # fine-tuning runs at the lower lr
        assert any((tdir / "tensorboard").rglob("events.out.tfevents.*"))
        # the two folds validate on disjoint images
        assert (run / "splits" / f"fold{k}" / "val.csv").is_file()
    v1, v2 = ({l for l in (run / "splits" / f"fold{k}" / "val.csv").read_text().splitlines()[1:]} for k in (1, 2))
    assert v1 and v2 and not (v1 & v2)
    table = (run / "sweep.md").read_text()
    assert "±" in table and "arc2 50%" in table
    # analysis of a fold trial uses that fold's own val images (fold 1's val is in fold 2's train)
    from transfer.analysis.features import load_split

    got = load_split(run, "arc2-t050-f2", "val")
    fold2_val = {l.split(",")[0] for l in (run / "splits" / "fold2" / "val.csv").read_text().splitlines()[1:]}
    assert {str(p.relative_to(data)) for p in got["paths"]} == fold2_val


def test_options_that_would_lose_or_hide_work_are_refused_before_training(tmp_path):
    """Found by a hostile review: --out inside the data folder (its folders became
    classes next time), a missing --weights file (the run folder was created and the
    hint could not be followed), fractions whose trial names collide (silently dropped)."""
    from helpers.trainer import make_pattern_folder
    from transfer.trainer.sweep import plan_trials

    data = make_pattern_folder(tmp_path / "data", per_class=4)
    for out, match in [(data, "inside the data folder"), (data / "run", "inside the data folder")]:
        with pytest.raises(ConfigError, match=match):
            run_sweep(load_config(None, base_overrides(data, out)), progress=lambda s: None)
    with pytest.raises(ConfigError, match="no such file"):
        run_sweep(load_config(None, base_overrides(data, tmp_path / "r", weights=str(tmp_path / "nope.h5"))),
                  progress=lambda s: None)
    assert not (tmp_path / "r").exists() and sorted(p.name for p in data.iterdir()) == ["c0", "c1", "c2"]
    with pytest.raises(ConfigError, match="0.304 and 0.3 of arc2 are both trial arc2-t030"):
        plan_trials(load_config(None, base_overrides(data, tmp_path / "r", trainable="0.3,0.304")))


def test_no_val_split_is_labelled_and_a_changed_dataset_is_refused_on_resume(tmp_path):
    from helpers.trainer import make_pattern_folder
    from transfer.errors import DataError

    data = make_pattern_folder(tmp_path / "data", per_class=8)
    cfg = load_config(None, base_overrides(data, tmp_path / "run", trainable="1", epochs=1, val=0.0, test=0.25))
    lines: list[str] = []
    res = run_sweep(cfg, progress=lines.append)
    assert res.ok and res.best["metric"] == "train_accuracy"  # not passed off as validation accuracy
    assert any("no validation images" in s for s in lines)
    (data / "c0").rename(data / "z0")  # the run's label 0 would now be called 'c1'
    with pytest.raises(DataError, match="gone: c0; new: z0"):
        run_sweep(cfg, progress=lambda s: None)
    (data / "z0").rename(data / "c0")
    assert run_sweep(cfg, progress=lambda s: None).ok  # restored: resumes (nothing to train)


def test_a_refused_dataset_still_leaves_its_bad_file_list(tmp_path):
    from helpers.trainer import make_pattern_folder
    from transfer.errors import DataError

    data = make_pattern_folder(tmp_path / "data", per_class=4)
    for f in (data / "c2").iterdir():  # every image of one class broken
        f.write_bytes(b"not a png")
    with pytest.raises(DataError, match="class folder .*c2 has no usable image") as e:
        run_sweep(load_config(None, base_overrides(data, tmp_path / "run")), progress=lambda s: None)
    assert "bad_files.csv" in e.value.hint
    rows = (tmp_path / "run" / "bad_files.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(r.startswith("c2/") for r in rows[1:])


def _given_folder(root, per_class=(10, 4)):
    from PIL import Image

    for split, n in (("train", per_class[0]), ("test", per_class[1])):
        for c, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), tuple(v // 2 + 5 * i for v in colour)).save(root / split / c / f"{i}.png")
    return root


def test_val_is_carved_from_the_given_train_folder(tmp_path):
    """A published layout with train/ and test/ only: the validation fraction comes out of
    train/ (stratified, seeded), early stopping watches it, dataset.json says so."""
    data = _given_folder(tmp_path / "d")
    lines: list[str] = []
    cfg = load_config(None, base_overrides(data, tmp_path / "run", trainable="1", epochs=1, val=0.3))
    res = run_sweep(cfg, progress=lines.append)
    assert res.ok and res.best["metric"] == "val_accuracy"
    run = RunFolder(res.run_dir)
    train, val, test = (set(run.split(k)) for k in ("train", "val", "test"))
    assert len(val) == 9 and len(train) == 21 and len(test) == 12  # 3 of the 10 train/ images per class
    assert {p.split("/")[0] for p, _ in val} == {"train"} and not (val & train)
    assert sorted(lab for _, lab in val) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # stratified
    ds = json.loads((res.run_dir / "dataset.json").read_text())
    assert ds["split"]["method"] == "given" and ds["split"]["val"] == 0.3 and ds["split"]["val_from"] == "train"
    assert ds["counts"] == {"train": 21, "val": 9, "test": 12}
    assert any("held out of train/" in s for s in lines) and not any("no validation images" in s for s in lines)
    again = load_config(None, base_overrides(data, tmp_path / "run2", trainable="1", epochs=1, val=0.3))
    run_sweep(again, progress=lambda s: None)
    assert set(RunFolder(tmp_path / "run2").split("val")) == val  # seeded: the same images


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, pattern_folder):
    from transfer.errors import RunFolderError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "best.json").write_text("{}")
    with pytest.raises(RunFolderError, match="not empty and is not a run folder .*best.json, notes.txt") as e:
        run_sweep(load_config(None, base_overrides(pattern_folder, out)), progress=lambda s: None)
    assert e.value.option == "out"
    assert sorted(p.name for p in out.iterdir()) == ["best.json", "notes.txt"]  # nothing written
    assert (out / "best.json").read_text() == "{}"
    r = CliRunner().invoke(__import__("transfer.cli", fromlist=["cli"]).cli,
                           ["train", str(pattern_folder), "--out", str(out), "--backbone", "arc2"])
    assert r.exit_code == 1 and "error: --out: " in r.output and "not a run folder" in r.output
    # an empty folder and one holding only split files made ahead of training are fine
    (tmp_path / "empty").mkdir()
    from transfer.runfolder import RunWriter

    RunWriter(tmp_path / "empty").check_target()
    (tmp_path / "presplit" / "splits").mkdir(parents=True)
    RunWriter(tmp_path / "presplit").check_target()


def test_two_trains_into_one_folder_one_proceeds_the_other_names_it(tmp_path, pattern_folder):
    """Two real `transfer train --out same` processes: the second exits 1 at once, naming the
    first (PID, command, since when). The lock of a holder killed with SIGKILL is released by
    the system: the next run takes it over and finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from transfer.locks import lock_path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(repo / "src"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "transfer.cli", "train", str(pattern_folder), "--backbone", "arc2", "--trainable",
           "1", "--weights", "none", "--epochs", "3", "--image-size", "16", "--batch-size", "16", "--out", str(out)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (lock_path(out).is_file() and lock_path(out).read_text()):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert f"is in use by PID {first.pid}" in second.stderr and " train " in second.stderr
        assert first.poll() is None  # the first goes on
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert json.loads(lock_path(out).read_text())["pid"] == first.pid  # the killed holder's record is left
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert json.loads((out / "trials" / "arc2-t100" / "status.json").read_text())["state"] == "done"
    assert not lock_path(out).exists()
