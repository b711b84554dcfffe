"""Grad-CAM on real Keras models: localization, faithfulness, zero evidence, every backbone, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers.explain import OBJ, blob_maps, build_tinycam, object_images
from transfer.analysis.cam_layers import MIN_MAP_SIDE, resolve_layer, spatial_layers
from transfer.analysis.cam_verdict import rank_methods, verdict_lines
from transfer.analysis.gradcam import compute_maps, map_faithfulness, parse_methods
from transfer.analysis.gradcam_config import METHODS
from transfer.analysis.gradcam_run import explain_run
from transfer.cli import cli
from transfer.errors import ConfigError, ModelError, RunFolderError
from transfer.maps import map_flags, upsample
from transfer.maps_config import FaithOptions
from transfer.models.build import build_classifier
from transfer.models.registry import get_backbone, list_backbones


def _hit_rate(maps, boxes, margin=1):
    hits = 0
    for m, (y0, x0, y1, x1) in zip(maps, boxes):
        yy, xx = np.unravel_index(int(m.argmax()), m.shape)
        hits += (y0 - margin <= yy < y1 + margin) and (x0 - margin <= xx < x1 + margin)
    return hits / len(maps)


@pytest.mark.parametrize("method", METHODS)
def test_peak_lands_on_the_object(object_model, method):
    x, y, boxes = object_images(80, 24, seed=7)
    maps, probs, cls = compute_maps(object_model, x, method=method)
    assert maps.shape == (80, 24, 24) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (probs.argmax(1) == y).mean() >= 0.9
    rate = _hit_rate(maps, boxes)
    chance = (OBJ + 2) ** 2 / 24 ** 2  # the box grown by the 1 px margin
    print(f"{method}: peak on the object {rate:.2f} vs chance {chance:.3f}")
    assert rate >= 3 * chance and rate >= 0.6


def test_object_maps_beat_their_control_and_blobs_do_not(object_model):
    """Deletion and ROAD against another image's map: Grad-CAM(++) maps of the object model win on
    almost every image; a random blob and a fixed centre blob do not."""
    x, _, boxes = object_images(40, 24, seed=11)
    out = {}
    for method in ("gradcam", "gradcam++"):
        maps, _, cls = compute_maps(object_model, x, method=method)
        out[method], _ = map_faithfulness(object_model, x, maps, cls, FaithOptions(steps=8))
    out["random blob"], _ = map_faithfulness(object_model, x, blob_maps(40, 24, seed=1), cls, FaithOptions(steps=8))
    out["centre blob"], _ = map_faithfulness(object_model, x, blob_maps(40, 24, centre=True), cls,
                                          FaithOptions(steps=8))
    for name, f in out.items():
        print(name, {k: round(v["map_beats_control"], 2) for k, v in f["metrics"].items()}, f["beats_control"])
    for method in ("gradcam", "gradcam++"):
        f = out[method]
        assert f["images"] == 40 and f["road"] == "on" and f["beats_control"]
        for k in ("deletion_auc", "road_morf"):
            assert f["metrics"][k]["map_beats_control"] >= 0.8, (method, k)
            assert f["metrics"][k]["map"] < f["metrics"][k]["control"]
    for name in ("random blob", "centre blob"):
        assert not out[name]["beats_control"]
        for k in ("deletion_auc", "road_morf"):
            assert out[name]["metrics"][k]["map_beats_control"] <= 0.6, (name, k)
    assert set(rank_methods(out)[-2:]) == {"random blob", "centre blob"}
    lines = verdict_lines(out)
    assert lines[0].startswith("Leads with gradcam")
    assert any(ln.startswith("centre blob: no better than its control") for ln in lines)


def test_inverted_maps_lose_to_their_control(object_model):
    """The least highlighted pixels first: the map must lose to another image's map."""
    x, _, _ = object_images(30, 24, seed=3)
    maps, _, cls = compute_maps(object_model, x, method="gradcam")
    good, _ = map_faithfulness(object_model, x, maps, cls, FaithOptions(steps=8, road="off"))
    bad, _ = map_faithfulness(object_model, x, 1.0 - maps, cls, FaithOptions(steps=8, road="off"))
    assert good["road"] == "off" and "road_morf" not in good["metrics"]
    assert good["metrics"]["deletion_auc"]["map"] + 0.05 < bad["metrics"]["deletion_auc"]["map"]
    assert bad["metrics"]["deletion_auc"]["map_beats_control"] <= 0.2 and not bad["beats_control"]


def _support_centre(model, layer: str, r: int, c: int) -> tuple[float, float, bool]:
    """Centre of the input pixels that reach cell (r, c) of ``layer`` (the support of the gradient
    over a few random images), and whether that support stays inside the image."""
    import tensorflow as tf

    from transfer._lazy import import_keras

    keras = import_keras()
    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    h, w = (int(d) for d in model.inputs[0].shape[1:3])
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, h, w, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = sub(x, training=False)
        s = tf.reduce_sum(y[:, r, c, :])
    g = np.abs(tape.gradient(s, x).numpy()).sum(axis=(0, 3)) > 0
    ys, xs = np.nonzero(g)
    inside = ys.min() > 0 and xs.min() > 0 and ys.max() < h - 1 and xs.max() < w - 1
    return (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2, inside


@pytest.mark.parametrize("backbone, size, layer, cell", [
    ("arc2", 32, "conv2", 6), ("arc2", 32, "conv1", 9),
    pytest.param("mobilenet_v2", 64, "block_1_expand_relu", 15, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", 64, "block_3_expand_relu", 7, marks=pytest.mark.slow),
])
def test_layer_geometry_is_where_the_receptive_field_is(backbone, size, layer, cell):
    """The geometry read from the graph puts each cell at the centre of the pixels that reach it
    (valid convolutions shrink arc2's maps; TensorFlow's same padding shifts MobileNetV2's)."""
    from transfer.analysis.cam_layers import layer_geometry

    model, _ = build_classifier(backbone, input_shape=(size, size, 3), weights="none", num_classes=3, seed=0)
    (ay, by), (ax, bx) = layer_geometry(model, layer)
    cy, cx, inside = _support_centre(model, layer, cell, cell + 1)
    assert inside
    assert (ay * cell + by, ax * (cell + 1) + bx) == pytest.approx((cy, cx)), (layer_geometry(model, layer), cy, cx)


def test_maps_are_upsampled_like_tensorflow():
    import tensorflow as tf

    a = np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32)
    want = tf.image.resize(a[..., None], (24, 20), method="bilinear").numpy()[..., 0]
    np.testing.assert_allclose(upsample(a, (24, 20)), want, atol=1e-5)


def _tinycam_model(size=16):
    model, _ = build_tinycam(size, 3, seed=1)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_no_positive_evidence_gives_zeros_not_nan(method):
    x = np.random.default_rng(0).integers(0, 255, size=(3, 16, 16, 3)).astype(np.float32)
    # dead target layer: every activation is 0
    model = _tinycam_model()
    conv = model.get_layer("cam_conv")
    k, b = conv.get_weights()
    conv.set_weights([k, np.full_like(b, -1e4)])
    maps, _, _ = compute_maps(model, x, method=method)
    assert np.isfinite(maps).all() and not maps.any()
    # live activations, but the class score does not depend on them: zero gradients
    model = _tinycam_model()
    probs = model.get_layer("probs")
    k, b = probs.get_weights()
    probs.set_weights([np.zeros_like(k), b])
    maps, _, _ = compute_maps(model, x, method=method)
    assert np.isfinite(maps).all()
    if method != "scorecam":  # scorecam scores masked inputs, not gradients
        assert not maps.any() and map_flags(maps) == ["empty"] * 3
    f, _ = map_faithfulness(model, x, np.zeros((3, 16, 16), np.float32), [0, 1, 2], FaithOptions(steps=3))
    assert f["flags"]["empty"] == 3 and not f["beats_control"]
    assert all(v["map_beats_control"] == 0 and np.isfinite(v["map"]) for v in f["metrics"].values())


FAST = ("arc2", "arc3")


def _backbone_params():
    out = []
    for name in list_backbones():
        marks = () if name in FAST else (pytest.mark.slow,)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("backbone", _backbone_params())
def test_every_registered_backbone(backbone, tmp_path):
    from transfer.models.build import load_model

    spec = get_backbone(backbone)
    size = max(spec.min_size, 16)
    model, info = build_classifier(backbone, input_shape=(size, size, 3), weights="none", num_classes=3, seed=0)
    assert info.gradcam_layer in spatial_layers(model)
    x = np.random.default_rng(1).integers(0, 255, size=(2, size, size, 3)).astype(np.float32)
    first = {}
    for method in ("gradcam", "gradcam++"):
        maps, probs, cls = compute_maps(model, x, method=method, default_layer=info.gradcam_layer)
        assert maps.shape == (2, size, size) and np.isfinite(maps).all()
        assert maps.min() >= 0 and maps.max() <= 1 and probs.shape == (2, 3)
        first[method] = (maps, cls)
    # saved, loaded back (as from a run folder) and frozen: the same maps
    model.save(tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    loaded.trainable = False
    for method, (maps, cls) in first.items():
        again, _, _ = compute_maps(loaded, x, method=method, classes=cls, default_layer=info.gradcam_layer)
        np.testing.assert_allclose(again, maps, atol=1e-4)


def test_layer_resolution_and_errors():
    model, info = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=0)
    assert spatial_layers(model)[-2:] == ["conv2", "conv2_drop"]
    assert resolve_layer(model, None, default=info.gradcam_layer).name == "conv2"
    assert resolve_layer(model, "conv1").name == "conv1"
    assert resolve_layer(model).name == "conv2_drop"  # no name, no default: the last spatial layer
    assert resolve_layer(model, None, default="conv2", fine=True).name == "conv2"  # 8x8 at 16 px: fine enough
    small, _ = build_classifier("arc2", input_shape=(8, 8, 3), weights="none", num_classes=3, seed=0)
    assert small.get_layer("conv2").output.shape[1] < MIN_MAP_SIDE <= small.get_layer("conv1").output.shape[1]
    assert resolve_layer(small, None, default="conv2", fine=True).name == "conv1"  # 4x4 is too coarse: 8x8
    assert resolve_layer(small, "conv2", default="conv2", fine=True).name == "conv2"  # asked for: kept
    with pytest.raises(ModelError) as e:
        resolve_layer(model, "features")
    assert "not a spatial map" in e.value.message and "conv2" in e.value.hint
    with pytest.raises(ModelError) as e:
        resolve_layer(model, "nope")
    assert "no layer named 'nope'" in e.value.message and "conv1" in e.value.hint
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(ConfigError, match="out of range"):
        compute_maps(model, x, classes=7)
    with pytest.raises(ConfigError, match="invalid method: 'lime'"):
        compute_maps(model, x, method="lime")
    with pytest.raises(ConfigError, match=r"shape \(N, 16, 16, 3\) with N >= 1"):
        compute_maps(model, np.zeros((1, 8, 8, 3), np.float32))
    assert parse_methods("all") == list(METHODS)
    assert parse_methods("grad-cam++,gradcam") == ["gradcam++", "gradcam"]
    with pytest.raises(ConfigError):
        parse_methods("gradcam,foo")


def test_cli_gradcam_on_a_run(run_copy):
    r = CliRunner().invoke(cli, ["gradcam", str(run_copy), "--method", "gradcam,gradcam++", "--samples", "5",
                                 "--steps", "4", "--save-maps", "-q"])
    assert r.exit_code == 0, r.output
    assert "faithfulness" in r.output and "gradcam++" in r.output and "deletion AUC" in r.output
    assert "ROAD MoRF" in r.output and ("Leads with" in r.output or "No method's maps beat" in r.output)
    best = json.loads((run_copy / "best.json").read_text())["trial"]
    base = run_copy / "gradcam" / best
    merged = json.loads((base / "faithfulness.json").read_text())
    assert set(merged) == {"gradcam", "gradcam++"}
    for m in ("gradcam", "gradcam++"):
        d = base / m
        assert (d / "grid.png").is_file() and (d / "faithfulness.json").is_file()
        pngs = sorted(p for p in d.glob("*.png") if p.name != "grid.png")
        npys = sorted(d.glob("*.npy"))
        assert len(pngs) == 5 and [p.stem for p in pngs] == [p.stem for p in npys]
        arr = np.load(npys[0])
        assert arr.shape == (16, 16) and np.isfinite(arr).all() and 0 <= arr.min() <= arr.max() <= 1
        assert Image.open(pngs[0]).size[0] >= 128  # enlarged overlay of a 16 px image
        f = merged[m]
        assert f["layer"] == "conv2" and f["images"] == 5 and f["steps"] == 4 and f["baseline"] == "median"
        assert set(f["metrics"]) == {"deletion_auc", "insertion_auc", "road_morf", "road_lerf"}
        for v in f["metrics"].values():
            assert set(v) == {"better", "map", "control", "map_beats_control", "sign_test_p"}
        assert len(f["flags"]["per_image"]) == 5 and isinstance(f["beats_control"], bool)
        rows = (d / "maps.csv").read_text().splitlines()
        assert len(rows) == 6 and rows[0].startswith("image,true,predicted,explained,index,flag,probability,")
        assert "deletion_auc_map_beats_control" in rows[0]
    # a second method later is merged into the same table
    r = CliRunner().invoke(cli, ["gradcam", str(run_copy), "--method", "scorecam", "--samples", "3", "--road", "off",
                                 "-q"])
    assert r.exit_code == 0, r.output
    merged = json.loads((base / "faithfulness.json").read_text())
    assert set(merged) == {"gradcam", "gradcam++", "scorecam"}
    assert merged["scorecam"]["road"] == "off" and "road_morf" not in merged["scorecam"]["metrics"]


def test_explicit_images_class_layer_and_frozen_trial(run_copy):
    from transfer.runfolder import RunFolder

    run = RunFolder(run_copy)
    paths, labels = run.split_paths("test")
    res = explain_run(run_copy, trial="arc2-t000", images=[paths[0], paths[1]], class_="c2", layer="conv1",
                      methods="gradcam", progress=lambda s: None)
    assert res.trial == "arc2-t000" and res.layer == "conv1" and len(res.images) == 2
    f = res.faithfulness["gradcam"]
    assert f["classes"] == "c2" and f["layer"] == "conv1"
    # a folder of images works too
    res = explain_run(run_copy, trial="arc2-t000", images=[paths[0].parent], methods="gradcam",
                      progress=lambda s: None)
    assert len(res.images) == len(list(paths[0].parent.glob("*.png")))


def test_cli_errors(run_copy, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["gradcam", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "run folder not found" in r.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    r = runner.invoke(cli, ["gradcam", str(tmp_path / "half")])
    assert r.exit_code == 1 and "missing config.yaml" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--class", "zebra"])
    assert r.exit_code == 2 and "unknown class 'zebra'" in r.output and "c0" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--layer", "features"])
    assert r.exit_code == 1 and "not a spatial map" in r.output and "conv2" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--layer", "nope"])
    assert r.exit_code == 1 and "no layer named 'nope'" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--trial", "arc2-t050"])
    assert r.exit_code == 1 and "no trial named 'arc2-t050'" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--method", "lime"])
    assert r.exit_code == 2 and "--method: invalid value 'lime'" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--images", str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "image not found" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--steps", "1"])
    assert r.exit_code == 2 and "invalid value 1; accepted: an integer >= 2" in r.output and "--steps" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--baseline", "grey"])
    assert r.exit_code == 2 and "grey" in r.output
    # an unfinished trial is named
    (run_copy / "trials" / "arc2-t100" / "model.keras").unlink()
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--trial", "arc2-t100"])
    assert r.exit_code == 1 and "not finished" in r.output and "model.keras" in r.output
    with pytest.raises(RunFolderError):
        explain_run(tmp_path / "nope")


def test_faith_options_default_to_three_other_class_controls():
    o = FaithOptions().checked()
    assert o.controls == 3 and o.control_class == "other"
    with pytest.raises(ConfigError, match="control_class"):
        FaithOptions(control_class="same").checked()
    r = CliRunner().invoke(cli, ["gradcam", "nowhere", "--control-class", "same"])
    assert r.exit_code == 2 and "same" in r.output


@pytest.mark.slow
def test_faithfulness_on_a_digits_model(tmp_path):
    """The demo's data (scikit-learn's real digits), arc2 at 32 px: the method the verdict leads with
    beats another image's map on deletion and ROAD."""
    from transfer.data.datasets import write_digits
    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    write_digits(tmp_path / "digits")
    cfg = load_config(None, {"data": str(tmp_path / "digits"), "out": str(tmp_path / "run"), "backbones": "arc2",
                             "trainable": "1", "weights": "none", "epochs": 5, "image_size": 32, "batch_size": 32,
                             "patience": 0, "lr": 2e-3})
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok and res.best["test_accuracy"] > 0.9
    out = explain_run(tmp_path / "run", samples=40, methods="all", progress=lambda s: None)
    print(out.table)
    print("\n".join(out.verdict))
    lead = out.ranking[0]
    f = out.faithfulness[lead]
    assert f["beats_control"] and out.verdict[0].startswith(f"Leads with {lead}")
    for k in ("deletion_auc", "road_morf"):
        assert f["metrics"][k]["map_beats_control"] >= 0.75, (lead, k)


def test_cli_all_trials(run_copy):
    r = CliRunner().invoke(cli, ["gradcam", str(run_copy), "--trial", "all", "--samples", "2",
                                 "--method", "scorecam", "--scorecam-channels", "8", "-q"])
    assert r.exit_code == 0, r.output
    for t in ("arc2-t000", "arc2-t100"):
        assert (run_copy / "gradcam" / t / "scorecam" / "grid.png").is_file()
        assert f"{t}: faithfulness" in r.output


def test_scorecam_channel_limit(object_model):
    x, _, boxes = object_images(30, 24, seed=5)
    maps, _, _ = compute_maps(object_model, x, method="scorecam", scorecam_channels=6)
    assert np.isfinite(maps).all() and _hit_rate(maps, boxes) >= 0.5
    with pytest.raises(ConfigError):
        compute_maps(object_model, x, method="scorecam", scorecam_channels=0)
