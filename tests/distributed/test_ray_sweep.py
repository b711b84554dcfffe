"""A real two-trial sweep on a local Ray instance: same run folder and table as locally, resume."""

from __future__ import annotations

import csv

import pytest

ray = pytest.importorskip("ray", reason='Ray is optional: pip install "transfer[distributed]"')
from helpers.runs import make_pattern_folder  # noqa: E402
from transfer.trainer.config import load_config  # noqa: E402
from transfer.trainer.distributed import RayOptions  # noqa: E402
from transfer.trainer.sweep import run_sweep  # noqa: E402


def _cfg(data, out):
    return load_config(None, {"data": str(data), "out": str(out), "backbones": "arc2", "trainable": "0,1",
                              "weights": "none", "epochs": 1, "image_size": 16, "batch_size": 16,
                              "patience": 0, "workers": 1, "lr": 3e-3})


def _table(run):
    with open(run / "sweep.csv", newline="") as fh:
        return list(csv.reader(fh))


def test_failing_trial_is_retried_then_reported(ray_local, tmp_path):
    """A trial that raises in its Ray task is retried once, then comes back as failed."""
    from transfer.trainer.distributed import RayJob, run_trials_ray
    from transfer.trainer.fit import TrialSpec
    from transfer.trainer.plan import TrialData

    cfg = _cfg(tmp_path / "data", tmp_path / "run")
    spec = TrialSpec(name="nope-t000", group="nope-t000", fold=None, backbone="no_such_net", init="scratch",
                     weights="none", trainable=0.0, freeze_by="layers", image_size=(16, 16))
    lines: list[str] = []
    job = RayJob(spec, TrialData.of(tmp_path / "data", ["a", "b"]))
    out = run_trials_ray(tmp_path / "run", cfg, [job], opts=RayOptions(retries=1), progress=lines.append)
    state, msg = out["nope-t000"]
    assert state == "failed" and "no_such_net" in msg and "after 1 retry on Ray" in msg, msg
    assert any("1/1 trial(s) finished (nope-t000: failed)" in l for l in lines)


def test_ray_sweep_matches_local_and_resumes(ray_local, tmp_path):
    data = make_pattern_folder(tmp_path / "data")
    local = run_sweep(_cfg(data, tmp_path / "local"), progress=lambda s: None)
    lines: list[str] = []
    res = run_sweep(_cfg(data, tmp_path / "ray"), progress=lines.append, ray=RayOptions(cpus_per_trial=1))
    assert res.ok and local.ok, res.failed
    assert any("ray: 2 trial task(s) submitted" in l for l in lines)
    t_local, t_ray = _table(tmp_path / "local"), _table(tmp_path / "ray")
    assert [r[0] for r in t_local] == [r[0] for r in t_ray] and t_local[0] == t_ray[0]
    for name in ("arc2-t000", "arc2-t100"):
        for f in ("trial.json", "status.json", "history.csv", "model.keras", "metrics.json"):
            assert (tmp_path / "ray" / "trials" / name / f).is_file(), (name, f)
    assert (tmp_path / "ray" / "best.json").is_file()

    # an interrupted trial: re-running trains only that one, the finished one is skipped
    done = tmp_path / "ray" / "trials" / "arc2-t000" / "model.keras"
    mtime = done.stat().st_mtime_ns
    (tmp_path / "ray" / "trials" / "arc2-t100" / "metrics.json").unlink()
    lines.clear()
    res2 = run_sweep(_cfg(data, tmp_path / "ray"), progress=lines.append, ray=RayOptions(cpus_per_trial=1))
    assert res2.ok and done.stat().st_mtime_ns == mtime
    assert any("arc2-t000: already done, skipped" in l for l in lines)
    assert any("1 to run" in l for l in lines)
    assert (tmp_path / "ray" / "trials" / "arc2-t100" / "metrics.json").is_file()


def test_ray_options_are_checked():
    from transfer.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid cpus_per_trial: 0; accepted: a number > 0"):
        RayOptions(cpus_per_trial=0)


def test_address_without_ray_is_refused(tmp_path):
    from click.testing import CliRunner

    from transfer.cli import cli

    r = CliRunner().invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--address", "h:1"])
    assert r.exit_code == 2 and "--address needs --ray" in r.output
    for opt in (["--address", "h:1"], ["--gpus-per-worker", "1"]):
        r = CliRunner().invoke(cli, ["infer", str(tmp_path), str(tmp_path), *opt])
        assert r.exit_code == 2 and f"{opt[0]} needs --ray" in r.output, r.output


def test_ray_inference_equals_local_row_for_row(ray_local, shared_data, shared_bundle, tmp_path):
    import shutil

    from transfer.runtime.infer import infer
    from transfer.runtime.ray_infer import infer_ray

    data = tmp_path / "data"
    shutil.copytree(shared_data, data)  # the session's images, with a broken file added below
    bundle = shared_bundle[1].bundle_dir
    (data / "c1" / "broken.png").write_bytes(b"\x89PNG not really")
    local = infer(bundle, [data, tmp_path / "missing.png"], out=tmp_path / "local.csv", recursive=True,
                  head="rf", topk=2)
    r = infer_ray(bundle, [data, tmp_path / "missing.png"], out=tmp_path / "ray.csv", recursive=True,
                  head="rf", topk=2, workers=2, batch=8, backend="onnxruntime", providers="cpu")
    assert r["total"] == local.total == 62 and r["errors"] == local.errors == 2
    a, b = _rows(tmp_path / "local.csv"), _rows(tmp_path / "ray.csv")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["path"], x["status"], x["class1"], x["class2"], x["error"]) == \
               (y["path"], y["status"], y["class1"], y["class2"], y["error"])
        if x["status"] == "ok":  # ONNX Runtime thread count may change the last float digit
            assert abs(float(x["prob1"]) - float(y["prob1"])) <= 2e-6
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "ray.parquet")
    assert t.num_rows == 62 and t.column("path").to_pylist() == [x["path"] for x in a]
    # a URI (s3:// in production; file:// here) is listed on the driver and read by the workers
    u = infer_ray(bundle, ["file://" + str(data)], out=tmp_path / "uri.csv", recursive=True, head="rf", topk=2,
                  workers=2, batch=8)
    c = _rows(tmp_path / "uri.csv")
    assert u["total"] == 61 and u["errors"] == 1
    assert [r["path"] for r in c] == ["file://" + x["path"] for x in a[:61]]
    assert [(r["status"], r["class1"]) for r in c] == [(x["status"], x["class1"]) for x in a[:61]]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
