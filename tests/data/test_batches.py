"""BatchSource: shapes, determinism across threads, failed-file replacement, augmentation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from transfer.data.batches import AUGMENTATIONS, BatchSource, Sampling
from transfer.data.folder import index_folder
from transfer.data.image import load_image
from transfer.errors import ConfigError, DataError


@pytest.fixture
def indexed(tmp_path, make_folder):
    root = make_folder(tmp_path / "ds", {"a": 9, "b": 8})
    return index_folder(root)


def test_shapes_values_and_len(indexed):
    src = BatchSource(indexed.root, indexed.samples, 5, (4, 6))
    assert len(src) == 4
    assert len(BatchSource(indexed.root, indexed.samples, 5, (4, 6), sampling=Sampling(drop_remainder=True))) == 3
    b = src.get(0)
    assert b.x.shape == (5, 4, 6, 3) and b.x.dtype == np.float32 and b.y.dtype == np.int64
    assert b.paths == [s.path for s in indexed.samples[:5]] and b.failed == []
    ref = load_image(indexed.root / b.paths[2], (4, 6)).astype(np.float32)
    np.testing.assert_array_equal(b.x[2], ref)
    assert src.get(3).x.shape[0] == 2  # 17 = 3*5 + 2
    with pytest.raises(IndexError):
        src.get(4)


def _epoch(src, threads):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(src.get, range(len(src))))


def test_shuffle_and_augment_deterministic_across_threads(indexed):
    kw = dict(sampling=Sampling(shuffle=True, seed=3, augment=list(AUGMENTATIONS)))
    one = BatchSource(indexed.root, indexed.samples, 4, (8, 8), **kw)
    many = BatchSource(indexed.root, indexed.samples, 4, (8, 8), **kw)
    for epoch in (0, 1):
        one.set_epoch(epoch)
        many.set_epoch(epoch)
        a, b = _epoch(one, 1), _epoch(many, 4)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.x, y.x)
            assert x.paths == y.paths
    one.set_epoch(0)
    e0 = _epoch(one, 2)
    one.set_epoch(1)
    e1 = _epoch(one, 2)
    assert [p for b in e0 for p in b.paths] != [p for b in e1 for p in b.paths]
    assert sorted(p for b in e0 for p in b.paths) == sorted(s.path for s in indexed.samples)


def test_augmentation_changes_pixels_only_when_asked(indexed):
    from PIL import Image

    # a non-uniform image so geometric augmentations show
    arr = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    Image.fromarray(arr).save(indexed.root / "a" / "grad.png")
    idx = index_folder(indexed.root)
    plain = BatchSource(idx.root, idx.samples, 32, (16, 16)).get(0)
    aug = BatchSource(idx.root, idx.samples, 32, (16, 16), sampling=Sampling(augment=("rotate", "brightness"))).get(0)
    assert plain.paths == aug.paths and not np.array_equal(plain.x, aug.x)
    assert aug.x.min() >= 0 and aug.x.max() <= 255
    again = BatchSource(idx.root, idx.samples, 32, (16, 16), sampling=Sampling(augment=("brightness", "rotate"))).get(0)
    np.testing.assert_array_equal(aug.x, again.x)
    with pytest.raises(ConfigError, match="accepted: flip, translate, rotate, zoom, brightness, contrast"):
        BatchSource(idx.root, idx.samples, 4, (8, 8), sampling=Sampling(augment=("mixup",)))


def test_failed_file_replaced_by_next(indexed):
    samples = indexed.samples
    (indexed.root / samples[1].path).write_text("changed since indexing")
    src = BatchSource(indexed.root, samples, 4, (4, 4))
    b = src.get(0)
    assert b.x.shape[0] == 4
    assert b.paths == [samples[0].path, samples[2].path, samples[2].path, samples[3].path]
    assert [f.path for f in b.failed] == [samples[1].path] and "not an image" in b.failed[0].reason
    assert [f.path for f in src.failed] == [samples[1].path]
    b2 = src.get(0)  # known bad: skipped without decoding again, same result
    assert b2.paths == b.paths and len(src.failed) == 1


def test_whole_split_undecodable(indexed):
    for s in indexed.samples[:3]:
        (indexed.root / s.path).write_bytes(b"")
    src = BatchSource(indexed.root, indexed.samples[:3], 2, (4, 4))
    with pytest.raises(DataError, match="none of the 3 images"):
        src.get(0)


def test_bad_options(indexed):
    with pytest.raises(ConfigError, match="batch size"):
        BatchSource(indexed.root, indexed.samples, 0, (4, 4))
    with pytest.raises(ConfigError, match="image size"):
        BatchSource(indexed.root, indexed.samples, 2, (0, 4))


def test_pad_to_multiple_repeats_the_batch_own_images(tmp_path):
    """--strategy mirrored: every batch, the last included, splits evenly over the replicas."""
    from transfer.data.folder import Sample

    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    samples = []
    for i in range(7):
        Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(root / "a" / f"{i}.png")
        samples.append(Sample(f"a/{i}.png", i % 2))
    src = BatchSource(root, samples, 3, (8, 8), sampling=Sampling(pad_to_multiple=2))
    sizes = [len(src.get(i).x) for i in range(len(src))]
    assert sizes == [4, 4, 2]  # 3 -> 4, 3 -> 4, 1 -> 2
    b = src.get(0)
    assert b.paths == ["a/0.png", "a/1.png", "a/2.png", "a/0.png"]
    np.testing.assert_array_equal(b.x[3], b.x[0])
    assert b.y.tolist() == [0, 1, 0, 0]
    assert [len(BatchSource(root, samples, 3, (8, 8)).get(i).x) for i in range(3)] == [3, 3, 1]
    with pytest.raises(ConfigError, match="pad_to_multiple"):
        BatchSource(root, samples, 3, (8, 8), sampling=Sampling(pad_to_multiple=0))
