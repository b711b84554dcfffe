"""Calibrated bundles: temperature in the graph, unknown-input scores, every model verified for them.

A real run on scikit-learn's handwritten digits (arc2 at 16 px, 2 epochs: accurate but not
perfect, so the temperature is identifiable), exported with int8.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from transfer import calibration as C


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory):
    from transfer.data.datasets import write_digits
    from transfer.export.api import export_bundle
    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    base = tmp_path_factory.mktemp("cal")
    write_digits(base / "digits")
    cfg = load_config(None, {"data": str(base / "digits"), "out": str(base / "run"), "backbones": "arc2",
                             "trainable": "1", "weights": "none", "epochs": 2, "image_size": 16, "patience": 0,
                             "workers": 2})
    assert run_sweep(cfg, progress=lambda s: None).ok
    res = export_bundle(base / "run", quantize="int8", progress=None)
    return base / "run", res


def test_temperature_is_in_the_graph_and_fitted_on_val(digits_bundle):
    import onnxruntime as ort

    from transfer.data.image import load_image
    from transfer.runfolder import RunFolder

    run, res = digits_bundle
    cal = res.manifest["calibration"]
    assert cal["fitted_on"] == "val" and cal["images"] >= 300 and 0.05 < cal["temperature"] < 20
    # minimum NLL on val: never worse than T = 1, accuracy unchanged
    assert cal["val"]["after"]["nll"] <= cal["val"]["before"]["nll"] + 1e-9
    assert cal["test"]["after"]["accuracy"] == cal["test"]["before"]["accuracy"]
    for k in ("ece", "nll", "brier"):
        assert cal["test"]["before"][k] >= 0 and cal["test"]["after"][k] >= 0
    rf = RunFolder(run)
    t = rf.trial("best")
    paths, _ = rf.split_paths("test")
    x = np.stack([load_image(p, t.image_size) for p in paths[:40]]).astype(np.float32)
    keras_probs = t.load_model().predict(x, verbose=0)
    sess = ort.InferenceSession(str(res.bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = sess.run(["probs"], {"image": x})[0]
    np.testing.assert_allclose(onnx_probs, C.apply_temperature(keras_probs, cal["temperature"]), atol=2e-5)
    assert res.verification["calibration"]["passed"] and res.verification["onnx-fp32"]["passed"]


def test_unknown_scores_are_hashed_and_loadable(digits_bundle):
    from transfer.bundle import load_bundle
    from transfer.runtime.unknown import make_detector

    _, res = digits_bundle
    m = json.loads((res.bundle_dir / "manifest.json").read_text())
    unk = m["unknown"]
    assert unk["default"] == "mahalanobis" and unk["accept"] == 0.95 and "unknown.npz" in m["files"]
    for name in ("mahalanobis", "msp"):
        assert unk["scores"][name]["val_acceptance"] == pytest.approx(0.95, abs=0.02)
    b = load_bundle(res.bundle_dir)
    det = make_detector(b)
    assert det.score == "mahalanobis" and det.gaussian.means.shape == (10, b.manifest["feature_dim"])
    noise = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    from transfer.runtime.runners import make_runner

    f, p = make_runner(b, "onnxruntime", "cpu").run(noise)
    scores, known = det(f, p)
    assert scores.shape == (8,) and known.sum() <= 2  # uniform noise is not a digit


def test_int8_keeps_calibration_and_unknown_decisions(digits_bundle):
    _, res = digits_bundle
    v = res.verification["onnx-int8"]
    assert v["passed"] and v["calibration"]["ece_diff"] <= 0.01
    assert v["calibration"]["unknown_agreement"] >= 0.99
    q = res.manifest["models"]["onnx-int8"]["quantization"]
    assert isinstance(q["float_nodes"], list) and isinstance(q["attempts"], list)
    for a in q["attempts"]:  # every fallback says why the previous attempt failed
        assert a["why"]


def test_no_calibrate_keeps_the_networks_probabilities(digits_bundle, tmp_path):
    import onnxruntime as ort

    from transfer.export.api import export_bundle
    from transfer.runfolder import RunFolder

    run, _ = digits_bundle
    res = export_bundle(run, out=tmp_path / "raw", calibrate=False, progress=None)
    assert "calibration" not in res.manifest and "unknown" not in res.manifest
    assert "unknown.npz" not in res.manifest["files"]
    rf = RunFolder(run)
    from transfer.data.image import load_image

    t = rf.trial("best")
    x = np.stack([load_image(p, t.image_size) for p in rf.split_paths("val")[0][:16]]).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "raw" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["probs"], {"image": x})[0], t.load_model().predict(x, verbose=0), atol=1e-5)


def test_edited_calibration_records_are_refused(digits_bundle, tmp_path):
    """The thresholds decide which images are called unknown: a hand edit must not pass."""
    import shutil

    from transfer.bundle import load_bundle
    from transfer.errors import TamperedBundleError

    _, res = digits_bundle
    m0 = json.loads((res.bundle_dir / "manifest.json").read_text())
    assert "calibration.json" in m0["files"]
    edits = {
        "threshold": lambda m: m["unknown"]["scores"]["mahalanobis"].update(threshold=-1e9),
        "dropped records": lambda m: (m.pop("unknown"), m.pop("calibration")),
        "temperature": lambda m: m["calibration"].update(temperature=-1.0),
        "default": lambda m: m["unknown"].update(default="energy"),
        "no npz entry": lambda m: m["files"].pop("unknown.npz"),
    }
    for what, edit in edits.items():
        b = tmp_path / what.replace(" ", "_")
        shutil.copytree(res.bundle_dir, b)
        m = json.loads(json.dumps(m0))
        edit(m)
        (b / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(TamperedBundleError):
            load_bundle(b)


def _noise_images(folder, n=6):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    return folder


def test_infer_reject_marks_unknown_images_and_records_the_rule(digits_bundle, tmp_path):
    import csv

    from click.testing import CliRunner

    from transfer.cli import cli
    from transfer.runfolder import RunFolder

    run, res = digits_bundle
    known = [str(p) for p in RunFolder(run).split_paths("test")[0][:30]]
    noise = _noise_images(tmp_path / "noise")
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli, ["infer", str(res.bundle_dir), *known, str(noise), "--reject", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[-3:] == ["unknown_score", "score", "threshold"]
    thr = res.manifest["unknown"]["scores"]["mahalanobis"]["threshold"]
    for row in rows:  # the rule in every row, and the status follows it
        assert row["unknown_score"] == "mahalanobis" and float(row["threshold"]) == pytest.approx(thr, rel=1e-5)
        assert row["status"] == ("unknown" if float(row["score"]) < float(row["threshold"]) else "ok")
    noisy = [row for row in rows if "noise" in row["path"]]
    assert sum(row["status"] == "unknown" for row in noisy) >= 5
    assert sum(row["status"] == "ok" for row in rows if "noise" not in row["path"]) >= 25
    assert "unknown)" in r.output
    # without --reject the rows keep their usual columns
    r = CliRunner().invoke(cli, ["infer", str(res.bundle_dir), *known[:2], "--out", str(tmp_path / "q.csv")])
    assert r.exit_code == 0 and "unknown_score" not in (tmp_path / "q.csv").read_text()


def test_reject_on_a_bundle_without_scores_is_a_clear_error(digits_bundle, tmp_path):
    from click.testing import CliRunner

    from transfer.cli import cli
    from transfer.export.api import export_bundle

    run, _ = digits_bundle
    raw = export_bundle(run, out=tmp_path / "raw", calibrate=False, progress=None).bundle_dir
    img = _noise_images(tmp_path / "n", 1) / "noise0.png"
    r = CliRunner().invoke(cli, ["infer", str(raw), str(img), "--reject"])
    assert r.exit_code == 2 and "no unknown-input score" in r.output and "hint:" in r.output
    r = CliRunner().invoke(cli, ["infer", str(raw), str(img), "--unknown-score", "msp"])
    assert r.exit_code == 2 and "--unknown-score needs --reject" in r.output


def test_evaluate_unknown_and_the_report_section(digits_bundle, tmp_path):
    from click.testing import CliRunner

    from transfer.cli import cli

    run, res = digits_bundle
    noise = _noise_images(tmp_path / "noise", 20)
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--unknown", str(noise)])
    assert r.exit_code == 0, r.output
    out = json.loads((run / "evaluate" / res.manifest["source"]["trial"] / "unknown.json").read_text())
    assert out["known"] >= 150 and out["unknown"] == 20 and set(out["scores"]) == {"mahalanobis", "msp"}
    assert out["scores"]["mahalanobis"]["auroc"] >= 0.9  # uniform noise is far from every digit
    r = CliRunner().invoke(cli, ["report", str(run)])
    assert r.exit_code == 0, r.output
    md = (run / "report.md").read_text()
    sec = md[md.index("## Calibration and unknown inputs"):]
    assert "temperature" in sec and "| test | calibrated |" in sec and "reliability diagram" in sec
    assert "known test images" in sec and (run / "plots" / res.manifest["source"]["trial"] / "reliability.png").is_file()
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--bundle", str(res.bundle_dir)])
    assert r.exit_code == 2 and "--bundle needs --unknown" in r.output
