"""Keras ``PyDataset`` views of the training data: decoded images, or frozen-prefix caches.

Images stream from disk: Keras calls ``__getitem__`` from ``workers`` threads
(``use_multiprocessing=False``) and keeps ``max_queue_size`` batches ready, so decoding
runs in parallel with training and a dataset larger than memory trains. Cached frontier
rows are read by file offset the same way.

Both views batch the same way, so a trial sees the same batches cached or not: the
order of epoch ``e`` is the :class:`~transfer.data.batches.BatchSource` order of
``(seed, e)``, and a last batch smaller than half a batch joins the one before it (a
remainder of a few images would otherwise make a BatchNormalization step on a handful
of images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._lazy import import_keras


def merged_tail(n: int, batch: int) -> bool:
    """True when the last batch of ``n`` items is smaller than half a batch and joins the one before."""
    rem = n % batch
    return n > batch and 0 < rem < batch / 2


def batch_count(n: int, batch: int) -> int:
    """Batches per epoch of ``n`` items (see :func:`merged_tail`)."""
    return -(-n // batch) - (1 if merged_tail(n, batch) else 0)


def epoch_order(source, epoch: int) -> np.ndarray:
    """The sample order of ``epoch`` of a :class:`~transfer.data.batches.BatchSource`."""
    return source._order(int(epoch))  # the one definition of the order lives in BatchSource


@dataclass(frozen=True)
class Feed:
    """How a dataset hands its batches to Keras (the same for decoded images and caches).

    Attributes:
        num_classes: number of classes (for one-hot labels).
        one_hot: yield one-hot float32 labels (L1 loss) instead of int64 labels.
        workers: threads that prepare batches (decode images, read cache rows).
        max_queue_size: batches prepared ahead.
    """

    num_classes: int
    one_hot: bool = False
    workers: int = 2
    max_queue_size: int = 8

    def labels(self, y):
        """Class indices as the model's loss takes them: int64, or one-hot float32."""
        y = np.asarray(y, dtype=np.int64)
        return np.eye(self.num_classes, dtype=np.float32)[y] if self.one_hot else y


def make_dataset(source, feed: Feed):
    """Wrap a BatchSource as a Keras PyDataset yielding ``(x, y)``.

    Args:
        source: a ``transfer.data.batches.BatchSource``.
        feed: labels and loader threads (:class:`Feed`).

    Returns:
        A ``keras.utils.PyDataset``; ``set_epoch(e)`` selects the source's epoch
        (its shuffle / augmentation; the trainer calls it at each epoch begin),
        ``failed`` lists files that could not be read.

    Example::

        ds = make_dataset(src, Feed(num_classes=10))
        model.fit(ds, epochs=2)
    """
    keras = import_keras()

    class BatchDataset(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=max(1, int(feed.workers)), use_multiprocessing=False,
                             max_queue_size=feed.max_queue_size)
            self.source = source
            self.merge = merged_tail(len(source.samples), source.batch_size)

        def __len__(self):
            return len(self.source) - (1 if self.merge else 0)

        def __getitem__(self, i):
            b = self.source.get(int(i))
            x, y = b.x, b.y
            if self.merge and i == len(self) - 1:
                tail = self.source.get(int(i) + 1)
                x, y = np.concatenate([x, tail.x]), np.concatenate([y, tail.y])
            return np.asarray(x, dtype=np.float32), feed.labels(y)

        def set_epoch(self, epoch: int) -> None:
            self.source.set_epoch(int(epoch))

        def on_epoch_end(self):
            # the trainer sets the epoch explicitly (set_epoch in on_epoch_begin), so a
            # resumed run sees the same shuffle / augmentation as an uninterrupted one
            pass

        @property
        def failed(self):
            return list(getattr(self.source, "failed", []))

    return BatchDataset()


def cached_dataset(views, order_source, feed: Feed, *, shuffle: bool, pad_to_multiple: int = 1, rows=None):
    """A Keras PyDataset over frozen-prefix caches: ``(frontier arrays, y)`` batches.

    Args:
        views: :class:`~transfer.trainer.cache.FeatureCache` objects of one image list;
            epoch ``e`` reads ``views[e % len(views)]`` (augmented views; one for none).
        order_source: the BatchSource of the same images whose epoch order and batch size are used.
        feed: labels and loader threads (:class:`Feed`), as for the images.
        shuffle: as for the images.
        pad_to_multiple: repeat a batch's own rows up to a multiple of this (mirrored strategy).
        rows: read only these rows, in this order (the BatchNormalization statistics pass).

    Returns:
        A ``keras.utils.PyDataset`` with ``set_epoch(e)`` and an empty ``failed`` list.
    """
    keras = import_keras()
    n = views[0].rows if rows is None else len(rows)
    batch_size = int(order_source.batch_size)

    class CachedDataset(keras.utils.PyDataset):
        failed: list = []

        def __init__(self):
            super().__init__(workers=max(1, int(feed.workers)), use_multiprocessing=False,
                             max_queue_size=feed.max_queue_size)
            self.epoch = 0
            self.order = self._order(0)

        def _order(self, epoch):
            if rows is not None:
                return np.asarray(rows)
            return epoch_order(order_source, epoch) if shuffle else np.arange(n)

        def __len__(self):
            return batch_count(n, batch_size)

        def __getitem__(self, i):
            i = int(i)
            end = n if i == len(self) - 1 else (i + 1) * batch_size
            idx = self.order[i * batch_size:end]
            k = int(pad_to_multiple)
            if len(idx) % k:
                idx = np.resize(idx, -(-len(idx) // k) * k)
            cache = views[self.epoch % len(views)]
            xs = cache.read(idx)
            return (tuple(xs) if len(xs) > 1 else xs[0]), feed.labels(cache.labels[idx])

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)
            self.order = self._order(self.epoch)

        def on_epoch_end(self):
            pass

    return CachedDataset()
