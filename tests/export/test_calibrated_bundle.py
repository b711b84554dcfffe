"""Calibrated bundles: temperature in the graph, unknown-input scores, every model verified for them.

A real run on scikit-learn's handwritten digits (arc2 at 16 px, 2 epochs: accurate but not
perfect, so the temperature is identifiable), exported with int8.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.inference import forward
from transfer import calibration as C
from transfer import unknown_scores as U


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


def test_temperature_is_decided_on_val_and_only_reported_on_test(digits_bundle):
    import onnxruntime as ort

    from transfer.data.image import load_image
    from transfer.runfolder import RunFolder

    run, res = digits_bundle
    cal = res.manifest["calibration"]
    run = RunFolder(run)
    assert cal["fitted_on"] == "val" and cal["images"]["val"] == len(run.split_paths("val")[0]) >= 300
    chk = cal["check"]
    assert chk["images"] == cal["images"]["val"] and chk["passed"] == cal["applied"]
    assert "test" in cal["val"]["role"] or "chose" in cal["val"]["role"]
    assert cal["test"]["role"] == "reported only: chose nothing"
    assert "features @ kernel + bias" in cal["logits"]
    if cal["applied"]:  # it held out of fold: the gain beat its noise
        assert chk["gain"] > chk["min_gain"] and chk["oof_nll_after"] < chk["oof_nll_before"]
        assert cal["test"]["after"]["accuracy"] == cal["test"]["before"]["accuracy"]
        assert res.verification["calibration"]["passed"]
    else:
        assert cal["temperature"] == 1.0 and "after" not in cal["test"] and cal["reason"]
    assert res.manifest["models"]["onnx-fp32"]["calibrated"] is cal["applied"]
    t = run.trial("best")
    paths, _ = run.split_paths("test")
    x = np.stack([load_image(p, t.image_size, recipe=run.recipe) for p in paths[:40]]).astype(np.float32)
    model = t.load_model()
    kernel, bias = model.get_layer("probs").get_weights()
    sess = ort.InferenceSession(str(res.bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feats, onnx_probs = sess.run(["features", "probs"], {"image": x})
    np.testing.assert_allclose(onnx_probs, C.temperature_probs(feats @ kernel + bias, cal["temperature"]), atol=2e-5)
    np.testing.assert_allclose(onnx_probs, C.apply_temperature(forward(model, x), cal["temperature"]),
                               atol=2e-5)
    assert res.verification["onnx-fp32"]["passed"]


def test_unknown_scores_are_chosen_by_the_rule_hashed_and_loadable(digits_bundle):
    from transfer.bundle import load_bundle
    from transfer.export.calibrate import DEFAULT_RULE, OUTLIER_KINDS
    from transfer.runtime.unknown import make_detector

    _, res = digits_bundle
    m = json.loads((res.bundle_dir / "manifest.json").read_text())
    unk = m["unknown"]
    assert set(unk["scores"]) == set(U.SCORES) and unk["accept"] == 0.95 and "unknown.npz" in m["files"]
    assert unk["rule"] == DEFAULT_RULE and unk["fitted_on"]["thresholds"] == "val"
    assert set(unk["images"]["outliers"]) == set(OUTLIER_KINDS)
    fa = {k: v["synthetic"]["expected_false_accept"] for k, v in unk["scores"].items()}
    assert fa[unk["default"]] <= min(fa.values()) + 0.005
    for name in U.SCORES:
        assert unk["scores"][name]["val_acceptance"] == pytest.approx(0.95, abs=0.02)
    b = load_bundle(res.bundle_dir)
    noise = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    from transfer.runtime.runners import make_runner

    out = make_runner(b, "onnxruntime", "cpu").infer(noise)
    f, p = out.features, out.probs
    for name in U.SCORES:
        det = make_detector(b, name)
        scores, known = det(f, p)
        assert scores.shape == (8,) and np.isfinite(scores).all()
    det = make_detector(b)
    assert det.score == unk["default"] and det(f, p)[1].sum() <= 2  # uniform noise is not a digit


def test_int8_keeps_calibration_and_unknown_decisions(digits_bundle):
    _, res = digits_bundle
    v = res.verification["onnx-int8"]
    assert v["passed"] and v["calibration"]["ece_diff"] <= 0.01
    assert v["calibration"]["unknown_agreement"] >= 0.99
    q = res.manifest["models"]["onnx-int8"]["quantization"]
    assert isinstance(q["float_nodes"], list) and isinstance(q["attempts"], list)
    for a in q["attempts"]:  # every fallback says why the previous attempt failed
        assert a["why"]
    assert "val images of the verification set" in q["chosen_on"]  # test images only report


def test_no_calibrate_keeps_the_networks_probabilities(digits_bundle, tmp_path):
    import onnxruntime as ort

    from transfer.export.api import export_bundle
    from transfer.runfolder import RunFolder

    run, _ = digits_bundle
    res = export_bundle(run, out=tmp_path / "raw", calibrate=False, progress=None)
    assert "calibration" not in res.manifest and "unknown" not in res.manifest
    assert "unknown.npz" not in res.manifest["files"]
    run = RunFolder(run)
    from transfer.data.image import load_image

    t = run.trial("best")
    x = np.stack([load_image(p, t.image_size) for p in run.split_paths("val")[0][:16]]).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "raw" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["probs"], {"image": x})[0], forward(t.load_model(), x), atol=1e-5)


def test_edited_calibration_records_are_refused(digits_bundle, tmp_path):
    """The thresholds decide which images are called unknown: a hand edit must not pass."""
    import shutil

    from transfer.bundle import load_bundle
    from transfer.errors import TamperedBundleError

    _, res = digits_bundle
    m0 = json.loads((res.bundle_dir / "manifest.json").read_text())
    assert "calibration.json" in m0["files"]
    default = m0["unknown"]["default"]
    other = next(k for k in m0["unknown"]["scores"] if k != default)
    edits = {
        "threshold": lambda m: m["unknown"]["scores"][default].update(threshold=-1e9),
        "dropped records": lambda m: (m.pop("unknown"), m.pop("calibration")),
        "temperature": lambda m: m["calibration"].update(temperature=-1.0),
        "default": lambda m: m["unknown"].update(default=other),
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
    default = res.manifest["unknown"]["default"]
    thr = res.manifest["unknown"]["scores"][default]["threshold"]
    for row in rows:  # the rule in every row, and the status follows it
        assert row["unknown_score"] == default and float(row["threshold"]) == pytest.approx(thr, rel=1e-5)
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
    assert r.exit_code == 2 and "--unknown-score: invalid value 'msp'" in r.output and "add --reject" in r.output


def test_evaluate_unknown_and_the_report_section(digits_bundle, tmp_path):
    from click.testing import CliRunner

    from transfer.cli import cli

    run, res = digits_bundle
    noise = _noise_images(tmp_path / "noise", 20)
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--unknown", str(noise)])
    assert r.exit_code == 0, r.output
    out = json.loads((run / "evaluate" / res.manifest["source"]["trial"] / "unknown.json").read_text())
    assert out["known"] >= 150 and out["unknown"] == 20 and set(out["scores"]) == set(U.SCORES)
    assert out["scores"][out["default"]]["auroc"] >= 0.9  # uniform noise is far from every digit
    assert "FPR at 95 % TPR" in r.output and "chosen at export without test images" in r.output
    r = CliRunner().invoke(cli, ["report", str(run)])
    assert r.exit_code == 0, r.output
    md = (run / "report.md").read_text()
    sec = md[md.index("## Calibration and unknown inputs"):]
    assert "temperature" in sec and "| test |" in sec and "reported only" in sec
    assert ("reliability diagram" in sec) == res.manifest["calibration"]["applied"]
    assert "known test images" in sec and "synthetic outliers" in sec
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--bundle", str(res.bundle_dir)])
    assert r.exit_code == 2 and "--bundle needs --unknown" in r.output


def _tiny_run(base, **kw):
    """arc2 at 16 px on a pattern folder, one epoch (the export's behaviour is what is tested)."""
    from helpers.images import make_pattern_folder
    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    data = make_pattern_folder(base / "data", per_class=kw.pop("per_class", 20))
    cfg = load_config(None, {"data": str(data), "out": str(base / "run"), "backbones": "arc2", "trainable": "1",
                             "weights": "none", "epochs": 1, "image_size": 16, "patience": 0, "workers": 2, **kw})
    assert run_sweep(cfg, progress=lambda s: None).ok
    return base / "run", data


def _export_cli(run):
    from click.testing import CliRunner

    from transfer.cli import cli

    r = CliRunner().invoke(cli, ["export", str(run)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    return r.output, json.loads((run / "bundle" / "manifest.json").read_text())


def _never_fitted_on_test(m, reason_part):
    cal, unk = m["calibration"], m["unknown"]
    assert cal["method"] == "none" and cal["applied"] is False and cal["temperature"] == 1.0
    assert reason_part in cal["reason"] and "fitted_temperature" not in cal and "check" not in cal
    assert cal["images"]["val"] == 0 and "after" not in cal.get("test", {})  # test only reports
    assert unk["method"] == "none" and reason_part in unk["reason"] and "unknown.npz" not in m["files"]
    assert m["models"]["onnx-fp32"]["calibrated"] is False


def test_export_of_a_run_without_val_split_skips_calibration_with_the_reason(tmp_path):
    """`transfer train --val 0` then `transfer export`: was KeyError 'test' (calibration fitted on test)."""
    from transfer.bundle import load_bundle

    run, _ = _tiny_run(tmp_path, val=0.0)
    out, m = _export_cli(run)
    assert "calibration skipped (the bundle keeps the network's probabilities): the run has no val split" in out
    _never_fitted_on_test(m, "no val split")
    from transfer.runfolder import RunFolder

    n_test = len(RunFolder(run).split_paths("test")[0])
    assert n_test and m["calibration"]["test"]["before"]["images"] == n_test  # reported, uncalibrated
    b = load_bundle(run / "bundle")
    from click.testing import CliRunner

    from transfer.cli import cli

    img = sorted((tmp_path / "data" / "c0").glob("*.png"))[0]
    r = CliRunner().invoke(cli, ["infer", str(b.path), str(img), "--reject"])
    assert r.exit_code == 2 and "no val split" in r.output  # --reject says why there is no score
    # int8's float-layer ladder is a choice: with only test images to read, it is not climbed
    r = CliRunner().invoke(cli, ["export", str(run), "--quantize", "int8", "--out", str(run / "bundle8")])
    assert r.exit_code == 0, r.output
    q = json.loads((run / "bundle8" / "manifest.json").read_text())["models"]["onnx-int8"]["quantization"]
    assert "no val image" in q["chosen_on"] and q["attempts"] == []


def test_export_when_val_images_became_unreadable_never_falls_back_to_test(tmp_path):
    from transfer.runfolder import RunFolder

    run, data = _tiny_run(tmp_path, per_class=40, val=0.4)
    val_paths = RunFolder(run).split_paths("val")[0]
    for p in val_paths:  # damaged after training
        p.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out, m = _export_cli(run)
    assert f"none of the {len(val_paths)} val image(s) can be read" in out
    _never_fitted_on_test(m, "can be read")
    assert m["calibration"]["images"]["unreadable"] == len(val_paths)
    assert m["calibration"]["test"]["before"]["images"] == len(RunFolder(run).split_paths("test")[0])


def test_why_calibration_is_skipped():
    from transfer.export.calibration_stage import MIN_CALIBRATION_IMAGES, SplitOutputs, _why_not

    def split(n, listed, first=None):
        return SplitOutputs("val", np.zeros((n, 2)), np.zeros((n, 2)), np.zeros(n, int), listed=listed,
                            unreadable=listed - n, first_error=first)

    assert "no val split" in _why_not(split(0, 0))
    assert "a.png: cannot decode" in _why_not(split(0, 5, "a.png: cannot decode"))
    assert f"at least {MIN_CALIBRATION_IMAGES}" in _why_not(split(40, 40))
    assert _why_not(split(MIN_CALIBRATION_IMAGES, 120)) is None


def test_an_applied_temperature_is_in_every_model_and_verified(digits_bundle, tmp_path, monkeypatch):
    """The plumbing of an applied temperature (the decision itself is tested on numbers in
    tests/core/test_calibration.py): the check is made to pass with T = 1.5."""
    import dataclasses

    import onnxruntime as ort

    from transfer.data.image import load_image
    from transfer.export.api import export_bundle
    from transfer.runfolder import RunFolder

    real = C.check_temperature

    def passed(logits, labels, **kw):
        return dataclasses.replace(real(logits, labels, **kw), applied=True, temperature=1.5, reason="test")

    monkeypatch.setattr(C, "check_temperature", passed)
    run, _ = digits_bundle
    res = export_bundle(run, out=tmp_path / "b", quantize="int8", progress=None)
    cal = res.manifest["calibration"]
    assert cal["applied"] and cal["temperature"] == 1.5 and cal["method"] == "temperature (logits)"
    assert cal["graph"] == "logits" and res.manifest["models"]["onnx-fp32"]["calibrated"] is True
    assert cal["test"]["after"]["accuracy"] == cal["test"]["before"]["accuracy"]
    assert res.verification["calibration"]["passed"] and res.verification["onnx-int8"]["passed"]
    assert res.verification["onnx-int8"]["calibration"]["unknown_agreement"] >= 0.99
    run = RunFolder(run)
    t = run.trial("best")
    x = np.stack([load_image(p, t.image_size, recipe=run.recipe) for p in run.split_paths("test")[0][:32]])
    x = x.astype(np.float32)
    raw = forward(t.load_model(), x)
    for name in ("model.onnx", "model.int8.onnx"):
        sess = ort.InferenceSession(str(res.bundle_dir / name), providers=["CPUExecutionProvider"])
        got = sess.run(["probs"], {"image": x})[0]
        atol = 2e-5 if name == "model.onnx" else 0.1
        np.testing.assert_allclose(got, C.apply_temperature(raw, 1.5), atol=atol, err_msg=name)
    # the unknown thresholds were set on the calibrated probabilities the bundle gives
    from transfer.bundle import load_bundle
    from transfer.runtime.runners import make_runner
    from transfer.runtime.unknown import make_detector

    b = load_bundle(res.bundle_dir)
    xv = np.stack([load_image(p, t.image_size, recipe=run.recipe) for p in run.split_paths("val")[0]]).astype(np.float32)
    out = make_runner(b, "onnxruntime", "cpu").infer(xv)
    f, p = out.features, out.probs
    _, known = make_detector(b, "msp")(f, p)
    assert known.mean() == pytest.approx(0.95, abs=0.01)


def test_a_large_split_is_subsampled_with_every_class():
    from transfer.export.calibration_stage import _subset

    paths = [f"p{i}" for i in range(900)]
    labels = [0] * 880 + [1] * 19 + [2]  # a rare class and a single image
    sub_p, sub_y = _subset(paths, labels, 90)
    assert sorted(set(sub_y)) == [0, 1, 2] and 85 <= len(sub_p) <= 95
    assert sub_p == sorted(sub_p, key=lambda p: int(p[1:]))  # split order kept
    assert _subset(paths, labels, 90) == (sub_p, sub_y)  # seeded
    assert _subset(paths[:50], labels[:50], 90) == (paths[:50], labels[:50])
