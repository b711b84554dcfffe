"""Maps of a bundle whose head has no exact CAM (arc2's Flatten -> Dense(64, relu)): export writes
a Grad-CAM graph (``cam.onnx``); without TensorFlow its maps equal Keras's Grad-CAM at the same
layer; infer and serve use it with any backend and head; a tampered graph is refused; a gradient
that does not convert is named."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.bundle_factory import edit_manifest, rehash
from helpers.processes import run_without
from helpers.serving import RunningServer
from PIL import Image

from transfer.bundle import load_bundle
from transfer.cli import cli
from transfer.errors import BundleError, TamperedBundleError


def _pixels(folder: Path, n: int = 24) -> tuple[list[Path], np.ndarray]:
    from transfer.data.image import load_image

    files = sorted(Path(folder).rglob("*.png"))[:n]
    return files, np.stack([load_image(f, (16, 16)) for f in files]).astype(np.float32)


NO_TF = r"""
import numpy as np
from transfer.bundle import load_bundle
from transfer.runtime.cam import BundleCam
from transfer.runtime.runners import make_runner
b = load_bundle(sys.argv[1])
cam = BundleCam.open(b, "onnx-int8")  # any model of the bundle: the graph makes the maps from pixels
assert not cam.needs_feature_map
x = np.load(sys.argv[2])
with make_runner(b, "onnxruntime") as r:
    probs = r.infer(x).probs
np.save(sys.argv[3], cam.maps(None, probs.argmax(1), x))
np.save(sys.argv[4], probs.argmax(1))
assert not any(m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx') for m in sys.modules)
print('ok')
"""


def test_flatten_head_maps_from_the_graph_equal_keras_gradcam_without_tensorflow(shared_bundle, shared_data,
                                                                                   tmp_path):
    from transfer.analysis.gradcam import compute_maps
    from transfer.runfolder import RunFolder

    run, res = shared_bundle
    m = json.loads((res.bundle_dir / "manifest.json").read_text())
    cam = m["cam"]
    assert cam["available"] and cam["graph"] == "cam.onnx" and cam["layer"] == "conv2" and cam["shape"] == [8, 8, 64]
    assert set(cam["models"]) == {"onnx-fp32", "onnx-int8"} and cam["identity"]["pearson_median"] >= 0.999
    files, x = _pixels(shared_data)
    x = np.concatenate([x, np.random.default_rng(5).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)])
    np.save(tmp_path / "x.npy", x)
    r = run_without(("tensorflow", "keras", "tf2onnx"), NO_TF,
                    args=(res.bundle_dir, tmp_path / "x.npy", tmp_path / "m.npy", tmp_path / "c.npy"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    got, cls = np.load(tmp_path / "m.npy"), np.load(tmp_path / "c.npy")
    model = RunFolder(run).trial("best").load_model()
    ref, _, ref_cls = compute_maps(model, x, method="gradcam", layer="conv2")
    assert (ref_cls == cls).all()
    rs = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ref, got) if a.std() > 0 and b.std() > 0]
    assert len(rs) >= len(x) - 2 and np.median(rs) >= 0.999 and min(rs) >= 0.99, rs
    assert got.shape == (len(x), 16, 16) and 0 <= got.min() and got.max() <= 1


def test_infer_cam_with_the_graph_for_any_backend_and_head(shared_bundle, shared_data, tmp_path):
    _, res = shared_bundle
    files, _ = _pixels(shared_data, 10)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f"{f.parent.name}_{f.name}")
    out = tmp_path / "maps"
    r = CliRunner().invoke(cli, ["infer", str(res.bundle_dir), str(folder), "--cam", str(out), "--head", "rf",
                                 "--backend", "onnxruntime-int8", "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    assert "maps (Grad-CAM graph, conv2, 8x8 cells)" in r.output and "head rf has no map" in r.output
    assert f"maps: {len(files)} written to {out}" in r.output  # and how many are empty, if any
    rows = (out / "maps.csv").read_text().splitlines()
    assert len(rows) == len(files) + 1
    maps = sorted(out.glob("*.npy"))
    assert len(maps) == len(files) and len(list(out.glob("*.jpg"))) == len(files)
    m = np.load(maps[0])
    assert m.shape == (16, 16) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1


def test_serve_answers_cam_from_the_graph(shared_bundle, shared_data):
    import httpx

    from transfer.options import make
    from transfer.serve.model import load_served_model
    from transfer.serve.serve_config import ServeConfig

    _, res = shared_bundle
    cfg = make(ServeConfig, {"head": "rf"})
    server = RunningServer(load_served_model(res.bundle_dir, cfg.model, cfg.security), cfg)
    try:
        img = _pixels(shared_data, 1)[0][0]
        r = httpx.post(f"{server.url}/v1/predict?cam=1", files={"image": (img.name, img.read_bytes(), "image/png")})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    cam = r.json()["predictions"][0]["cam"]
    assert cam["layer"] == "conv2" and cam["head"] == "network"
    cells = np.array(cam["cells"])
    assert cells.shape == (8, 8) and 0 <= cells.min() and cells.max() <= 1
    assert Image.open(io.BytesIO(base64.b64decode(cam["png"]))).format == "PNG"


def test_a_tampered_or_missing_graph_is_refused(shared_bundle, tmp_path):
    _, res = shared_bundle
    b1 = shutil.copytree(res.bundle_dir, tmp_path / "b1")
    data = bytearray((b1 / "cam.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b1 / "cam.onnx").write_bytes(bytes(data))
    with pytest.raises(TamperedBundleError, match="cam.onnx"):
        load_bundle(b1)
    b2 = shutil.copytree(res.bundle_dir, tmp_path / "b2")
    edit_manifest(b2, lambda m: m["cam"].update(graph="model.onnx"))
    with pytest.raises(TamperedBundleError, match="cam.onnx"):
        load_bundle(b2)
    b3 = shutil.copytree(res.bundle_dir, tmp_path / "b3")
    (b3 / "cam.onnx").unlink()
    with pytest.raises(BundleError, match="cam.onnx"):
        load_bundle(b3)
    b4 = shutil.copytree(res.bundle_dir, tmp_path / "b4")
    rehash(b4, lambda m: m["files"].pop("cam.onnx"))  # unlisted, so never hashed: refused
    with pytest.raises(TamperedBundleError, match="cam.onnx"):
        load_bundle(b4)


def test_max_pool_gradient_goes_to_the_first_maximum_as_keras_does(tmp_path):
    """Through arc2's 2x2 max pooling (conv1: ReLU zeros tie in many windows) the graph's maps are
    Keras's Grad-CAM."""
    from transfer.export.cam_export import graph_plan
    from transfer.export.cam_graph import check_graph, write_gradcam_graph
    from transfer.models.build import build_classifier

    model, _ = build_classifier("arc2", input_shape=(32, 32, 3), weights="none", num_classes=4, seed=3)
    plan = graph_plan(model, "test", layer="conv1")
    write_gradcam_graph(model, plan.layer, tmp_path / "cam.onnx")
    x = np.random.default_rng(0).uniform(0, 255, (12, 32, 32, 3)).astype(np.float32)
    x[:4, 8:] = 0  # flat regions: ties in the pooling windows
    found = check_graph(model, plan, tmp_path / "cam.onnx", x)
    assert found["pearson_median"] >= 0.999 and found["pearson_min"] >= 0.99, found


def _tiny(layers, size=17):
    """A contract-shaped model: image -> ``layers`` (the first named ``target``) -> pooled features -> probs."""
    import keras

    inp = keras.Input((size, size, 3), name="image")
    y = keras.layers.Rescaling(1 / 255.0)(inp)
    for layer in layers:
        y = layer(y)
    f = keras.layers.GlobalAveragePooling2D(name="features")(y)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="probs")(f))
    for w in model.weights:  # random, not zero, so the gradients are informative
        w.assign(np.random.default_rng(len(w.name)).normal(0, 0.5, w.shape).astype("float32"))
    return model


@pytest.mark.parametrize("stride, padding", [(1, "same"), (2, "same"), (2, "valid")])
def test_depthwise_gradients_are_keras_s(tmp_path, stride, padding):
    """Depthwise convolutions (MobileNetV2's blocks) at each stride and padding: the graph's maps
    at a layer before them are Keras's Grad-CAM (odd input side: SAME pads unevenly)."""
    import keras

    from transfer.export.cam_export import graph_plan
    from transfer.export.cam_graph import check_graph, write_gradcam_graph

    model = _tiny([keras.layers.Conv2D(4, 3, padding="same", name="target"), keras.layers.BatchNormalization(),
                   keras.layers.ReLU(6.0), keras.layers.DepthwiseConv2D(3, strides=stride, padding=padding),
                   keras.layers.ReLU(6.0), keras.layers.Conv2D(5, 1)])
    plan = graph_plan(model, "test", layer="target")
    write_gradcam_graph(model, "target", tmp_path / "cam.onnx")
    x = np.random.default_rng(1).uniform(0, 255, (6, 17, 17, 3)).astype(np.float32)
    found = check_graph(model, plan, tmp_path / "cam.onnx", x)
    assert found["pearson_median"] >= 0.999 and found["pearson_min"] >= 0.99, found


def test_a_gradient_that_does_not_convert_is_named(tmp_path):
    import keras

    from transfer.export.cam_graph import CamGraphError, write_gradcam_graph

    model = _tiny([keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="target"),
                   keras.layers.AveragePooling2D(2)], size=16)
    with pytest.raises(CamGraphError, match="AvgPoolGrad"):
        write_gradcam_graph(model, "target", tmp_path / "cam.onnx")
    assert not (tmp_path / "cam.onnx").exists()


def test_export_cam_layer_puts_an_intermediate_layer_in_the_bundle(shared_run, shared_data, tmp_path):
    """`--cam-layer conv1`: Grad-CAM at an earlier layer (through the max pooling) from the bundle;
    a layer the model does not have is refused before anything is written."""
    from helpers.runs import copy_run

    run = copy_run(shared_run, tmp_path / "run")
    bad = CliRunner().invoke(cli, ["export", str(run), "--cam-layer", "nope", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--cam-layer" in bad.output and "conv1" in bad.output, bad.output
    assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(cli, ["export", str(run), "--cam-layer", "conv1", "--out", str(tmp_path / "b"),
                                 "--no-calibrate"])
    assert r.exit_code == 0, r.output
    cam = json.loads((tmp_path / "b" / "manifest.json").read_text())["cam"]
    assert cam["layer"] == "conv1" and cam["shape"][:2] == [16, 16] and "--cam-layer conv1" in cam["why"]
    assert cam["identity"]["pearson_median"] >= 0.999
    files, _ = _pixels(shared_data, 3)
    out = tmp_path / "maps"
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "b"), *map(str, files), "--cam", str(out),
                                   "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0 and "conv1, 16x16 cells" in res.output, res.output
    assert np.load(sorted(out.glob("*.npy"))[0]).shape == (16, 16)


def test_verify_states_the_graph_and_its_check(shared_bundle):
    _, res = shared_bundle
    r = CliRunner().invoke(cli, ["verify", str(res.bundle_dir)])
    assert r.exit_code == 0, r.output
    assert "maps: Grad-CAM graph (cam.onnx) at layer conv2 (8x8 cells), for every model" in r.output
    import re

    r_med = re.search(r"equal to Keras's Grad-CAM on \d+ verification images \(median Pearson ([0-9.]+)\)", r.output)
    assert r_med and float(r_med.group(1)) >= 0.999, r.output
