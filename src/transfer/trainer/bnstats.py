"""Population BatchNormalization statistics (as PreciseBN does).

While a BatchNormalization layer trains, its moving mean / variance is an exponential
average of recent batches, taken while the weights were still changing; a short run from
random weights leaves it near the initial 0 / 1 and the model collapses to chance in
inference mode although it learned. After training (and before every per-epoch
validation), :class:`PopulationStatistics` recomputes the statistics of every
BatchNormalization layer that trains over the training images, without augmentation,
with Dropout off and in a seeded shuffle (:func:`stats_rows`): one pass in training mode,
each layer's moving statistics set to the batch's (momentum 0), averaged over the batches
with the exact pooled variance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .._lazy import import_keras, import_tensorflow
from .loop import batch_spec
from .loop import batches as read_batches

#: at most this many training images per pass (a seeded subset beyond; PreciseBN: ~10^4 suffice)
MAX_IMAGES = 10_000


@dataclass(frozen=True)
class BNStats:
    """What a population pass did (recorded in ``metrics.json``)."""

    layers: int
    images: int
    batches: int
    seconds: float = 0.0


def trained_batchnorms(model) -> list:
    """The BatchNormalization layers of ``model`` that train (``trainable`` is set)."""
    keras = import_keras()
    out = []
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable and layer not in out:
            out.append(layer)
    return out


def _all_layers(model):
    keras = import_keras()
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


class PopulationStatistics:
    """Recomputes the moving statistics of the BatchNormalization layers that train in ``model``.

    ``model`` is the model the trial trains (the suffix on cached features, or the model on
    images); its BatchNormalization layers are the contract model's, so the saved model
    gets the statistics.
    """

    def __init__(self, model):
        self.model = model
        self.bns = trained_batchnorms(model)
        keras = import_keras()
        self.dropouts = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Dropout)]
        self._fn = None

    def __bool__(self) -> bool:
        return bool(self.bns)

    def _step(self, x):
        """The traced pass of one batch; traced once, for any batch size (``x``: the first batch)."""
        tf = import_tensorflow()
        if self._fn is None:
            model, bns = self.model, self.bns

            @tf.function(input_signature=[batch_spec(x)])
            def step(x):
                model(x, training=True)
                return [bn.moving_mean for bn in bns], [bn.moving_variance for bn in bns]

            self._fn = step
        return self._fn

    def update(self, dataset) -> BNStats:
        """One pass over ``dataset`` (``(x, y)`` batches, no augmentation); sets the statistics."""
        if not self.bns:
            return BNStats(0, 0, 0)
        t0 = time.perf_counter()
        momenta, rates = [bn.momentum for bn in self.bns], [d.rate for d in self.dropouts]
        for bn in self.bns:
            bn.momentum = 0.0  # moving statistics := the batch's
        for d in self.dropouts:
            d.rate = 0.0
        sums = [np.zeros(bn.moving_mean.shape, np.float64) for bn in self.bns]
        squares = [np.zeros(bn.moving_mean.shape, np.float64) for bn in self.bns]
        images = batches = 0
        try:
            for x, _ in read_batches(dataset):  # the model runs while the next batches decode, as in training
                n = len(x[0] if isinstance(x, (list, tuple)) else x)
                means, variances = self._step(x)(x)
                for k, (m, v) in enumerate(zip(means, variances)):
                    m = np.asarray(m, np.float64)
                    sums[k] += n * m
                    squares[k] += n * (np.asarray(v, np.float64) + m * m)
                images += n
                batches += 1
        finally:
            for bn, m in zip(self.bns, momenta):
                bn.momentum = m
            for d, r in zip(self.dropouts, rates):
                d.rate = r
        for bn, s, q in zip(self.bns, sums, squares):
            mean = s / max(images, 1)
            bn.moving_mean.assign(mean.astype(np.float32))
            bn.moving_variance.assign(np.maximum(q / max(images, 1) - mean * mean, 0.0).astype(np.float32))
        return BNStats(len(self.bns), images, batches, time.perf_counter() - t0)


def stats_rows(n: int, seed: int) -> np.ndarray:
    """The rows a population pass reads, in the order it reads them: a seeded shuffle of all of
    them, or of a seeded subset of :data:`MAX_IMAGES`.

    The order matters: in training mode each BatchNormalization normalizes with its batch, so the
    statistics a deeper layer records are those of inputs normalized batch by batch. A split in
    file order is class-sorted for a folder dataset: every batch would hold one class, and the
    deeper layers would record the statistics of one-class batches, which the network never saw
    in training (its batches are shuffled). Shuffled batches are what it trained on.
    """
    rng = np.random.default_rng([int(seed), 0xB4])
    rows = np.arange(n) if n <= MAX_IMAGES else rng.choice(n, MAX_IMAGES, replace=False)
    return rng.permutation(rows)
