"""The frozen-prefix cache: hits, deeper cuts from shallower ones, and caches that must never be read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers.trainer import base_overrides
from transfer.data.folder import index_folder
from transfer.models.build import build_classifier
from transfer.models.freeze import apply_freeze
from transfer.models.split import find_cut, prefix_model
from transfer.trainer.cache import (
    CacheBuilder,
    CacheContext,
    CacheRequest,
    CacheSpaceError,
    FeatureCache,
    weights_sha256,
)
from transfer.trainer.config import load_config
from transfer.trainer.sweep import run_sweep


@pytest.fixture(scope="module")
def samples(pattern_folder):
    return tuple(index_folder(pattern_folder).samples)


def _builder(tmp_path, data, *, seed=0, lines=None, model=None):
    if model is None:
        model, info = build_classifier("arc2", input_shape=(16, 16, 3), weights="none", num_classes=3, seed=seed)
    else:
        model, info = model
    ctx = CacheContext(root=tmp_path / "cache" / "arc2-scratch", data_root=Path(data), backbone="arc2",
                       init="scratch", image_size=(16, 16), weights_sha256=weights_sha256(model), batch_size=16,
                       seed=0, augment=(), say=(lines.append if lines is not None else (lambda s: None)))
    return CacheBuilder(ctx, model), model, info


def _cut(model, info, fraction):
    apply_freeze(model, info, fraction)
    return find_cut(model, info)


def _fresh(model, cut, data, samples):
    """The frontier of the first rows straight from the images (what a cache must hold)."""
    from transfer.data.batches import BatchSource

    b = BatchSource(data, list(samples), 16, (16, 16)).get(0)
    out = prefix_model(model, cut).predict_on_batch(b.x)
    return [np.asarray(a) for a in (out if isinstance(out, list) else [out])], b.y


def test_a_cache_holds_the_frozen_output_and_is_hit_the_second_time(tmp_path, pattern_folder, samples):
    lines: list[str] = []
    builder, model, info = _builder(tmp_path, pattern_folder, lines=lines)
    cut = _cut(model, info, 0.5)
    assert cut.frontier == ("conv1_drop",)
    req16 = CacheRequest("train", samples, cut, None, "float16")
    req32 = CacheRequest("val", samples, cut, None, "float32")
    caches = builder.ensure([req16, req32])
    assert sum("caching the frozen part" in s for s in lines) == 2
    fresh, labels = _fresh(model, cut, pattern_folder, samples)
    rows = np.arange(len(labels))
    np.testing.assert_array_equal(caches[req16].labels[rows], labels)
    np.testing.assert_allclose(caches[req16].read(rows)[0], fresh[0], rtol=2e-3, atol=2e-3)  # float16
    np.testing.assert_allclose(caches[req32].read(rows)[0], fresh[0], rtol=1e-6, atol=1e-6)  # float32: exact
    assert np.load(caches[req16].folder / "x0.npy", mmap_mode="r").dtype == np.float16
    # a second trial of the same backbone (another process: nothing remembered) finds them
    lines.clear()
    from transfer.trainer import cache as cache_module

    cache_module._CHECKED.clear()
    again = _builder(tmp_path, pattern_folder, lines=lines)[0].ensure([req16, req32])
    assert not any("caching" in s for s in lines) and not any("not usable" in s for s in lines)
    assert {r: c.folder for r, c in again.items()} == {r: c.folder for r, c in caches.items()}


def test_a_deeper_cut_starts_from_a_shallower_cache(tmp_path, pattern_folder, samples):
    lines: list[str] = []
    builder, model, info = _builder(tmp_path, pattern_folder, lines=lines)
    shallow = _cut(model, info, 0.5)
    deep = _cut(model, info, 0.0)
    a = builder.ensure([CacheRequest("train", samples, shallow, None, "float32")])
    assert json.loads((next(iter(a.values())).folder / "meta.json").read_text())["built_from"] == "images"
    b = next(iter(builder.ensure([CacheRequest("train", samples, deep, None, "float32")]).values()))
    assert b.meta["built_from"] == next(iter(a.values())).folder.name
    fresh, _ = _fresh(model, deep, pattern_folder, samples)
    np.testing.assert_allclose(b.read(np.arange(len(fresh[0])))[0], fresh[0], rtol=1e-5, atol=1e-5)


def _broken(tmp_path, pattern_folder, samples, damage):
    lines: list[str] = []
    builder, model, info = _builder(tmp_path, pattern_folder, lines=lines)
    req = CacheRequest("train", samples, _cut(model, info, 0.5), None, "float16")
    folder = builder.ensure([req])[req].folder
    damage(folder)
    from transfer.trainer import cache as cache_module

    cache_module._CHECKED.clear()
    lines.clear()
    rebuilt = builder.ensure([req])[req]
    fresh, labels = _fresh(model, req.cut, pattern_folder, samples)
    np.testing.assert_allclose(rebuilt.read(np.arange(len(labels)))[0], fresh[0], rtol=2e-3, atol=2e-3)
    return lines


def test_a_truncated_cache_is_rebuilt_never_read(tmp_path, pattern_folder, samples):
    def truncate(folder):
        p = folder / "x0.npy"
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size - 100)

    lines = _broken(tmp_path, pattern_folder, samples, truncate)
    assert any("not usable" in s and "truncated" in s for s in lines), lines
    assert any("caching the frozen part" in s for s in lines)


def test_a_half_written_cache_is_rebuilt_never_read(tmp_path, pattern_folder, samples):
    def kill_mid_build(folder):  # what a kill leaves: a staging folder and a folder without meta.json
        shutil.copytree(folder, folder.with_name(folder.name + ".partial-99999"))
        (folder / "meta.json").unlink()

    lines = _broken(tmp_path, pattern_folder, samples, kill_mid_build)
    assert any("not usable" in s and "no complete meta.json" in s for s in lines), lines
    assert not list((tmp_path / "cache" / "arc2-scratch").glob("*.partial-*"))


def test_a_cache_of_other_weights_is_rebuilt_never_read(tmp_path, pattern_folder, samples):
    """A cache folder that claims this model's key but holds another model's output (copied,
    restored from a backup, edited meta.json): the spot check recomputes rows and refuses it."""
    builder_a, model_a, info_a = _builder(tmp_path / "a", pattern_folder, seed=1)
    req_a = CacheRequest("train", samples, _cut(model_a, info_a, 0.5), None, "float16")
    other = builder_a.ensure([req_a])[req_a].folder
    lines: list[str] = []
    builder_b, model_b, info_b = _builder(tmp_path, pattern_folder, seed=2, lines=lines)
    req_b = CacheRequest("train", samples, _cut(model_b, info_b, 0.5), None, "float16")
    target = builder_b.ctx.folder(req_b)
    shutil.copytree(other, target)
    meta = json.loads((target / "meta.json").read_text())
    meta.update(key=builder_b.ctx.key(req_b), weights_sha256=builder_b.ctx.weights_sha256)
    (target / "meta.json").write_text(json.dumps(meta))
    assert builder_b.open(req_b) is None
    assert any("differ from this model's frozen layers" in s for s in lines), lines
    cache = builder_b.ensure([req_b])[req_b]
    fresh, labels = _fresh(model_b, req_b.cut, pattern_folder, samples)
    np.testing.assert_allclose(cache.read(np.arange(len(labels)))[0], fresh[0], rtol=2e-3, atol=2e-3)
    # and a meta.json naming other weights is refused before any value is read
    meta = json.loads((cache.folder / "meta.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (cache.folder / "meta.json").write_text(json.dumps(meta))
    assert builder_b.open(req_b) is None and any("other initial weights" in s for s in lines)


def test_not_enough_disk_is_a_clear_error_before_the_trial_and_no_cache_trains(tmp_path, pattern_folder,
                                                                                monkeypatch):
    """The real free space of the disk is compared with what the cache needs plus the reserve
    (TRANSFER_CACHE_MIN_FREE); a reserve larger than any disk makes the check fail here. The
    command runs in this process (click's runner: the same command, exit code and standard error
    as the console script, without a second TensorFlow start-up)."""
    from click.testing import CliRunner

    from transfer.cli import cli

    monkeypatch.setenv("TRANSFER_CACHE_MIN_FREE", str(2**60))
    cmd = ["train", str(pattern_folder), "--backbone", "arc2", "--trainable", "0.5", "--weights", "none",
           "--epochs", "1", "--image-size", "16", "--batch-size", "16", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(cli, cmd)
    assert r.exit_code == 1, r.output
    err = r.stderr
    assert "error: --no-cache: not enough disk space for the frozen-prefix cache in" in err
    assert str(tmp_path / "run" / "cache" / "arc2-scratch") in err and "it needs" in err
    assert "train without the cache" in err
    assert not (tmp_path / "run" / "trials" / "arc2-t050" / "metrics.json").exists()
    assert not list((tmp_path / "run").rglob("x0.npy"))  # nothing was written before the check
    r = CliRunner().invoke(cli, cmd + ["--no-cache"])
    assert r.exit_code == 0, r.output
    assert "training uncached: the cache is off" in r.stderr
    m = json.loads((tmp_path / "run" / "trials" / "arc2-t050" / "metrics.json").read_text())
    assert m["cache"]["mode"] == "uncached" and not list((tmp_path / "run").rglob("x0.npy"))


def test_check_disk_space_names_folder_and_size(tmp_path, monkeypatch):
    from transfer.trainer.cache import check_disk_space

    check_disk_space(tmp_path / "cache", 1000)  # plenty here
    monkeypatch.setenv("TRANSFER_CACHE_MIN_FREE", str(2**60))
    with pytest.raises(CacheSpaceError, match=r"in .*cache: it needs 1000 B and .* is free") as e:
        check_disk_space(tmp_path / "cache", 1000)
    assert e.value.option == "cache"


def test_cached_and_uncached_trials_agree_and_val_numbers_are_the_saved_models(tmp_path, pattern_folder):
    """The same trial (same seed) trained on the cached frozen part and on images through
    it: same batches, same history up to float16 rounding; the per-epoch validation numbers
    of the cached trial (float32 validation cache) equal the saved model's on the images."""
    (mc, hc), (mu, hu) = _with_and_without_cache(tmp_path, pattern_folder, "0.5", epochs=3)
    assert mc["cache"]["mode"] == "cached" and mu["cache"]["mode"] == "uncached"
    assert mc["cache"]["bytes"] > 0 and mc["cost"]["prefix_seconds"] > 0
    for a, b in zip(hc, hu):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2) and a["val_loss"] == pytest.approx(b["val_loss"], rel=2e-2)
    best = next(r for r in hc if r["epoch"] == mc["best_epoch"])
    trained = mc["head"]["trained"]  # the trained head on the val images, through the saved model
    assert best["val_loss"] == pytest.approx(trained["loss"], rel=1e-4, abs=1e-6)
    assert best["val_accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)
    # the train numbers come from the cache the trial trained on, and are the saved model's on the images;
    # val and test from their float32 caches (built in the same pass), the uncached trial's from the images
    assert mc["features_from"]["train"].startswith("the cache train-")
    assert mc["features_from"]["test"].startswith("the cache test-") and "(float32)" in mc["features_from"]["test"]
    assert mu["features_from"]["train"] == mu["features_from"]["test"] == "the images, through the saved model"
    loss, accuracy = _saved_model_on_train_images(tmp_path / "cached", "arc2-t050", pattern_folder)
    assert mc["train"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert mc["train"]["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-6)  # float32 softmax of a near-0 loss


def _saved_model_on_train_images(run_dir: Path, trial: str, data: Path) -> tuple[float, float]:
    """(loss, accuracy) of a trial's model.keras on its training images, decoded and run as a user would."""
    from transfer.data.batches import BatchSource
    from transfer.data.folder import Sample
    from transfer.models.build import load_model
    from transfer.runfolder import RunFolder

    run = RunFolder(run_dir)
    src = BatchSource(data, [Sample(p, y) for p, y in run.split("train")], 16, (16, 16), recipe=run.recipe)
    model = load_model(run_dir / "trials" / trial / "model.keras")
    batches = [src.get(i) for i in range(len(src))]
    probs = np.concatenate([np.asarray(model.predict_on_batch(b.x), np.float64) for b in batches])
    y = np.concatenate([b.y for b in batches])
    return (float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1 - 1e-7)))),
            float(np.mean(probs.argmax(1) == y)))


def _with_and_without_cache(tmp_path, data, trainable: str, *, epochs: int):
    """(metrics, history) of the same arc2 trial trained with the cache and with it off."""
    runs = []
    for name, cache in (("cached", True), ("uncached", False)):
        cfg = load_config(None, base_overrides(data, tmp_path / name, trainable=trainable, epochs=epochs,
                                               cache=cache, lr=1e-3))
        res = run_sweep(cfg, progress=lambda s: None)
        assert res.ok, res.failed
        t = res.run_dir / "trials" / f"arc2-t{round(float(trainable) * 100):03d}"
        runs.append((json.loads((t / "metrics.json").read_text()), _history(t)))
    return runs


def _history(tdir: Path) -> list[dict]:
    from transfer.runfolder import TrialPaths

    return TrialPaths(tdir).history()


def test_feature_cache_reads_rows_by_offset_in_any_order(tmp_path, pattern_folder, samples):
    builder, model, info = _builder(tmp_path, pattern_folder)
    req = CacheRequest("train", samples, _cut(model, info, 0.5), None, "float32")
    cache = builder.ensure([req])[req]
    full = np.load(cache.folder / "x0.npy")
    rows = np.array([5, 1, 2, 3, 40, 0, 2])
    np.testing.assert_array_equal(cache.read(rows)[0], full[rows])
    reopened = FeatureCache(cache.folder, cache.meta)
    np.testing.assert_array_equal(reopened.labels, cache.labels)


def test_augmentation_trains_on_cached_views_or_uncached_and_says_which(tmp_path, pattern_folder):
    """With augmentation the frozen part's input changes every epoch: K augmented views of
    each training image are cached (epoch e reads view e mod K), or the trial trains on
    images; the log and metrics.json say which."""
    lines: list[str] = []
    cfg = load_config(None, base_overrides(pattern_folder, tmp_path / "views", trainable="0.5", epochs=3,
                                           augment="flip,translate", augment_views=2))
    assert run_sweep(cfg, progress=lines.append).ok
    m = json.loads((tmp_path / "views" / "trials" / "arc2-t050" / "metrics.json").read_text())
    assert m["cache"]["mode"] == "cached" and m["cache"]["views"] == 2
    folders = m["cache"]["folders"]
    assert sum(f.startswith("train-v0-") for f in folders) == 1 and sum(f.startswith("train-v1-") for f in folders) == 1
    meta = json.loads((tmp_path / "views" / "trials" / "arc2-t050" / "trial.json").read_text())
    assert meta["augment_views"] == 2
    assert any("2 augmented views" in s for s in lines)
    # the two views differ (they are two augmentations, not two copies)
    root = tmp_path / "views" / "cache" / "arc2-scratch"
    v0, v1 = (np.load(next(root.glob(f"train-v{k}-*")) / "x0.npy") for k in (0, 1))
    assert v0.shape == v1.shape and not np.array_equal(v0, v1)
    lines.clear()
    cfg = load_config(None, base_overrides(pattern_folder, tmp_path / "plain", trainable="0.5", epochs=1,
                                           augment="flip"))
    assert run_sweep(cfg, progress=lines.append).ok
    m = json.loads((tmp_path / "plain" / "trials" / "arc2-t050" / "metrics.json").read_text())
    assert m["cache"]["mode"] == "uncached" and "augmentation" in m["cache"]["reason"]
    assert any("training uncached: augmentation changes the frozen layers' input" in s for s in lines)


def test_a_trial_that_trains_everything_decodes_its_images_once(tmp_path, pattern_folder):
    """Without a frozen part (t100) and without augmentation the images are decoded once into
    a pixel cache (uint8, exactly the decoded pixels) and every epoch reads it: the same
    batches as decoding every epoch, so the same history; --no-cache decodes every epoch."""
    from transfer.data.image import load_image
    from transfer.runfolder import RunFolder

    (mp, hp), (md, hd) = _with_and_without_cache(tmp_path, pattern_folder, "1", epochs=2)
    assert mp["cache"]["mode"] == "none" and mp["cache"]["pixels"]["decoded"] == "once"
    assert "pixels" not in md["cache"]
    assert "- (pixels cached" in (tmp_path / "cached" / "sweep.md").read_text()  # the table says so
    folders = mp["cache"]["pixels"]["folders"]
    assert [f.split("-")[0] for f in folders] == ["test", "train", "val"] and all("-pixels-" in f for f in folders)
    for a, b in zip(hp, hd, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert mp["test"]["accuracy"] == pytest.approx(md["test"]["accuracy"], abs=1e-9)
    assert mp["features_from"]["train"].startswith("the decoded pixels train-pixels-")  # not decoded again
    assert mp["features_from"]["test"].startswith("the decoded pixels test-pixels-")
    assert mp["train"]["accuracy"] == pytest.approx(md["train"]["accuracy"], abs=1e-9)
    # the cache holds the decoded pixels of the training images, in split order
    train_folder = next(f for f in folders if f.startswith("train-"))
    x = np.load(tmp_path / "cached" / "cache" / "arc2-scratch" / train_folder / "x0.npy")
    assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3)
    first = RunFolder(tmp_path / "cached").split("train")[0][0]
    np.testing.assert_array_equal(x[0], load_image(pattern_folder / first, (16, 16)))


def test_a_pixel_cache_that_is_not_the_images_is_rebuilt_never_read(tmp_path, pattern_folder, samples):
    from transfer.data.batches import BatchSource
    from transfer.models.split import pixel_cut
    from transfer.trainer import cache as cache_module

    lines: list[str] = []
    builder, model, info = _builder(tmp_path, pattern_folder, lines=lines)
    req = CacheRequest("train", samples, pixel_cut((16, 16)), None, "uint8")
    cache = builder.ensure([req])[req]
    path = cache.folder / "x0.npy"
    data = bytearray(path.read_bytes())
    data[cache.meta["data_offsets"][0] + 5] ^= 0x40  # one pixel of the first image, same size
    path.write_bytes(bytes(data))
    cache_module._CHECKED.clear()  # another process: the spot check runs
    assert builder.open(req) is None
    assert any("its pixels are not those the images decode to" in s for s in lines)
    rebuilt = builder.ensure([req])[req]
    decoded = BatchSource(pattern_folder, list(samples), 16, (16, 16)).get(0).x
    np.testing.assert_array_equal(rebuilt.read(np.arange(len(decoded)))[0], decoded)


def _png_folder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(n)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def test_building_a_cache_holds_only_the_batches_ahead(tmp_path):
    """Peak memory of a cache build does not grow with the number of images (it once kept
    every decoded batch alive: 2.0x the peak RSS at 20,000 images than at 2,000)."""
    import tracemalloc

    peaks = {}
    for n in (64, 640):
        data = _png_folder(tmp_path / f"d{n}", n)
        samples = tuple(index_folder(data).samples)
        builder, model, info = _builder(tmp_path / f"r{n}", data)
        req = CacheRequest("train", samples, _cut(model, info, 0.5), None, "float32")
        tracemalloc.start()
        builder.ensure([req])
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    decoded = 640 * 16 * 16 * 3 * 4  # every decoded image of the larger folder, float32
    assert peaks[640] - peaks[64] < decoded / 4, peaks
