"""Real export: Keras -> tf2onnx -> ONNX Runtime, int8, skl2onnx head, manifest, tamper checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.inference import forward
from helpers.processes import ENV, TRANSFER, hold_lock, wait_until_locked_by
from transfer.bundle import load_bundle
from transfer.cli import cli
from transfer.errors import (
    BundleError,
    RunFolderError,
    TamperedBundleError,
    VerificationError,
)


def v_images(bundle) -> int:
    return len(json.loads((bundle / "verification.json").read_text())["images"])


def test_bundle_layout_manifest_and_verification(full_bundle):
    run, res = full_bundle
    b = res.bundle_dir
    assert res.ok and b == run / "bundle"
    for f in ("manifest.json", "model.onnx", "model.int8.onnx", "heads/rf.pkl", "heads/rf.onnx", "verification.json"):
        assert (b / f).is_file(), f
    m = json.loads((b / "manifest.json").read_text())
    assert m["valid"] is True and m["format"] == "transfer-bundle" and m["format_version"] == 1
    assert m["class_names"] == ["c0", "c1", "c2"] and m["input"]["height"] == 16 and m["input"]["color"] == "RGB"
    assert m["preprocessing"]["resize"] == "pillow-bilinear" and m["backbone"] == "arc2"
    assert set(m["models"]) == {"onnx-fp32", "onnx-int8"} and m["heads"]["rf"]["feature_dim"] == m["feature_dim"]
    assert set(m["files"]) == {"model.onnx", "model.int8.onnx", "heads/rf.pkl", "heads/rf.onnx", "verification.json",
                               "labels.json", "calibration.json", "cam.onnx"}
    # arc2's Dense(64, relu) head has no exact CAM: the maps are a Grad-CAM graph, checked against Keras's
    cam = m["cam"]
    assert cam["available"] and cam["graph"] == "cam.onnx" and cam["output"] == "cam" and "Dense(64, relu)" in cam["why"]
    assert cam["identity"]["pearson_median"] >= 0.999 and cam["identity"]["images"] == v_images(b)
    # 12 validation images: too few to calibrate, and the manifest says so
    assert m["calibration"]["method"] == "none" and "validation image" in m["calibration"]["reason"]
    assert json.loads((b / "labels.json").read_text()) == m["class_names"] and m["labels"] == "labels.json"
    for k in ("tensorflow", "tf2onnx", "onnxruntime", "scikit-learn"):
        assert m["tools"][k]
    v = m["verification"]
    assert v["onnx-fp32"]["passed"] and v["onnx-fp32"]["max_abs_diff"] <= 1e-4
    assert v["onnx-fp32"]["top1_agreement"] >= 0.999 and v["onnx-fp32"]["images"] >= 12
    assert v["onnx-int8"]["accuracy_drop"] <= 0.01 and v["head-rf"]["top1_agreement"] >= 0.999
    assert load_bundle(b).class_names == ["c0", "c1", "c2"]


def test_onnx_graph_matches_keras_on_image_files_with_dynamic_batch(full_bundle):
    import onnxruntime as ort

    from transfer.data.image import load_image
    from transfer.runfolder import RunFolder

    run, res = full_bundle
    run = RunFolder(run)
    t = run.trial(res.manifest["source"]["trial"])
    paths, _ = run.split_paths("test")
    x = np.stack([load_image(p, t.image_size) for p in paths]).astype(np.float32)
    model = t.load_model()
    ref = forward(model, x)
    sess = ort.InferenceSession(str(res.bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["features", "probs"]
    for n in (1, 3, len(x)):  # dynamic batch
        feats, probs = sess.run(None, {"image": x[:n]})
        assert probs.shape == (n, 3) and feats.shape[0] == n
        np.testing.assert_allclose(probs, ref[:n], atol=1e-5)


def test_existing_bundle_is_refused_without_force_and_replaced_with_it(full_bundle, tmp_path):
    from transfer.export.api import export_bundle

    run, res = full_bundle
    with pytest.raises(BundleError, match="already holds a bundle"):
        export_bundle(run, progress=None)
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in (False, True):  # --force replaces bundles only, never a folder of other files
        with pytest.raises(BundleError, match="not part of a transfer bundle"):
            export_bundle(run, out=out, force=force, progress=None)
    assert (out / "notes.txt").read_text() == "mine"
    for bad in (run, run.parent):  # the run itself, or a folder holding it
        with pytest.raises(BundleError, match="would replace the run"):
            export_bundle(run, out=bad, force=True, progress=None)
    assert (run / "run.json").is_file()
    first = export_bundle(run, out=tmp_path / "c", progress=None)
    (first.bundle_dir / "extra.txt").write_text("left by a user")  # replacing would delete it: refused
    with pytest.raises(BundleError, match="not listed in its manifest: extra.txt"):
        export_bundle(run, out=first.bundle_dir, force=True, progress=None)
    (first.bundle_dir / "extra.txt").unlink()
    r2 = export_bundle(run, out=first.bundle_dir, force=True, progress=None)
    assert r2.ok and set(r2.manifest["models"]) == {"onnx-fp32"}
    assert load_bundle(r2.bundle_dir).manifest["created"] >= first.manifest["created"]


def test_tampered_file_is_named_by_verify_and_load(full_bundle, tmp_path):
    _, res = full_bundle
    b = tmp_path / "b"
    shutil.copytree(res.bundle_dir, b)
    r = CliRunner().invoke(cli, ["verify", str(b)])
    assert r.exit_code == 0 and "OK" in r.output
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    (b / "model.onnx").write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["verify", str(b)])
    assert r.exit_code == 1 and "model.onnx" in r.output and "sha256" in r.output
    with pytest.raises(TamperedBundleError, match="model.onnx"):
        load_bundle(b)
    (b / "heads" / "rf.onnx").unlink()
    with pytest.raises(BundleError, match="heads/rf.onnx"):
        load_bundle(b)


def test_failed_verification_marks_the_bundle_invalid(run_copy, tmp_path):
    from transfer.export.api import export_bundle

    out = tmp_path / "strict"
    with pytest.raises(VerificationError, match="onnx-fp32"):
        export_bundle(run_copy, out=out, atol=0.0, min_agreement=1.0, progress=None)
    m = json.loads((out / "manifest.json").read_text())
    if m["verification"]["onnx-fp32"]["max_abs_diff"] == 0.0:  # bit-exact conversion: nothing to fail
        pytest.skip("ONNX Runtime reproduced Keras bit for bit")
    assert m["valid"] is False
    with pytest.raises(BundleError, match="marked invalid"):
        load_bundle(out)
    r = CliRunner().invoke(cli, ["verify", str(out)])
    assert r.exit_code == 1 and "invalid" in r.output


def test_interrupted_export_leaves_no_bundle(run_copy, monkeypatch):
    from transfer.export import model_steps
    from transfer.export.api import export_bundle

    real = model_steps.export_onnx

    def killed(model, path, **kw):
        real(model, path, **kw)  # the model file is written, then the export is "killed"
        raise KeyboardInterrupt

    monkeypatch.setattr(model_steps, "export_onnx", killed)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(run_copy, progress=None)
    assert not (run_copy / "bundle").exists()
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".bundle")]


def test_bad_runs_and_trials(run_copy, tmp_path):
    from transfer.export.api import export_bundle

    with pytest.raises(RunFolderError, match="not found"):
        export_bundle(tmp_path / "nope", progress=None)
    with pytest.raises(RunFolderError):
        export_bundle(run_copy, trial="vgg16-t050", progress=None)
    # an unfinished trial: its model is gone
    t = next((run_copy / "trials").iterdir())
    (t / "model.keras").unlink()
    with pytest.raises(RunFolderError, match="not finished"):
        export_bundle(run_copy, trial=t.name, progress=None)


def test_trt_without_gpu_exits_3_and_keeps_the_verified_onnx_bundle(run_copy, tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["export", str(run_copy), "--out", str(out), "--trt", "fp16", "-q"])
    assert r.exit_code == 3, r.output
    assert "TensorRT needs an NVIDIA GPU with CUDA; none was found" in r.output
    b = load_bundle(out)
    assert b.manifest["valid"] and "onnx-fp32" in b.models


def test_cli_export_prints_summary_and_rejects_bad_options(run_copy):
    r = CliRunner().invoke(cli, ["export", str(run_copy), "--batch", "8:4:2"])
    assert r.exit_code == 2 and "MIN <= OPT <= MAX" in r.output
    r = CliRunner().invoke(cli, ["export", str(run_copy)])
    assert r.exit_code == 0, r.output
    assert "verify onnx-fp32 vs Keras on" in r.output and "PASS" in r.output


def test_run_without_a_finished_trial_is_refused(run_copy):
    from transfer.export.api import export_bundle

    for t in (run_copy / "trials").iterdir():
        (t / "model.keras").unlink()
    (run_copy / "best.json").unlink()
    with pytest.raises(RunFolderError, match="no finished trial"):
        export_bundle(run_copy, progress=None)
    assert not (run_copy / "bundle").exists()


def test_head_with_other_feature_dim_is_refused(full_bundle, tmp_path):
    import pickle

    from sklearn.ensemble import RandomForestClassifier

    from transfer.errors import ExportError
    from transfer.export.api import export_bundle
    from transfer.fsutil import sha256_file

    src, res = full_bundle
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shutil.rmtree(run / "bundle")
    trial = res.manifest["source"]["trial"]
    pkl, js = run / "heads" / trial / "rf.pkl", run / "heads" / trial / "rf.json"
    assert pkl.is_file() and js.is_file()  # the head the bundle export fitted and saved
    d = res.manifest["feature_dim"]
    rng = np.random.default_rng(0)
    est = RandomForestClassifier(n_estimators=3, random_state=0).fit(rng.normal(size=(30, d + 3)),
                                                                       np.arange(30) % 3)
    pkl.write_bytes(pickle.dumps(est))
    meta = json.loads(js.read_text())
    meta["sha256"] = sha256_file(pkl)  # a consistent record of the wrong head
    js.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=f"fitted on {d + 3}-d features"):
        export_bundle(run, head="rf", progress=None)
    meta["feature_dim"] = d + 3
    js.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=f"takes {d + 3}-d features"):
        export_bundle(run, head="rf", progress=None)
    # right width, but fitted on two of the three classes: its columns would not line up
    est = RandomForestClassifier(n_estimators=3, random_state=0).fit(rng.normal(size=(30, d)), np.arange(30) % 2)
    pkl.write_bytes(pickle.dumps(est))
    meta.update(feature_dim=d, sha256=sha256_file(pkl))
    js.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"predicts classes \[0, 1\]"):
        export_bundle(run, head="rf", progress=None)
    assert not (run / "bundle").exists()


def test_tampered_head_pickle_is_refused_before_unpickling(full_bundle, tmp_path):
    from transfer.errors import TransferError
    from transfer.export.api import export_bundle

    src, res = full_bundle
    run = tmp_path / "run"
    shutil.copytree(src, run)
    pkl = run / "heads" / res.manifest["source"]["trial"] / "rf.pkl"
    pkl.write_bytes(pkl.read_bytes() + b"x")
    with pytest.raises(TransferError, match="modified"):
        export_bundle(run, head="rf", out=tmp_path / "b", progress=None)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kw,match", [
    ({"atol": "x"}, "invalid atol"), ({"min_agreement": 1.5}, "invalid min_agreement"),
    ({"max_accuracy_drop": -0.1}, "invalid max_accuracy_drop"), ({"verify_images": 0}, "invalid verify_images"),
    ({"verify_images": 16}, "invalid verify_images: 16.*>= 64"),
    ({"calib_images": 2.5}, "invalid calib_images"), ({"quantize": "int4"}, "int8"), ({"trt": "int4"}, "fp16"),
    ({"batch": "1:0:4"}, "MIN:OPT:MAX"), ({"head": "xgb"}, "rf"),
])
def test_bad_options_fail_before_any_work(run_copy, kw, match):
    from transfer.errors import ConfigError
    from transfer.export.api import export_bundle

    with pytest.raises(ConfigError, match=match):
        export_bundle(run_copy, progress=None, **kw)
    assert not [p for p in run_copy.iterdir() if "bundle" in p.name]


def test_verify_deep_runs_every_onnx_model_and_names_a_broken_one(full_bundle, tmp_path):
    from transfer.bundle_write import finalize_manifest

    _, res = full_bundle
    r = CliRunner().invoke(cli, ["verify", str(res.bundle_dir), "--deep"])
    assert r.exit_code == 0, r.output
    assert "3 ONNX model(s) ran" in r.output  # fp32, int8, rf head
    b = tmp_path / "b"
    shutil.copytree(res.bundle_dir, b)
    shutil.copy(b / "heads" / "rf.onnx", b / "model.int8.onnx")  # a real ONNX file, the wrong model
    finalize_manifest(b, json.loads((b / "manifest.json").read_text()))  # hashes now match
    # hashes alone cannot tell, but the graph is not what the manifest says (it used to pass plain verify)
    r = CliRunner().invoke(cli, ["verify", str(b)])
    assert r.exit_code == 1 and "model.int8.onnx" in r.output and "has no input 'image'" in r.output
    r = CliRunner().invoke(cli, ["verify", str(b), "--deep"])
    assert r.exit_code == 1 and "model.int8.onnx" in r.output


def test_signed_export_force_keeps_hidden_files_and_a_held_out_is_refused(run_copy, tmp_path):
    """export --sign: the bundle loads where its key is trusted; --force keeps .git; an --out
    another process holds is refused naming it, before anything is written."""
    from transfer.bundle import UntrustedBundleError
    from transfer.signing import generate_key

    priv, pub, kid = generate_key(tmp_path / "release.key")
    _, other, _ = generate_key(tmp_path / "other.key")
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["export", str(run_copy), "--out", str(out), "--sign", str(priv)])
    assert r.exit_code == 0 and f"signed by {kid}" in r.output, r.output
    r = CliRunner().invoke(cli, ["verify", str(out), "--trust", str(pub)])
    assert r.exit_code == 0 and "(trusted)" in r.output, r.output
    with pytest.raises(UntrustedBundleError):
        load_bundle(out, trust=other)
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    r = CliRunner().invoke(cli, ["export", str(run_copy), "--out", str(out), "--force", "-q"])
    assert r.exit_code == 0, r.output
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"  # --force deleted it before
    assert load_bundle(out, trust=False).signer is None  # re-exported unsigned
    for held, args in ((out, ["--out", str(out), "--force"]),  # its --out
                       (run_copy, ["--out", str(tmp_path / "c"), "--head", "rf"])):  # a run it may fit a head into
        holder = hold_lock(held)
        try:
            before = sorted(p.name for p in out.iterdir())
            r = CliRunner().invoke(cli, ["export", str(run_copy), *args])
            assert r.exit_code == 1 and f"PID {holder.pid}" in r.output and "in use by" in r.output, r.output
            assert sorted(p.name for p in out.iterdir()) == before and not (tmp_path / "c").exists()
        finally:
            holder.stdin.close()
            holder.wait()
    r = CliRunner().invoke(cli, ["export", str(run_copy), "--out", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 0, r.output  # without a head it only reads the run


@pytest.mark.slow
def test_two_exports_to_one_out_exactly_one_proceeds(run_copy, tmp_path):
    """Two real `transfer export --out same` processes: the second exits 1 naming the first, which
    writes the only bundle (before: both reported success and one silently replaced the other)."""
    import signal
    import subprocess

    out = tmp_path / "same"
    cmd = [*TRANSFER, "export", str(run_copy), "--out", str(out), "-q"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_until_locked_by(out, first)
    first.send_signal(signal.SIGSTOP)  # hold it mid-export, so the two surely overlap
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 1 and f"PID {first.pid}" in second.stderr, second.stderr
    assert load_bundle(out).manifest["valid"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".same")) == []
