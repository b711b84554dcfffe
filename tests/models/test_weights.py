"""Weights: a local weights file, an earlier run's .keras, ImageNet offline, .keras round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers.inference import forward
from model_helpers import pixels
from transfer.errors import ModelError, RunFolderError, WeightsUnavailableError
from transfer.fsutil import atomic_path
from transfer.models.build import backbone_weights, build_classifier, feature_model, load_model
from transfer.models.weights import imagenet_file_for, keras_cache_dir
from transfer.models.registry import get_backbone


def _save_keras(model, path):
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path


def _reference_app(seed=123):
    """A stand-alone Keras MobileNetV2 (no top) with weights unlike any seeded build of ours."""
    import keras

    keras.utils.set_random_seed(seed)
    ref = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    # move the BatchNormalization statistics too, so a file that loads only kernels would fail
    for layer in ref.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(layer.moving_mean.numpy() + 0.05)
            layer.moving_variance.assign(layer.moving_variance.numpy() * 1.5)
    return ref


def _ref_features(app, path, img):
    """What Keras itself computes with ``path`` loaded into a fresh application."""
    import keras

    fresh = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    fresh.load_weights(str(path))
    fmap = forward(fresh, keras.applications.mobilenet_v2.preprocess_input(img.copy()))
    return fmap.mean(axis=(1, 2))


def test_weights_h5_file_loads_like_keras_load_weights(tmp_path):
    ref = _reference_app()
    path = tmp_path / "mnv2.weights.h5"
    ref.save_weights(str(path))
    model, info = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights=str(path), num_classes=3, seed=0)
    assert info.weights == str(path) and "weights file" in info.weights_note
    img = pixels(4, 32, 32, seed=7)
    ours = forward(feature_model(model), img)[0]
    np.testing.assert_allclose(ours, _ref_features(ref, path, img), rtol=1e-4, atol=1e-5)
    # and not by accident: a random start gives other features
    plain, _ = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="none", num_classes=3, seed=0)
    assert not np.allclose(forward(feature_model(plain), img)[0], ours, atol=1e-5)


def test_legacy_h5_file_like_the_imagenet_download_loads(tmp_path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    ref = _reference_app(seed=321)
    path = tmp_path / get_backbone("mobilenet_v2").imagenet_file  # same format as Keras's no-top files
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, ref)
    model, info = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights=path, num_classes=2)
    img = pixels(3, 32, 32, seed=8)
    np.testing.assert_allclose(forward(feature_model(model), img)[0], _ref_features(ref, path, img),
                               rtol=1e-4, atol=1e-5)


def test_weights_file_of_another_backbone_is_refused(tmp_path, arc2):
    model, info = arc2
    path = tmp_path / "arc2.weights.h5"
    model.save_weights(str(path))
    with pytest.raises(WeightsUnavailableError) as ei:
        build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights=str(path), num_classes=2)
    assert str(path) in str(ei.value) and "does not fit mobilenet_v2" in str(ei.value)


@pytest.mark.parametrize("name", ["missing.weights.h5", "weights.txt"])
def test_missing_or_unknown_weights_path(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("x")
    with pytest.raises(WeightsUnavailableError) as ei:
        build_classifier("arc2", input_shape=(16, 16, 3), weights=str(path), num_classes=2)
    assert str(path) in str(ei.value)


def test_copy_from_an_earlier_runs_keras_same_classes(tmp_path):
    src, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=10, seed=1)
    path = _save_keras(src, tmp_path / "model.keras")
    model, info = build_classifier("arc2", input_shape=(16, 16, 3), weights=path, num_classes=10, seed=2)
    assert info.copied_layers == 4  # conv1, conv2, features, probs
    for a, b in zip(src.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert "head: features,probs" in info.weights_note


def test_copy_from_keras_with_other_class_count_keeps_a_fresh_head(tmp_path):
    src, src_info = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=10, seed=1)
    path = _save_keras(src, tmp_path / "model.keras")
    model, info = build_classifier("arc2", input_shape=(16, 16, 3), weights=path, num_classes=5, seed=2)
    assert info.copied_layers == 3
    for a, b in zip(backbone_weights(src, src_info), backbone_weights(model, info)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(src.get_layer("features").kernel.numpy(), model.get_layer("features").kernel.numpy())
    assert model.get_layer("probs").kernel.shape == (64, 5)
    assert "class count differs" in info.weights_note


def test_copy_from_keras_at_another_size_copies_the_convs_only(tmp_path):
    src, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=1)
    path = _save_keras(src, tmp_path / "model.keras")
    model, info = build_classifier("arc2", input_shape=(28, 28, 3), weights=path, num_classes=3, seed=2)
    assert info.copied_layers == 3  # conv1, conv2, probs (features' Dense has another input width)
    np.testing.assert_array_equal(src.get_layer("conv2").kernel.numpy(), model.get_layer("conv2").kernel.numpy())
    assert "features" in info.weights_note and "shapes differ" in info.weights_note


def test_copy_from_keras_of_a_pretrained_mobilenet_gives_the_same_features(tmp_path, mnv2):
    src, _ = mnv2
    path = _save_keras(src, tmp_path / "model.keras")
    model, info = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights=path, num_classes=7, seed=5)
    img = pixels(2, 32, 32, seed=9)
    np.testing.assert_allclose(forward(feature_model(model), img)[0],
                               forward(feature_model(src), img)[0], rtol=1e-5, atol=1e-6)
    n_with_weights = sum(1 for n in info.backbone_layers if model.get_layer(n).weights)
    assert info.copied_layers == n_with_weights  # head (3 -> 7 classes) not copied
    assert f"{n_with_weights}/{n_with_weights} backbone layers" in info.weights_note


def test_copy_from_keras_of_another_backbone_is_a_model_error(tmp_path, mnv2):
    src, _ = mnv2
    path = _save_keras(src, tmp_path / "model.keras")
    with pytest.raises(ModelError, match="shares no backbone layer"):
        build_classifier("arc2", input_shape=(16, 16, 3), weights=path, num_classes=3)


def test_keras_round_trip_keeps_outputs(tmp_path, mnv2):
    model, _ = mnv2
    path = _save_keras(model, tmp_path / "sub" / "model.keras")
    again = load_model(path)
    img = pixels(3, 32, 32, seed=10)
    np.testing.assert_array_equal(forward(again, img), forward(model, img))
    assert [layer.name for layer in again.layers] == [layer.name for layer in model.layers]


def test_load_model_errors(tmp_path):
    with pytest.raises(RunFolderError, match="not found"):
        load_model(tmp_path / "nope.keras")
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ModelError, match="cannot load"):
        load_model(bad)
    other = tmp_path / "model.h5"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .keras"):
        load_model(other)


def test_imagenet_file_names():
    mn = get_backbone("mobilenet_v2")
    assert imagenet_file_for(mn, (96, 96, 3)) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    assert imagenet_file_for(mn, (32, 32, 3)) == mn.imagenet_file
    assert imagenet_file_for(get_backbone("resnet50"), (64, 64, 3)) == "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def test_offline_flag_fails_at_once_naming_the_file(monkeypatch):
    spec = get_backbone("xception")
    if (keras_cache_dir() / spec.imagenet_file).exists():
        pytest.skip("the ImageNet file is cached on this machine")
    monkeypatch.setenv("TRANSFER_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as ei:
        build_classifier("xception", input_shape=(71, 71, 3), weights="imagenet", num_classes=2)
    assert time.perf_counter() - t < 5
    text = str(ei.value)
    assert spec.imagenet_file in text and str(keras_cache_dir()) in text and "weights file (PATH)" in text


_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from transfer.errors import WeightsUnavailableError
    from transfer.models.build import build_classifier, feature_model
    from transfer.models.weights import keras_cache_dir
    def forward(model, x):  # model_helpers.forward: predict's numbers without its per-model graph tracing
        out = model([x] if isinstance(model.input, list) else x, training=False)
        return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else np.asarray(out)
    out = {"cache": str(keras_cache_dir())}
    try:
        build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="imagenet", num_classes=2)
        out["error"] = None
    except WeightsUnavailableError as exc:
        out["error"] = str(exc)
    # the user follows the hint: places the file in the cache, then it works offline
    import h5py, keras
    from keras.src.legacy.saving import legacy_h5_format
    keras.utils.set_random_seed(5)
    ref = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    with h5py.File(sys.argv[1], "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, ref)
    model, info = build_classifier("mobilenet_v2", input_shape=(32, 32, 3), weights="imagenet", num_classes=2)
    img = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ours = forward(feature_model(model), img)[0]
    want = forward(ref, keras.applications.mobilenet_v2.preprocess_input(img.copy())).mean(axis=(1, 2))
    out["max_diff"] = float(np.abs(ours - want).max())
    out["note"] = info.weights_note
    print("RESULT" + json.dumps(out))
""")


def test_imagenet_without_cache_and_network_names_the_file_then_works_once_placed(tmp_path):
    """Real Keras download path, with the network made unreachable (proxy on a closed port)."""
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    fname = get_backbone("mobilenet_v2").imagenet_file
    env = dict(os.environ, KERAS_HOME=str(home), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TRANSFER_OFFLINE", None)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(home / "models" / fname)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert time.perf_counter() - t < 120
    assert out["cache"] == str(home / "models")
    assert out["error"] is not None and fname in out["error"] and "could not be downloaded" in out["error"]
    assert out["max_diff"] < 1e-4
    assert fname in out["note"]


def test_value_check_finds_layers_a_file_did_not_fill(tmp_path, arc2):
    """Keras 3 only warns for some mismatching .weights.h5 files; our check compares values."""
    from transfer.models.weights import _layers_not_in_file

    model, _ = arc2
    path = tmp_path / "a.weights.h5"
    model.save_weights(str(path))
    assert _layers_not_in_file(model, path) == []
    other, _ = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=4, seed=99)
    assert set(_layers_not_in_file(other, path)) == {"conv1", "conv2", "features", "probs"}


def test_a_whole_classifier_weights_file_fills_the_backbone(tmp_path):
    """e.g. RUN/init/<backbone>-<init>.weights.h5 written by the trainer."""
    src, src_info = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=11)
    path = tmp_path / "init.weights.h5"
    src.save_weights(str(path))
    model, info = build_classifier("arc2", input_shape=(16, 16, 3), weights=str(path), num_classes=3, seed=12)
    for a, b in zip(backbone_weights(src, src_info), backbone_weights(model, info)):
        np.testing.assert_array_equal(a, b)
