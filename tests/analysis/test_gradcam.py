"""Grad-CAM on real Keras models: localization, faithfulness, zero evidence, every backbone, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from transfer.cli import cli
from transfer.errors import ConfigError, ModelError, RunFolderError
from transfer.models.build import build_classifier
from transfer.models.registry import get_backbone, list_backbones
from transfer.analysis.gradcam import (
    METHODS, compute_maps, confidence_drop, explain_run, parse_methods, resolve_layer, spatial_layers,
)

from explain_helpers import OBJ, build_tinycam, object_images


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


def test_confidence_drop_beats_random_masking(object_model):
    x, _, _ = object_images(40, 24, seed=11)
    for method in ("gradcam", "gradcam++"):
        maps, _, cls = compute_maps(object_model, x, method=method)
        f = confidence_drop(object_model, x, maps, cls, fractions=(0.1, 0.2, 0.5), seed=0)
        assert f["images"] == 40 and set(f["fractions"]) == {"0.1", "0.2", "0.5"}
        for share in ("0.1", "0.2"):
            r = f["fractions"][share]
            print(method, share, r)
            assert r["cam"] > r["random"] + 0.05, (method, share, r)
            assert r["cam_wins"] >= 0.7


def test_confidence_drop_uses_the_map(object_model):
    """An inverted map (the least highlighted pixels first) must drop less than the map itself."""
    x, _, _ = object_images(30, 24, seed=3)
    maps, _, cls = compute_maps(object_model, x, method="gradcam")
    good = confidence_drop(object_model, x, maps, cls, fractions=(0.1,))["fractions"]["0.1"]["cam"]
    bad = confidence_drop(object_model, x, 1.0 - maps, cls, fractions=(0.1,))["fractions"]["0.1"]["cam"]
    assert good > bad + 0.05


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
        assert not maps.any()
    f = confidence_drop(model, x, np.zeros((3, 16, 16), np.float32), [0, 1, 2])
    assert all(np.isfinite(v["cam"]) for v in f["fractions"].values())


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
    with pytest.raises(ModelError) as e:
        resolve_layer(model, "features")
    assert "not a spatial map" in e.value.message and "conv2" in e.value.hint
    with pytest.raises(ModelError) as e:
        resolve_layer(model, "nope")
    assert "no layer named 'nope'" in e.value.message and "conv1" in e.value.hint
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(ConfigError, match="out of range"):
        compute_maps(model, x, classes=7)
    with pytest.raises(ConfigError, match="unknown CAM method"):
        compute_maps(model, x, method="lime")
    with pytest.raises(ConfigError, match=r"shape \(N, 16, 16, 3\) with N >= 1"):
        compute_maps(model, np.zeros((1, 8, 8, 3), np.float32))
    assert parse_methods("all") == list(METHODS)
    assert parse_methods("grad-cam++,gradcam") == ["gradcam++", "gradcam"]
    with pytest.raises(ConfigError):
        parse_methods("gradcam,foo")


def test_cli_gradcam_on_a_run(run_copy):
    r = CliRunner().invoke(cli, ["gradcam", str(run_copy), "--method", "gradcam,gradcam++", "--samples", "5",
                                 "--save-maps", "-q"])
    assert r.exit_code == 0, r.output
    assert "faithfulness" in r.output and "gradcam++" in r.output and "drop@10%" in r.output
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
        assert f["layer"] == "conv2" and f["images"] == 5
        assert set(f["fractions"]) == {"0.1", "0.2", "0.5"}
    # a second method later is merged into the same table
    r = CliRunner().invoke(cli, ["gradcam", str(run_copy), "--method", "scorecam", "--samples", "3", "-q"])
    assert r.exit_code == 0, r.output
    assert set(json.loads((base / "faithfulness.json").read_text())) == {"gradcam", "gradcam++", "scorecam"}


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
    assert r.exit_code == 2 and "unknown CAM method" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--images", str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "image not found" in r.output
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--fractions", "0.2,1.5"])
    assert r.exit_code == 2 and "between 0 and 1" in r.output
    # an unfinished trial is named
    (run_copy / "trials" / "arc2-t100" / "model.keras").unlink()
    r = runner.invoke(cli, ["gradcam", str(run_copy), "--trial", "arc2-t100"])
    assert r.exit_code == 1 and "not finished" in r.output and "model.keras" in r.output
    with pytest.raises(RunFolderError):
        explain_run(tmp_path / "nope")


@pytest.mark.slow
def test_faithfulness_on_a_digits_model(tmp_path):
    """The demo's data (scikit-learn's real digits), arc2 at 16 px: CAM masking beats random masking."""
    from transfer.data.datasets import write_digits
    from transfer.trainer.config import load_config
    from transfer.trainer.sweep import run_sweep

    write_digits(tmp_path / "digits")
    cfg = load_config(None, {"data": str(tmp_path / "digits"), "out": str(tmp_path / "run"), "backbones": "arc2",
                             "trainable": "1", "weights": "none", "epochs": 4, "image_size": 16, "batch_size": 32,
                             "patience": 0, "lr": 2e-3})
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok and res.best["test_accuracy"] > 0.9
    out = explain_run(tmp_path / "run", samples=40, methods="all", progress=lambda s: None)
    print(out.table)
    for method, f in out.faithfulness.items():
        for share in ("0.1", "0.2", "0.5"):
            r = f["fractions"][share]
            assert r["cam"] > r["random"] + 0.03, (method, share, r)


def test_overlay_sizes():
    from transfer.analysis.gradcam import overlay

    small = overlay(np.zeros((8, 6, 3), np.uint8), np.ones((4, 4)))
    assert small.shape == (176, 132, 3)  # integer nearest-neighbour enlargement (x22)
    big = overlay(np.full((1000, 700, 3), 200, np.uint8), np.zeros((10, 10)))
    assert big.shape == (512, 358, 3)
    hot = overlay(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16)))
    cold = overlay(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16)))
    assert hot[..., 0].mean() > cold[..., 0].mean() and cold[..., 2].mean() > hot[..., 2].mean()  # jet: red vs blue


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
