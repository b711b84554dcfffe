"""Population BatchNormalization statistics and the guard against tiny last batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.inference import forward
from helpers.trainer import base_overrides
from transfer.trainer.config import load_config
from transfer.trainer.keras_data import batch_count, merged_tail
from transfer.trainer.sweep import run_sweep


def test_trained_batchnorm_gets_the_population_statistics_of_the_training_images(tiny_bn, pattern_folder, tmp_path):
    """The first BatchNormalization layer's input does not depend on any other: its saved
    moving mean / variance must be the mean / variance of the conv output over every
    training image (an exponential average of a few training batches is not)."""
    import keras

    from transfer.data.batches import BatchSource
    from transfer.models.build import load_model
    from transfer.runfolder import RunFolder

    cfg = load_config(None, base_overrides(pattern_folder, tmp_path / "run", backbones=tiny_bn, trainable="1",
                                           random_init=False, epochs=2))
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok, res.failed
    run = RunFolder(res.run_dir)
    tdir = res.run_dir / "trials" / "tiny_bn-t100"
    m = json.loads((tdir / "metrics.json").read_text())
    train = run.split("train")
    seconds = m["batchnorm"].pop("seconds_per_pass")
    assert m["batchnorm"] == {"statistics": "population", "layers": 2, "images": len(train)}
    assert 0 < seconds < m["cost"]["train_seconds"]
    model = load_model(tdir / "model.keras")
    from transfer.data.folder import Sample

    src = BatchSource(run.data_root, [Sample(p, lab) for p, lab in train], 64, (16, 16))
    conv = keras.Model(model.inputs, model.get_layer("b1_conv").output)
    out = np.concatenate([forward(conv, src.get(i).x) for i in range(len(src))]).astype(np.float64)
    mean, var = out.mean(axis=(0, 1, 2)), out.var(axis=(0, 1, 2))
    bn = model.get_layer("b1_bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5)
    # the per-epoch validation numbers used the statistics the saved model has (its trained
    # head's numbers on the val images; the head may then be refitted on the features)
    best = next(r for r in run.trial("tiny_bn-t100").files.history() if r["epoch"] == m["best_epoch"])
    assert best["val_loss"] == pytest.approx(m["head"]["trained"]["loss"], rel=1e-4)


def test_a_tiny_last_batch_joins_the_one_before():
    assert merged_tail(33, 16) and batch_count(33, 16) == 2  # 16 + 17, not 16 + 16 + 1
    assert not merged_tail(40, 16) and batch_count(40, 16) == 3  # 16 + 16 + 8: half a batch is kept
    assert not merged_tail(10, 16) and batch_count(10, 16) == 1  # the whole set is one batch
    assert not merged_tail(32, 16) and batch_count(32, 16) == 2


def test_image_and_cached_batches_have_the_same_sizes_and_labels(pattern_folder, tmp_path):
    from transfer.data.batches import BatchSource, Sampling
    from transfer.data.folder import index_folder
    from transfer.trainer.keras_data import Feed, cached_dataset, make_dataset

    samples = index_folder(pattern_folder).samples[:33]
    src = BatchSource(pattern_folder, samples, 16, (16, 16), sampling=Sampling(shuffle=True, seed=3))
    images = make_dataset(src, Feed(num_classes=3, workers=1))
    labels = np.array([s.label for s in samples])

    class Rows:  # a cache whose row i holds i
        rows = len(samples)
        labels = np.array([s.label for s in samples])

        def read(self, idx, dtype=np.float32):
            return [np.asarray(idx, dtype)[:, None]]

    cached = cached_dataset([Rows()], src, Feed(num_classes=3), shuffle=True)
    for epoch in (0, 1):
        images.set_epoch(epoch)
        cached.set_epoch(epoch)
        assert len(images) == len(cached) == 2
        for i in range(2):
            (xi, yi), (xc, yc) = images[i], cached[i]
            assert len(yi) == len(yc) == (16 if i == 0 else 17)
            np.testing.assert_array_equal(yi, yc)
            np.testing.assert_array_equal(labels[xc[:, 0].astype(int)], yc)


def test_the_population_pass_is_exact_and_traced_once_for_any_batch_size():
    """Batches of 8, 8 and 5 rows: the pooled statistics are those of all 21 rows, and the
    pass is traced once (a second batch shape would trace the model again: seconds for a
    large backbone, every epoch of every trial)."""
    import keras

    from transfer.trainer.bnstats import PopulationStatistics

    inp = keras.Input((4,))
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inp, bn(inp))
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(21, 4)).astype(np.float32)

    class Batches(list):
        workers = 1

    stats = PopulationStatistics(model)
    done = stats.update(Batches([(x[:8], None), (x[8:16], None), (x[16:], None)]))
    assert (done.images, done.batches, done.layers) == (21, 3, 1)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(axis=0), rtol=1e-4)
    assert stats._fn.experimental_get_tracing_count() == 1


def test_population_rows_are_a_seeded_shuffle_so_no_batch_holds_one_class():
    """A folder's split is class-sorted; the pass must not read it in that order."""
    from transfer.trainer import bnstats

    rows = bnstats.stats_rows(120, seed=1)
    assert sorted(rows.tolist()) == list(range(120))
    np.testing.assert_array_equal(rows, bnstats.stats_rows(120, seed=1))  # resumable: the same order again
    assert not np.array_equal(rows, np.arange(120))
    labels = np.repeat(np.arange(3), 40)[rows]  # three classes of 40, sorted by class on disk
    assert all(len(set(labels[i:i + 16])) > 1 for i in range(0, 120, 16))
    big = bnstats.stats_rows(bnstats.MAX_IMAGES + 500, seed=1)
    assert len(big) == len(set(big.tolist())) == bnstats.MAX_IMAGES and not np.all(np.diff(big) > 0)


def test_deeper_statistics_on_a_class_sorted_folder_are_those_of_shuffled_batches(tiny_bn, tmp_path):
    """The second BatchNormalization's input depends on how the first normalized its batch.
    Trained from random weights on a class-sorted folder, the saved statistics of ``b2_bn``
    must be those of the training images in shuffled batches (what the network saw while
    training), not those of one-class batches: the per-epoch validation, the early stop and
    the saved epoch all read them."""

    from helpers.images import make_pattern_folder
    from transfer.data.batches import BatchSource
    from transfer.data.folder import Sample
    from transfer.models.build import load_model
    from transfer.runfolder import RunFolder
    from transfer.trainer.bnstats import PopulationStatistics

    data = make_pattern_folder(tmp_path / "sorted", classes=3, per_class=48, seed=4)
    cfg = load_config(None, base_overrides(data, tmp_path / "run", backbones=tiny_bn, trainable="1",
                                           random_init=False, epochs=3))
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok, res.failed
    run = RunFolder(res.run_dir)
    train = run.split("train")
    assert [lab for _, lab in train] == sorted(lab for _, lab in train)  # the split is class-sorted
    tdir = res.run_dir / "trials" / "tiny_bn-t100"
    saved = load_model(tdir / "model.keras").get_layer("b2_bn")
    saved_mean, saved_var = saved.moving_mean.numpy(), saved.moving_variance.numpy()

    src = BatchSource(run.data_root, [Sample(p, lab) for p, lab in train], len(train), (16, 16))
    x = src.get(0).x

    class Batches(list):
        workers = 1

    def statistics(order):
        model = load_model(tdir / "model.keras")
        PopulationStatistics(model).update(Batches([(x[order[i:i + 16]], None) for i in range(0, len(x), 16)]))
        bn = model.get_layer("b2_bn")
        return bn.moving_mean.numpy(), bn.moving_variance.numpy()

    shuffled = [statistics(np.random.default_rng(s).permutation(len(x))) for s in (11, 12)]
    one_class = statistics(np.arange(len(x)))
    spread = max(np.abs(shuffled[0][0] - shuffled[1][0]).max(), 1e-6)  # two shuffles differ this much
    assert np.abs(saved_mean - shuffled[0][0]).max() < 4 * spread
    assert np.abs(one_class[0] - shuffled[0][0]).max() > 8 * spread  # the test can tell the two apart
    np.testing.assert_allclose(saved_var, shuffled[0][1], rtol=0.1)
    # and the per-epoch validation is the saved model's (the best epoch's row = its numbers)
    m = json.loads((tdir / "metrics.json").read_text())
    best = next(r for r in run.trial("tiny_bn-t100").files.history() if r["epoch"] == m["best_epoch"])
    assert best["val_loss"] == pytest.approx(m["head"]["trained"]["loss"], rel=1e-4)
