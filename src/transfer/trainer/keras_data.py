"""A ``keras.utils.PyDataset`` over :class:`transfer.data.batches.BatchSource`.

Images stream from disk: Keras calls ``__getitem__`` from ``workers`` threads
(``use_multiprocessing=False``) and keeps ``max_queue_size`` batches decoded ahead, so
decode runs in parallel with training and a dataset larger than memory trains.
"""

from __future__ import annotations

from .._lazy import import_keras


def make_dataset(source, *, num_classes: int, one_hot: bool, workers: int = 2, max_queue_size: int = 8):
    """Wrap a BatchSource as a Keras PyDataset yielding ``(x, y)``.

    Args:
        source: a ``transfer.data.batches.BatchSource``.
        num_classes: number of classes (for one-hot labels).
        one_hot: yield one-hot float32 labels (L1 loss) instead of int64 labels.
        workers: decode threads.
        max_queue_size: batches prepared ahead.

    Returns:
        A ``keras.utils.PyDataset``; ``set_epoch(e)`` selects the source's epoch
        (its shuffle / augmentation; the trainer calls it at each epoch begin),
        ``failed`` lists files that could not be read.

    Example::

        ds = make_dataset(src, num_classes=10, one_hot=False)
        model.fit(ds, epochs=2)
    """
    keras = import_keras()
    import numpy as np

    class BatchDataset(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=max(1, int(workers)), use_multiprocessing=False, max_queue_size=max_queue_size)
            self.source = source
            self.epoch = 0

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            b = self.source.get(int(i))
            y = np.asarray(b.y, dtype=np.int64)
            if one_hot:
                y = np.eye(num_classes, dtype=np.float32)[y]
            return np.asarray(b.x, dtype=np.float32), y

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)
            self.source.set_epoch(self.epoch)

        def on_epoch_end(self):
            # the trainer sets the epoch explicitly (set_epoch in on_epoch_begin), so a
            # resumed run sees the same shuffle / augmentation as an uninterrupted one
            pass

        @property
        def failed(self):
            return list(getattr(self.source, "failed", []))

    return BatchDataset()
