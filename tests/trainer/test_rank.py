"""``transfer rank``: candidate backbones ranked before training, in a run folder a sweep then reuses."""

from __future__ import annotations


from click.testing import CliRunner

from transfer.cli import cli
from transfer.runfolder import RunLayout


def _rank(data, out, *more):
    return CliRunner().invoke(cli, ["rank", str(data), "--backbone", "arc2,arc3", "--weights", "none",
                                    "--image-size", "16", "--batch-size", "16", "--workers", "2", "--out", str(out),
                                    *more])


def test_rank_prints_and_writes_the_ranking_and_a_sweep_reuses_its_folder(pattern_folder, tmp_path):
    res = _rank(pattern_folder, tmp_path / "run", "-q")
    assert res.exit_code == 0, res.output
    run = RunLayout(tmp_path / "run")
    record = run.rank()
    names = [b["backbone"] for b in record["backbones"]]
    assert sorted(names) == ["arc2", "arc3"] and record["score"] == "LogME" and record["seconds"] > 0
    scores = [b["logme"] for b in record["backbones"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= b["probe_val_accuracy"] <= 1.0 and b["feature_dim"] == 64 for b in record["backbones"])
    assert "| place | backbone |" in res.output and f"best by LogME: {names[0]}" in res.output
    assert run.rank_md.is_file() and not run.trials_dir.exists()
    init = {p.name: p.stat().st_mtime_ns for p in run.init_dir.iterdir()}
    assert set(init) == {"arc2-scratch.weights.h5", "arc3-scratch.weights.h5"}

    # a sweep into the same folder may use other epochs and fractions; it starts from the same initial weights
    train = CliRunner().invoke(cli, ["train", str(pattern_folder), "--backbone", "arc2", "--weights", "none",
                                     "--trainable", "0", "--image-size", "16", "--batch-size", "16", "--epochs", "1",
                                     "--patience", "0", "--out", str(tmp_path / "run"), "-q"])
    assert train.exit_code == 0, train.output
    assert run.init_weights("arc2", "scratch").stat().st_mtime_ns == init["arc2-scratch.weights.h5"]
    # ranking again into the trained folder leaves the sweep's config as it is
    before = run.config_yaml.read_text()
    assert _rank(pattern_folder, tmp_path / "run", "-q").exit_code == 0
    assert run.config_yaml.read_text() == before


def test_rank_refuses_a_folder_with_another_split_or_other_initial_weights(pattern_folder, tmp_path):
    assert _rank(pattern_folder, tmp_path / "run", "-q").exit_code == 0
    res = _rank(pattern_folder, tmp_path / "run", "--val", "0.3", "-q")
    assert res.exit_code == 2 and "different configuration (val: 0.2 -> 0.3)" in res.output
    res = CliRunner().invoke(cli, ["rank", str(pattern_folder), "--backbone", "arc2", "--out", str(tmp_path / "x"),
                                   "--weights", "arc9=none"])
    assert res.exit_code == 2 and "--weights" in res.output and "arc9" in res.output
    res = CliRunner().invoke(cli, ["rank", str(pattern_folder), "--backbone", "arc2"])
    assert res.exit_code != 0 and "no run folder given" in res.output
