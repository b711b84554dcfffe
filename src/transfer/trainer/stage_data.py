"""What one stage of a trial trains on, and how each epoch is checked.

A stage trains the part of the model after its :class:`~transfer.models.split.Cut`. Its
batches come from (:func:`transfer.trainer.plan.data_source` decides):

* the frozen prefix's cached outputs (:mod:`transfer.trainer.cache`), built once for the
  sweep's trials of this backbone in one pass (:func:`prepare_caches`), with ``K`` cached
  augmented views when augmenting;
* for a stage with no frozen part, the images' decoded pixels from a cache (decoded once,
  not every epoch), unless augmentation or the cache is off;
* otherwise the images, decoded every epoch and run through the frozen prefix in
  inference mode.

Each stage also gets its population BatchNormalization pass (:class:`BatchNormRefresher`)
and its per-epoch validation (:class:`Validator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..data.batches import BatchSource, Sampling
from ..models.freeze import apply_freeze
from ..models.split import Cut, find_cut, pixel_cut, suffix_model, training_model
from . import loop
from .bnstats import BNStats, PopulationStatistics, stats_rows
from .cache import CacheRequest, CacheSpaceError, FeatureCache
from .config import TrainConfig
from .keras_data import Feed, cached_dataset, make_dataset
from .plan import (DataSource, Stage, cache_fractions, cache_views, data_source, probe_features_needed,
                   train_cache_dtype)
from .trial import Trial


@dataclass(frozen=True)
class CachedRows:
    """A split's rows in a cache, one per image in order: their frozen part's output (or decoded
    pixels) at the initial weights, computed once; the evaluation reads them again (the frozen
    layers of the saved model are those weights) and runs only the trained layers on them."""

    cut: Cut
    cache: FeatureCache


class BatchNormRefresher:
    """Recomputes population BatchNormalization statistics over ``dataset`` (called after every
    epoch); ``last`` is what the latest pass did."""

    def __init__(self, stats: PopulationStatistics, dataset):
        self.stats, self.dataset = stats, dataset
        self.last: BNStats | None = None

    def __call__(self) -> BNStats:
        self.last = self.stats.update(self.dataset)
        return self.last

    def record(self) -> dict | None:
        """What ``metrics.json`` says of the statistics (None before the first pass)."""
        if self.last is None:
            return None
        return {"statistics": "population", "layers": self.last.layers, "images": self.last.images,
                "seconds_per_pass": round(self.last.seconds, 3)}


def batchnorm_refresher(model, dataset) -> BatchNormRefresher | None:
    """The refresher of ``model``'s trained BatchNormalization layers (None when none trains)."""
    stats = PopulationStatistics(model)
    return BatchNormRefresher(stats, dataset) if stats else None


class Validator:
    """``() -> (loss, accuracy)`` of ``model`` on ``dataset`` (its ``test_step`` traced once)."""

    def __init__(self, model, dataset):
        self.step, self.dataset = loop.StepFunction(model, "test_step"), dataset

    def __call__(self) -> tuple[float, float]:
        res = loop.evaluate(self.step, self.dataset)
        return float(res["loss"]), float(res["accuracy"])


@dataclass(frozen=True)
class StageData:
    """What a stage trains on and how it is checked.

    Attributes:
        model: the model the stage trains (the suffix on cached features, or the model on images).
        train: the training dataset.
        sources: the datasets whose epoch and unreadable files the recorder follows (training first).
        validate: ``() -> (loss, accuracy)`` on the validation images (None: there are none).
        refresh_bn: the population BatchNormalization pass (None: no BatchNormalization layer trains).
        record: what ``metrics.json`` says of the stage's data (``cache``).
        rows: ``{split: cached rows}`` of the splits whose frozen part (or pixels) the stage's caches
            hold for every image in order (empty: it read images).
    """

    model: Any
    train: Any
    sources: tuple
    validate: Validator | None = None
    refresh_bn: BatchNormRefresher | None = None
    record: dict | None = None
    rows: dict = field(default_factory=dict)


# -- datasets -------------------------------------------------------------------------------

def image_source(trial: Trial, samples: Sequence, *, train: bool, replicas: int = 1) -> BatchSource:
    """Batches of decoded images of ``samples`` (shuffled and augmented for training).

    Under a mirrored strategy every batch must split evenly over the replicas (an empty or
    uneven per-replica batch fails inside TensorFlow): batches are padded with repeats of
    their own images. Only training and the per-epoch validation see the padding; the final
    metrics are computed on one device without it.
    """
    cfg = trial.cfg
    sampling = Sampling(shuffle=train, seed=cfg.seed, augment=tuple(cfg.augment) if train else (),
                        drop_remainder=False, pad_to_multiple=replicas)
    return BatchSource(trial.data.root, list(samples), cfg.batch_size, tuple(trial.spec.image_size),
                       sampling=sampling, recipe=trial.recipe)


def keras_dataset(source: BatchSource, cfg: TrainConfig, num_classes: int):
    """The trainer's dataset of a batch source (labels one-hot for the L1 loss)."""
    return make_dataset(source, feed_of(cfg, num_classes))


def feed_of(cfg: TrainConfig, num_classes: int) -> Feed:
    """How the trainer's datasets feed Keras: one-hot labels for the L1 loss, ``--workers`` threads."""
    return Feed(num_classes=num_classes, one_hot=cfg.loss == "l1", workers=cfg.workers)


# -- caches ---------------------------------------------------------------------------------

def _cuts_of(trial: Trial, fractions: Sequence[float], train_bn: bool) -> list[Cut]:
    """The cuts of the sweep's trials of this backbone (their caches are built in one pass)."""
    cuts = {}
    for f in fractions:
        apply_freeze(trial.model, trial.info, f, by=trial.spec.freeze_by, train_bn=train_bn)
        cut = find_cut(trial.model, trial.info)
        if cut.has_backbone:
            cuts[(cut.prefix, cut.frontier)] = cut
    return list(cuts.values())


def _requests(trial: Trial, cuts: Sequence[Cut], *, views: int, with_plain_train: bool) -> list[CacheRequest]:
    """Cache requests: the training images (``views`` augmented views, and the images as they
    are), the validation and the test images (float32, so the evaluation's numbers are the saved
    model's) at each cut."""
    out = []
    train = tuple(trial.data.train)
    for cut in cuts:
        pooled = cut.frontier == ("features",)
        dtype = train_cache_dtype(trial.spec, pooled=pooled)
        if views and not pooled:
            out += [CacheRequest("train", train, cut, k, dtype) for k in range(views)]
        if not views or pooled or with_plain_train:
            out.append(CacheRequest("train", train, cut, None, dtype))
        out += [CacheRequest(split, tuple(samples), cut, None, "float32")
                for split, samples in (("val", trial.data.val), ("test", trial.data.test)) if samples]
    return out


def prepare_caches(trial: Trial, stage: Stage, *, probe: bool = False) -> dict[CacheRequest, FeatureCache]:
    """Every cache this trial's backbone needs in the sweep (built once, in one pass), as {request: cache}.

    ``probe``: the pooled features of the initial model are cached too, whatever the sweep needs
    (the linear probe and the transferability score are computed on them).
    Leaves the model frozen as ``stage`` freezes it.
    """
    fractions = cache_fractions(trial.siblings, stage)
    cuts = _cuts_of(trial, fractions, stage.train_bn)
    if probe or probe_features_needed(trial.cfg, trial.spec, fractions):  # where the linear probe is fitted
        apply_freeze(trial.model, trial.info, 0.0, by=trial.spec.freeze_by, train_bn=stage.train_bn)
        probe_cut = find_cut(trial.model, trial.info, through_features=True)
        if all((c.prefix, c.frontier) != (probe_cut.prefix, probe_cut.frontier) for c in cuts):
            cuts.append(probe_cut)
    apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    return trial.builder.ensure(_requests(trial, cuts, views=cache_views(trial.cfg), with_plain_train=True))


def usable_rows(cut: Cut, cache: FeatureCache | None, samples: Sequence) -> CachedRows | None:
    """The cache's rows when it has one row per sample, in order (no unreadable file), else None."""
    if cache is None or cache.rows != len(samples) or cache.meta.get("bad_files"):
        return None
    return CachedRows(cut, cache)


def split_rows(trial: Trial, cut: Cut, caches: dict) -> dict[str, CachedRows]:
    """``{split: rows}`` of the splits whose cache at ``cut`` holds one row per image, in order."""
    out = {}
    for split, samples in trial.data.splits():
        rows = usable_rows(cut, find_cache(caches, split, cut), samples) if samples else None
        if rows is not None:
            out[split] = rows
    return out


def find_cache(caches: dict, split: str, cut: Cut, view: int | None = None) -> FeatureCache | None:
    """The cache of ``split`` at ``cut`` in ``view`` among ``caches`` (None: not there)."""
    for r, c in caches.items():
        if r.split == split and r.view == view and r.cut.frontier == cut.frontier and r.cut.prefix == cut.prefix:
            return c
    return None


@dataclass(frozen=True)
class _Bad:
    path: str
    reason: str


# -- a stage's data -------------------------------------------------------------------------

def _cached_data(trial: Trial, cut: Cut, caches: dict) -> StageData:
    cfg = trial.cfg
    views = cache_views(cfg)
    train_views = [find_cache(caches, "train", cut, k) for k in range(views)] or [find_cache(caches, "train", cut)]
    plain = find_cache(caches, "train", cut)
    order = image_source(trial, trial.data.train, train=True)
    feed = feed_of(cfg, trial.num_classes)
    train_ds = cached_dataset(train_views, order, feed, shuffle=True, pad_to_multiple=trial.replicas)
    model = suffix_model(trial.model, cut)
    stats_ds = cached_dataset([plain], order, feed, shuffle=False, rows=stats_rows(plain.rows, cfg.seed))
    refresh = batchnorm_refresher(model, stats_ds)
    rows = split_rows(trial, cut, caches)
    validate = None
    if trial.data.val:
        val = find_cache(caches, "val", cut)
        validate = Validator(model, cached_dataset([val], order, feed, shuffle=False, pad_to_multiple=trial.replicas))
    used = [c for r, c in caches.items() if r.cut.frontier == cut.frontier and r.cut.prefix == cut.prefix]
    record = {"mode": "cached", "cut": cut.label, "frozen_layers": cut.depth,
              "frontier": list(cut.frontier), "views": views,
              "bytes": sum(c.nbytes for c in used), "folders": sorted(c.folder.name for c in used),
              "prefix_seconds": round(sum(float(c.meta.get("seconds", 0.0)) for c in used), 3)}
    for c in used:
        trial.files.bad_files([_Bad(p, r) for p, r in c.meta.get("bad_files", [])])
    return StageData(model=model, train=train_ds, sources=(train_ds,), validate=validate, refresh_bn=refresh,
                     record=record, rows=rows)


def _plain_train_dataset(trial: Trial):
    """Training images without augmentation, at most :data:`~transfer.trainer.bnstats.MAX_IMAGES` (seeded)."""
    train = trial.data.train
    rows = stats_rows(len(train), trial.cfg.seed)
    return keras_dataset(image_source(trial, [train[i] for i in rows], train=False), trial.cfg, trial.num_classes)


def _pixel_data(trial: Trial, model) -> StageData | None:
    """The data of a stage with no frozen part from decoded-pixel caches (the images decoded
    once, not every epoch), or None when they cannot be used (a full disk, unreadable files):
    then the images are decoded every epoch."""
    pc = pixel_cut(trial.spec.image_size)
    reqs = {split: CacheRequest(split, tuple(samples), pc, None, "uint8")
            for split, samples in trial.data.splits() if samples}
    try:
        caches = trial.builder.ensure(list(reqs.values()))
    except CacheSpaceError as exc:
        trial.say(f"decoding the images every epoch: {exc}")
        return None
    if any(c.meta.get("bad_files") or c.rows != len(r.samples) for r, c in caches.items()):
        trial.say("decoding the images every epoch: some files could not be read, so cached rows "
                  "would not line up with the images")
        return None
    train = caches[reqs["train"]]
    rows = split_rows(trial, pc, caches)
    order = image_source(trial, trial.data.train, train=True)
    feed = feed_of(trial.cfg, trial.num_classes)
    train_ds = cached_dataset([train], order, feed, shuffle=True, pad_to_multiple=trial.replicas)
    stats_ds = cached_dataset([train], order, feed, shuffle=False, rows=stats_rows(train.rows, trial.cfg.seed))
    refresh = batchnorm_refresher(model, stats_ds)
    validate = None
    if "val" in reqs:
        validate = Validator(model, cached_dataset([caches[reqs["val"]]], order, feed, shuffle=False,
                                                   pad_to_multiple=trial.replicas))
    record = {"pixels": {"decoded": "once", "folders": sorted(c.folder.name for c in caches.values()),
                         "bytes": sum(c.nbytes for c in caches.values()),
                         "seconds": round(sum(float(c.meta.get("seconds", 0.0)) for c in caches.values()), 3)}}
    return StageData(model=model, train=train_ds, sources=(train_ds,), validate=validate, refresh_bn=refresh,
                     record=record, rows=rows)


def _decoded_data(trial: Trial, model) -> StageData:
    """The data of a stage on images decoded every epoch."""
    cfg = trial.cfg
    train_ds = keras_dataset(image_source(trial, trial.data.train, train=True, replicas=trial.replicas), cfg,
                             trial.num_classes)
    refresh = batchnorm_refresher(model, _plain_train_dataset(trial))
    if not trial.data.val:
        return StageData(model=model, train=train_ds, sources=(train_ds,), refresh_bn=refresh, record={})
    val_ds = keras_dataset(image_source(trial, trial.data.val, train=False, replicas=trial.replicas), cfg,
                           trial.num_classes)
    return StageData(model=model, train=train_ds, sources=(train_ds, val_ds), validate=Validator(model, val_ds),
                     refresh_bn=refresh, record={})


def _image_data(trial: Trial, cut: Cut, source: DataSource) -> StageData:
    model = training_model(trial.model, cut)
    data = _pixel_data(trial, model) if source.kind == "pixels" else None
    if data is None:
        data = _decoded_data(trial, model)
    record = {"mode": "uncached" if cut.has_backbone else "none", "reason": source.why, "cut": cut.label,
              "frozen_layers": cut.depth, "prefix_seconds": 0.0, **data.record}
    return StageData(model=data.model, train=data.train, sources=data.sources, validate=data.validate,
                     refresh_bn=data.refresh_bn, record=record, rows=data.rows)


def stage_data(trial: Trial, stage: Stage) -> StageData:
    """The stage's training model and data: cached frozen prefix when it can, images otherwise
    (the log says which). The model must be frozen as ``stage`` freezes it."""
    cut = find_cut(trial.model, trial.info)
    source = data_source(trial.cfg, has_backbone=cut.has_backbone)
    if source.kind == "cached":
        data = _cached_data(trial, cut, prepare_caches(trial, stage))
        trial.say(f"training the last layers from {cut.label} on the cached frozen part "
                  f"({data.record['frozen_layers']} layers" +
                  (f", {data.record['views']} augmented views" if data.record["views"] else "") + ")")
        return data
    if cut.has_backbone:
        trial.say(f"training uncached: {source.why}")
    return _image_data(trial, cut, source)
