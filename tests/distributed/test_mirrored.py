"""``--strategy mirrored``: one trial over two logical CPU devices (in a subprocess, since
logical devices must be configured before TensorFlow runs any op)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from transfer.errors import ConfigError
from transfer.trainer.config import load_config

HERE = Path(__file__).resolve().parent

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[3])
    from helpers.trainer import base_overrides, make_pattern_folder
    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    from pathlib import Path
    import numpy as np
    # 23 per class: an odd val split, and batches of 7: every batch, the first included,
    # splits unevenly over 2 replicas (TensorFlow fails on that unless it is padded)
    data = make_pattern_folder(Path(sys.argv[1]), per_class=23)  # 48/15/6
    lines = []
    cfg = load_config(None, base_overrides(data, sys.argv[2], trainable="1", epochs=2, batch_size=7,
                                           strategy="mirrored"))
    res = run_sweep(cfg, progress=lines.append)
    # the recorded val accuracy must be the exact one (no padded repeats counted)
    from transfer.data.image import load_image
    from transfer.models.build import load_model
    import csv
    rows = [r for r in csv.DictReader(open(Path(sys.argv[2]) / "splits" / "val.csv"))]
    x = np.stack([load_image(data / r["path"], (16, 16)) for r in rows]).astype("float32")
    y = np.array([int(r["label"]) for r in rows])
    m = load_model(Path(sys.argv[2]) / "trials" / "arc2-t100" / "model.keras")
    acc = float((m.predict(x, verbose=0).argmax(1) == y).mean())
    print("RESULT " + json.dumps({"ok": res.ok, "failed": res.failed, "lines": lines, "n_val": len(rows),
                                  "acc": acc}))
""")


def test_mirrored_trial_on_two_logical_cpus(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONHASHSEED="0")
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "data"), str(run), str(HERE.parent)],
                       capture_output=True, text=True, timeout=240, env=env)
    out = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and out, p.stderr[-3000:]
    res = json.loads(out[-1][len("RESULT "):])
    assert res["ok"], res["failed"]
    assert any("mirrored strategy: 2 replica(s) on" in l and "CPU:1" in l for l in res["lines"]), res["lines"]
    tdir = run / "trials" / "arc2-t100"
    metrics = json.loads((tdir / "metrics.json").read_text())
    assert json.loads((tdir / "status.json").read_text())["state"] == "done"
    assert metrics["epochs_run"] == 2 and 0.0 <= metrics["val"]["accuracy"] <= 1.0
    assert res["n_val"] % 2 == 1  # the uneven case really was exercised
    assert metrics["val"]["accuracy"] == pytest.approx(res["acc"], abs=1e-6)
    with open(tdir / "history.csv", newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in hist] == [1, 2] and all(float(r["loss"]) > 0 for r in hist)
    assert (tdir / "model.keras").is_file() and (run / "sweep.csv").is_file()
    assert "strategy: mirrored" in (run / "config.yaml").read_text()


def test_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match="invalid strategy: 'ring'.*default, mirrored"):
        load_config(None, {"data": "d", "out": "r", "backbones": "arc2", "strategy": "ring"})


def test_strategy_flag_reaches_the_config(tmp_path):
    from click.testing import CliRunner

    from transfer.cli import cli

    r = CliRunner().invoke(cli, ["train", "--help"])
    assert "--strategy [default|mirrored]" in r.output
    r = CliRunner().invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--cpus-per-trial", "2"])
    assert r.exit_code == 2 and "--cpus-per-trial needs --ray" in r.output
