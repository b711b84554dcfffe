"""Class activation maps from a bundle: export adds them, the runtime computes them without
TensorFlow, they equal Keras Grad-CAM at the same layer, bad bundles are refused clearly."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers.bundle_factory import edit_manifest, make_bundle, rehash
from helpers.cam_bundle import build_cam_bundle
from helpers.processes import run_without
from transfer.bundle import load_bundle
from transfer.cli import cli
from transfer.errors import BundleError, TamperedBundleError
from transfer.runtime.cam import overlay_png


@pytest.fixture(scope="module")
def cam_bundle(tmp_path_factory):
    """(run, bundle) of the test-only GAP CNN (tinycam_test, 24 px: a 24 x 24 feature map), with
    int8 and fp16 models and an rf head. Do not modify: copy."""
    return build_cam_bundle(tmp_path_factory.mktemp("cam"))


def _images(run: Path) -> list[Path]:
    return sorted((Path(run).parent / "objects").glob("c*/*.png"))[:12]


def test_export_records_maps_and_their_agreement(cam_bundle):
    _, bundle = cam_bundle
    m = json.loads((bundle / "manifest.json").read_text())
    cam = m["cam"]
    assert cam["available"] and cam["layer"] == "cam_conv" and cam["output"] == "feature_map"
    assert cam["shape"] == [24, 24, 16]
    assert set(cam["models"]) == {"onnx-fp32", "onnx-int8", "onnx-fp16"}
    assert "cam.npz" in m["files"]
    checks = json.loads((bundle / "verification.json").read_text())
    for key in ("onnx-int8", "onnx-fp16"):
        agree = checks[key]["cam"]
        assert agree["images"] == len(checks["images"]) and 0 <= agree["same_peak"] <= 1
        assert agree["spearman_median"] > 0.5, agree  # a trained net's int8 / fp16 maps keep their order
    assert checks["onnx-fp16"]["cam"]["spearman_median"] > 0.99


def test_infer_cam_equals_keras_gradcam(cam_bundle, tmp_path):
    """The bundle's fp32 map through `transfer infer --cam` is Grad-CAM of the Keras model at the same layer."""
    from transfer.analysis.gradcam import compute_maps
    from transfer.data.image import load_image
    from transfer.runfolder import RunFolder

    run, bundle = cam_bundle
    files = _images(run)
    out = tmp_path / "maps"
    res = CliRunner().invoke(cli, ["infer", str(bundle), *map(str, files), "--cam", str(out), "--out",
                                    str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert "maps (cam_conv, 24x24 cells) of each image's predicted class" in res.output
    rows = (out / "maps.csv").read_text().splitlines()
    assert len(rows) == len(files) + 1
    got = np.stack([np.load(out / f"{k:05d}_{f.stem}.npy") for k, f in enumerate(files)])
    rf = RunFolder(run)
    t = rf.trial("best")
    x = np.stack([load_image(f, t.image_size, recipe=rf.recipe) for f in files]).astype(np.float32)
    for k, f in enumerate(files):  # the overlay: a JPEG of the same picture as the lossless PNG the server sends
        with Image.open(out / f"{k:05d}_{f.stem}.jpg") as im:
            assert im.format == "JPEG"
            jpg = np.asarray(im.convert("RGB"), np.float32)
        with Image.open(io.BytesIO(overlay_png(x[k].astype(np.uint8), got[k])[0])) as im:
            png = np.asarray(im, np.float32)
        assert jpg.shape == png.shape and np.abs(jpg - png).mean() < 6.0
    want, _, _ = compute_maps(t.load_model(), x, method="gradcam", layer="cam_conv")
    r = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(want, got) if a.max() > 0]
    assert r and min(r) >= 0.999, r
    assert np.abs(want - got).max() < 1e-3


def test_infer_cam_class_int8_and_rf_head(cam_bundle, tmp_path):
    run, bundle = cam_bundle
    files = _images(run)[:4]
    out = tmp_path / "maps"
    res = CliRunner().invoke(cli, ["infer", str(bundle), *map(str, files), "--cam", str(out), "--cam-class", "c1",
                                    "--backend", "onnxruntime-int8", "--head", "rf", "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert "of class c1" in res.output and "head rf has no map" in res.output
    rows = [r.split(",") for r in (out / "maps.csv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == ["c1"] * 4
    bad = CliRunner().invoke(cli, ["infer", str(bundle), str(files[0]), "--cam", str(out), "--cam-class", "zebra"])
    assert bad.exit_code == 2 and "cam-class" in bad.output and "c0, c1" in bad.output
    alone = CliRunner().invoke(cli, ["infer", str(bundle), str(files[0]), "--cam-class", "c1"])
    assert alone.exit_code == 2 and "--cam" in alone.output


def test_overlay_choices_png_and_maps_only(cam_bundle, tmp_path):
    """--cam-overlay png writes a lossless PNG, none the maps alone (the csv's overlay column empty)."""
    run, bundle = cam_bundle
    files = _images(run)[:3]
    for choice in ("png", "none"):
        out = tmp_path / choice
        res = CliRunner().invoke(cli, ["infer", str(bundle), *map(str, files), "--cam", str(out), "--cam-overlay",
                                        choice, "--out", str(tmp_path / f"{choice}.csv")])
        assert res.exit_code == 0, res.output
        rows = [r.split(",") for r in (out / "maps.csv").read_text().splitlines()[1:]]
        assert len(rows) == 3 and all((out / r[3]).is_file() for r in rows)
        pictures = sorted(p.suffix for p in out.iterdir() if p.suffix in (".png", ".jpg"))
        if choice == "png":
            assert pictures == [".png"] * 3 and all(Image.open(out / r[4]).format == "PNG" for r in rows)
        else:
            assert pictures == [] and all(r[4] == "" for r in rows)
    alone = CliRunner().invoke(cli, ["infer", str(bundle), str(files[0]), "--cam-overlay", "png"])
    assert alone.exit_code == 2 and "--cam-overlay" in alone.output and "--cam FOLDER" in alone.output


def test_unexplainable_and_old_bundles_exit_clearly(tmp_path):
    old = make_bundle(tmp_path / "old")  # written as before maps existed: no 'cam' record
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    res = CliRunner().invoke(cli, ["infer", str(old), str(img), "--cam", str(tmp_path / "m")])
    assert res.exit_code == 1 and "exported before maps were added" in res.output
    assert "transfer export RUN --force" in res.output and "Traceback" not in res.output
    no = shutil.copytree(old, tmp_path / "no")
    reason = "the features layer is Dense(64, relu) on the flattened feature map: not linear"
    rehash(no, lambda m: m.update(cam={"available": False, "reason": reason}))
    res = CliRunner().invoke(cli, ["infer", str(no), str(img), "--cam", str(tmp_path / "m")])
    assert res.exit_code == 1 and "cannot explain its predictions" in res.output and reason in res.output
    assert not (tmp_path / "m").exists()


def test_arc2_bundle_plans_a_gradcam_graph_and_says_why(tmp_path):
    """No exact CAM for a Dense(64, relu) head: the plan is a Grad-CAM graph at the layer `transfer
    gradcam` picks by default, with the reason the identity does not hold."""
    from transfer.export.cam_export import plan_cam
    from transfer.models.build import build_classifier

    model, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=2, seed=0)
    plan = plan_cam(model, "conv2")
    assert plan.available and plan.via_graph and plan.layer == "conv2" and plan.shape == (8, 8, 64)
    assert plan.kernel is None and plan.extra_outputs == {}  # no feature_map output: the graph makes the maps
    assert "Dense(64, relu)" in plan.why_graph and "not a weighted sum" in plan.why_graph


def test_tampered_maps_are_refused(cam_bundle, tmp_path):
    _, bundle = cam_bundle
    b1 = shutil.copytree(bundle, tmp_path / "b1")
    with np.load(b1 / "cam.npz") as z:
        k = z["kernel"]
    np.savez(b1 / "cam.npz", kernel=-k)  # flipped evidence
    with pytest.raises(TamperedBundleError, match="cam.npz"):
        load_bundle(b1)
    rehash(b1)  # an adversary who also rewrites the hashes: refused by the signature only when signed,
    assert load_bundle(b1)  # so a rehashed kernel of the right shape loads (docs/security.md's threat model)
    np.savez(b1 / "cam.npz", kernel=k[:, :1])
    rehash(b1)
    with pytest.raises(TamperedBundleError, match="kernel"):
        load_bundle(b1)
    b2 = shutil.copytree(bundle, tmp_path / "b2")
    edit_manifest(b2, lambda m: m["cam"].update(shape=[12, 12, 16]))
    from transfer.runtime.runners import make_runner

    with pytest.raises(TamperedBundleError, match="feature_map"):
        make_runner(load_bundle(b2))
    b3 = shutil.copytree(bundle, tmp_path / "b3")
    edit_manifest(b3, lambda m: m["cam"].update(models=["onnx-fp32", "trt-fp16"]))
    with pytest.raises(TamperedBundleError, match="cam"):
        load_bundle(b3)
    b4 = shutil.copytree(bundle, tmp_path / "b4")
    (b4 / "cam.npz").unlink()
    with pytest.raises(BundleError, match="cam.npz"):
        load_bundle(b4)


NO_TF = r"""
import numpy as np
from transfer.bundle import load_bundle
from transfer.runtime.cam import BundleCam
from transfer.runtime.runners import make_runner
b = load_bundle(sys.argv[1])
cam = BundleCam.open(b, "onnx-fp32")
x = np.load(sys.argv[2])
with make_runner(b, "onnxruntime") as r:
    out = r.request("feature_map").infer(x)
np.save(sys.argv[3], cam.maps(out.feature_map, out.probs.argmax(1)))
assert not any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)
print('ok')
"""


def test_maps_computed_without_tensorflow_equal_gradcam(cam_bundle, tmp_path):
    from transfer.analysis.gradcam import compute_maps
    from transfer.runfolder import RunFolder

    run, bundle = cam_bundle
    t = RunFolder(run).trial("best")
    x = np.random.default_rng(3).uniform(0, 255, (16, 24, 24, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = run_without(("tensorflow", "keras", "tf2onnx"), NO_TF, args=(bundle, tmp_path / "x.npy", tmp_path / "m.npy"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    got = np.load(tmp_path / "m.npy")
    want, _, _ = compute_maps(t.load_model(), x, method="gradcam", layer="cam_conv")
    r = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(want, got) if a.max() > 0]
    assert len(r) >= 8 and np.median(r) >= 0.999


@pytest.mark.slow
def test_mobilenet_v2_onnx_map_equals_gradcam(tmp_path):
    """MobileNetV2 (random weights, 96 px: a 3 x 3 out_relu map) exported with its feature map."""
    from transfer.analysis.gradcam import compute_maps
    from transfer.export.cam_export import plan_cam
    from transfer.models.build import build_classifier
    from transfer.models.onnx_convert import export_onnx
    from transfer.runtime.cam import BundleCam
    from transfer.runtime.runners import OrtRunner

    model, _ = build_classifier("mobilenet_v2", input_shape=(96, 96, 3), weights="none", num_classes=3, seed=0)
    plan = plan_cam(model)
    assert plan.layer == "out_relu" and plan.shape == (3, 3, 1280)
    export_onnx(model, tmp_path / "m.onnx", extra=plan.extra_outputs)
    x = np.random.default_rng(0).uniform(0, 255, (8, 96, 96, 3)).astype(np.float32)
    out = OrtRunner(tmp_path / "m.onnx", "cpu").request("feature_map").infer(x)
    got = BundleCam(plan.kernel, plan.shape, (96, 96), plan.geometry, plan.layer).maps(out.feature_map,
                                                                                      out.probs.argmax(1))
    want, _, _ = compute_maps(model, x, method="gradcam", layer="out_relu")
    r = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(want, got)]
    assert min(r) >= 0.999, r


def test_verify_states_the_maps_and_a_disagreement(cam_bundle, tmp_path):
    _, bundle = cam_bundle
    res = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert res.exit_code == 0, res.output
    assert "maps: CAM at layer cam_conv (24x24 cells)" in res.output
    assert "maps of onnx-int8 vs fp32 on" in res.output and "maps of onnx-fp16 vs fp32 on" in res.output
    moved = shutil.copytree(bundle, tmp_path / "moved")
    checks = json.loads((moved / "verification.json").read_text())
    checks["onnx-int8"]["cam"].update(spearman_median=0.41, same_peak=0.3, agrees=False)
    (moved / "verification.json").write_text(json.dumps(checks))
    rehash(moved)
    res = CliRunner().invoke(cli, ["verify", str(moved)])
    assert res.exit_code == 0, res.output
    assert "Spearman median 0.410, same peak cell 30.0 %: DISAGREE with fp32" in res.output
    old = make_bundle(tmp_path / "old")
    assert "exported before class activation maps" in CliRunner().invoke(cli, ["verify", str(old)]).output


def test_report_shows_the_bundle_maps_beside_gradcam(cam_bundle, tmp_path):
    from transfer.analysis.gradcam_run import explain_run
    from transfer.analysis.report import write_report

    run, _ = cam_bundle
    run = shutil.copytree(run, tmp_path / "run")
    files = _images(cam_bundle[0])[:4]
    t = json.loads((run / "bundle" / "manifest.json").read_text())["source"]["trial"]
    explain_run(run, trial=t, images=files, methods=["gradcam"], layer="cam_conv", save_maps=True, steps=2,
                road="off")
    write_report(run)
    md = (run / "report.md").read_text()
    assert "Maps from the bundle" in md and "r fp32 vs Keras Grad-CAM" in md
    assert (run / "gradcam" / t / "bundle_maps.png").is_file()
    section = md.split("Maps from the bundle", 1)[1]
    rs = [float(c) for line in section.splitlines() if line.startswith("| ") and ".png" in line
          for c in [line.split("|")[3].strip()] if c != "-"]
    assert len(rs) >= 3 and min(rs) >= 0.999, rs
    assert "maps of onnx-int8 vs fp32" in section


def test_an_engine_built_from_a_model_with_maps_joins_the_maps_record():
    """A TensorRT engine added to a bundle with maps (export --trt) has the feature_map output; the
    record then lists it, so `infer --cam --backend tensorrt-*` is allowed, and only then."""
    from transfer.export.cam_export import cam_with_model
    from transfer.export.tensorrt import engine_entry, parse_batch_profile

    cam = {"available": True, "models": ["onnx-fp32", "onnx-int8"], "shape": [7, 7, 8]}
    plain = engine_entry("model.fp16.engine", "fp16", parse_batch_profile("1:4:8"), {"gpu": "A10"})
    assert cam_with_model(cam, "trt-fp16", plain) == cam
    with_maps = dict(plain, outputs={**plain["outputs"], "feature_map": "feature_map"})
    assert cam_with_model(cam, "trt-fp16", with_maps)["models"] == ["onnx-fp32", "onnx-int8", "trt-fp16"]
    unexplainable = {"available": False, "reason": "flatten head"}
    assert cam_with_model(unexplainable, "trt-fp16", with_maps) == unexplainable
