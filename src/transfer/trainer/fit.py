"""Run one trial of a sweep into ``RUN/trials/<name>/`` (layout: docs/design.md).

Order of work in a trial:

1. ``keras.utils.set_random_seed(seed)`` and TensorFlow op determinism.
2. Build the classifier; load the shared initial weights
   ``RUN/init/<backbone>-<init>.weights.h5`` (written by the first trial of that
   backbone + init), so every trial of a backbone starts from the same weights.
3. For each stage (:func:`plan_stages`): ``apply_freeze`` (random-init trials: everything
   trainable, BatchNorm trainable), then find the :class:`~transfer.models.split.Cut`
   between the frozen prefix and the part that trains.

   * A stage that trains only the softmax head on pooled features fits it to
     convergence (:mod:`transfer.trainer.probe`): one full-batch fit, one history row.
   * Otherwise the trainable part trains epoch by epoch, on the frozen prefix's cached
     output (:mod:`transfer.trainer.cache`) or, with the cache off or augmentation
     without cached views, on images through the prefix in inference mode (a stage
     with no frozen part reads its images' decoded pixels from a cache instead of
     decoding them every epoch, unless augmentation or the cache is off). Pretrained
     starts get the linear probe as their initial head (LP-FT) unless it is turned off.
     The epochs run in :mod:`transfer.trainer.loop` (the model's own ``train_step``;
     ``Model.fit`` under a distribution strategy).
     :class:`~transfer.trainer.epochs.EpochRecorder` recomputes population
     BatchNormalization statistics (when they train), validates, and writes the history,
     the best model, the resume checkpoint and the resume state after every epoch.
4. Evaluate ``model.keras`` (the best epoch) on the train / val / test images, the way a
   user runs it -> ``metrics.json``; ``curves.png``; ``status.json`` = done. The resume
   checkpoint is then removed.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .._lazy import import_keras, import_tensorflow
from ..fsutil import atomic_path, file_stamp, read_json
from ..progress import Progress, ProgressLike, as_progress
from ..runfolder import RunLayout, RunWriter
from .config import TrainConfig


@dataclass(frozen=True)
class TrialSpec:
    """What one trial trains (one column of the sweep table, or one fold of it)."""

    name: str
    group: str
    fold: int | None
    backbone: str
    init: str  # pretrained | random | scratch
    weights: str  # imagenet | none | PATH
    trainable: float
    freeze_by: str
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Stage:
    """A part of a trial with one freeze and one learning rate (``two_stage`` has two).

    ``probe``: the stage trains only the softmax head on pooled features, fitted to
    convergence in one step (it counts as one epoch).
    """

    name: str
    epochs: int
    fraction: float
    lr: float
    train_bn: bool
    probe: bool = False


@dataclass
class TrainedTrial:
    """What training left for the final evaluation (see :func:`run_trial`)."""

    history: list[dict]
    best_epoch: int
    last_epoch: int
    params: tuple[int, int]
    freeze: dict | None
    record: dict = field(default_factory=dict)  # cache, BatchNormalization statistics, head init, costs
    probe_only: bool = False  # the trial trained nothing but a converged linear probe
    train_rows: tuple | None = None  # (cut, FeatureCache): the training images' frozen part, computed once


def trial_name(backbone: str, trainable: float | None, *, random_init: bool = False, fold: int | None = None) -> str:
    """Trial name of docs/design.md: ``mobilenet_v2-t030``, ``arc2-random``, ``...-f2``.

    Example::

        trial_name("mobilenet_v2", 0.3)              # 'mobilenet_v2-t030'
        trial_name("arc2", 1.0, random_init=True)    # 'arc2-random'
    """
    base = f"{backbone}-random" if random_init else f"{backbone}-t{int(round(float(trainable) * 100)):03d}"
    return f"{base}-f{fold}" if fold else base


def is_finished(trial_dir: Path) -> bool:
    """A trial is finished when status says done and model.keras + metrics.json exist."""
    from ..runfolder import TrialPaths

    return TrialPaths(Path(trial_dir)).finished()


def read_history(path: Path) -> list[dict]:
    """Rows of a ``history.csv`` (numbers as float, epoch as int)."""
    from ..runfolder import TrialPaths

    return TrialPaths(Path(path).parent).history() if Path(path).name == "history.csv" else []


def _pooled(backbone: str) -> bool:
    """True when the backbone's ``features`` are a weightless pooling (the head is one softmax layer on them)."""
    from ..models.registry import get_backbone

    return get_backbone(backbone).pooling == "avg"


def plan_stages(cfg: TrainConfig, spec: TrialSpec) -> list[Stage]:
    """The stages of a trial: one, or head-only then fine-tuning with ``two_stage``.

    Without pretrained weights (``init`` random or scratch) the BatchNormalization
    statistics are the initial mean 0 / variance 1, not knowledge worth keeping: the
    unfrozen part learns them in every stage. A head-only stage of a pooled backbone is
    a linear-probe fit (one step).
    """
    lr = cfg.lr_for(spec.trainable, spec.init == "pretrained")
    if spec.init == "random":
        return [Stage("main", cfg.epochs, 1.0, lr, True)]
    train_bn = cfg.train_bn or spec.init == "scratch"
    probe = _pooled(spec.backbone)

    def head(name: str, epochs: int) -> Stage:
        return Stage(name, 1, 0.0, lr, train_bn, probe=True) if probe else Stage(name, epochs, 0.0, lr, train_bn)

    if spec.trainable == 0:
        return [head("main", cfg.epochs)]
    if cfg.two_stage and cfg.head_epochs > 0:
        return [head("head", cfg.head_epochs),
                Stage("finetune", cfg.epochs, spec.trainable, cfg.fine_tune_lr_for(lr), train_bn)]
    return [Stage("main", cfg.epochs, spec.trainable, lr, train_bn)]


# -- model -------------------------------------------------------------------------------

def _set_determinism(seed: int) -> None:
    tf = import_tensorflow()
    keras = import_keras()
    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def _compile(model, cfg: TrainConfig, lr: float) -> None:
    keras = import_keras()
    opt = (keras.optimizers.SGD(learning_rate=lr, momentum=0.9) if cfg.optimizer == "sgd"
           else keras.optimizers.Adam(learning_rate=lr))
    if cfg.loss == "l1":
        loss = keras.losses.MeanAbsoluteError(name="l1")
        acc = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(name="crossentropy")
        acc = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=opt, loss=loss, metrics=[acc])
    # the optimizer's slot variables now, not inside the first traced step: a tf.function
    # that creates variables is traced twice (MobileNetV2's train step: 26 s -> 14 s to trace)
    opt.build(model.trainable_variables)


def build_trial_model(run_dir: Path, cfg: TrainConfig, spec: TrialSpec, num_classes: int):
    """Build the classifier of a trial and load (or create) the shared initial weights.

    Random initial weights (``init`` random or scratch) keep Keras's BatchNormalization
    statistics 0 / 1 in their frozen layers, as a user's frozen random backbone has them.
    Their outputs can be tiny (MobileNetV2's pooled features are ~1e-12), so their caches
    are float32 (:func:`_requests`) and the linear probe standardizes the features. Setting
    population statistics in the frozen layers instead was tried and is worse: MobileNetV2
    from random weights, 30 % trainable, on the digits reached val accuracy 0.33-0.44 with
    them against 0.83-0.90 without (5 epochs, 32x32, cached and uncached alike).
    """
    from ..models.build import build_classifier

    _set_determinism(cfg.seed)
    init_path = RunLayout(run_dir).init_weights(spec.backbone, spec.init)
    known = _INIT_WEIGHTS.get(str(init_path))
    stamp = file_stamp(init_path)
    if known is not None and known[0] != stamp:
        known = None
    # the initial weights file overwrites every weight: when this process already read it,
    # the build need not load the pretrained ones too
    weights = "none" if spec.init in ("random", "scratch") or known is not None else spec.weights
    h, w = spec.image_size
    model, info = build_classifier(
        spec.backbone, input_shape=(h, w, 3), weights=weights, num_classes=num_classes,
        dropout=cfg.dropout, seed=cfg.seed,
    )
    if known is not None:
        model.set_weights(known[1])  # ~0.05 s; Keras's load_weights of MobileNetV2 ~0.9 s
    elif stamp is not None:
        model.load_weights(init_path)
    else:
        with atomic_path(init_path, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
        stamp = file_stamp(init_path)
    _INIT_WEIGHTS.clear()  # one backbone's at a time: the trials of a backbone run one after another
    _INIT_WEIGHTS[str(init_path)] = (stamp, model.get_weights())
    return model, info


#: the initial weights file this process read or wrote last: path -> ((mtime, size), arrays)
_INIT_WEIGHTS: dict[str, tuple] = {}


# -- data --------------------------------------------------------------------------------

def _source(data_root, samples, cfg: TrainConfig, spec: TrialSpec, *, train: bool, replicas: int = 1,
            augment: bool | None = None, recipe: dict | None = None):
    from ..data.batches import BatchSource

    # Under a mirrored strategy every batch must split evenly over the replicas (an
    # empty or uneven per-replica batch fails inside TensorFlow): batches are padded
    # with repeats of their own images. Only training and the per-epoch validation see
    # the padding; the final metrics are computed on one device without it.
    augment = train if augment is None else augment
    return BatchSource(data_root, list(samples), cfg.batch_size, tuple(spec.image_size), shuffle=train,
                       seed=cfg.seed, augment=tuple(cfg.augment) if augment else (), drop_remainder=False,
                       pad_to_multiple=replicas, recipe=recipe)


def _dataset(source, cfg: TrainConfig, num_classes: int):
    from .keras_data import make_dataset

    return make_dataset(source, num_classes=num_classes, one_hot=cfg.loss == "l1", workers=cfg.workers)


@dataclass
class Trial:
    """One trial while it trains: its inputs, files and model."""

    writer: RunWriter
    cfg: TrainConfig
    spec: TrialSpec
    data_root: Path
    class_names: list[str]
    train: list
    val: list
    progress: Progress
    replicas: int
    siblings: tuple[float, ...]
    files: object = None  # epochs.TrialFiles
    model: object = None
    info: object = None
    builder: object = None  # cache.CacheBuilder, None with the cache off
    record: dict = field(default_factory=dict)
    recipe: dict | None = None  # the run's pixel recipe (dataset.json): a resumed run keeps its own
    train_rows: tuple | None = None  # (cut, FeatureCache) of the training images the last stage read

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def say(self, text: str) -> None:
        self.progress.say(f"  [{self.spec.name}] {text}")


@dataclass
class StageData:
    """What a stage trains on and how it is checked."""

    model: object  # the model the stage trains (suffix on cached features, or the model on images)
    train: object  # Keras dataset
    sources: list  # datasets: the training one first
    validate: object = None  # () -> (loss, accuracy)
    refresh_bn: object = None  # () -> BNStats
    record: dict = field(default_factory=dict)


# -- caches --------------------------------------------------------------------------------

def _cache_builder(trial: Trial):
    """The cache builder of a trial (None with the cache off), from the model at its initial weights."""
    if not trial.cfg.cache:
        return None
    from .cache import CacheBuilder, CacheContext, weights_sha256

    ctx = CacheContext(root=trial.writer.cache_group(trial.spec.backbone, trial.spec.init),
                       data_root=trial.data_root, backbone=trial.spec.backbone, init=trial.spec.init,
                       image_size=tuple(trial.spec.image_size), weights_sha256=weights_sha256(trial.model),
                       batch_size=trial.cfg.batch_size, seed=trial.cfg.seed, augment=tuple(trial.cfg.augment),
                       workers=trial.cfg.workers, say=trial.progress.say, recipe=trial.recipe)
    return CacheBuilder(ctx, trial.model)


def _cuts_of(trial: Trial, fractions, train_bn: bool) -> list:
    """The cuts of the sweep's trials of this backbone (their caches are built in one pass)."""
    from ..models.freeze import apply_freeze
    from ..models.split import find_cut

    cuts = {}
    for f in fractions:
        apply_freeze(trial.model, trial.info, f, by=trial.spec.freeze_by, train_bn=train_bn)
        cut = find_cut(trial.model, trial.info)
        if cut.has_backbone:
            cuts[(cut.prefix, cut.frontier)] = cut
    return list(cuts.values())


def _requests(trial: Trial, cuts, *, views: int, with_plain_train: bool):
    """Cache requests: the training images (float16 for pretrained weights; ``views``
    augmented views) and the validation images (float32) at each cut; pooled features, and
    every cache of random initial weights (whose stored 0 / 1 BatchNormalization statistics
    can leave activations below float16's range), are float32."""
    from .cache import CacheRequest

    out = []
    for cut in cuts:
        pooled = cut.frontier == ("features",)
        train_dtype = "float16" if (trial.spec.init == "pretrained" and not pooled) else "float32"
        if views and not pooled:
            out += [CacheRequest("train", tuple(trial.train), cut, k, train_dtype) for k in range(views)]
        if not views or pooled or with_plain_train:
            out.append(CacheRequest("train", tuple(trial.train), cut, None, train_dtype))
        if trial.val:
            out.append(CacheRequest("val", tuple(trial.val), cut, None, "float32"))
    return out


def _prepare_caches(trial: Trial, stage: Stage, cut) -> dict:
    """Every cache this trial's backbone needs in the sweep (built once, in one pass), as {request: cache}."""
    from ..models.freeze import apply_freeze
    from ..models.split import find_cut

    cfg = trial.cfg
    fractions = sorted(set(trial.siblings) | {stage.fraction})
    cuts = _cuts_of(trial, fractions, stage.train_bn)
    probe_needed = (cfg.lp_ft and trial.spec.init == "pretrained" and any(f > 0 for f in fractions)) \
        or (_pooled(trial.spec.backbone) and 0.0 in fractions)
    if probe_needed:  # the pooled features of the initial model, where the linear probe is fitted
        apply_freeze(trial.model, trial.info, 0.0, by=trial.spec.freeze_by, train_bn=stage.train_bn)
        probe_cut = find_cut(trial.model, trial.info, through_features=True)
        if all((c.prefix, c.frontier) != (probe_cut.prefix, probe_cut.frontier) for c in cuts):
            cuts.append(probe_cut)
    apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    views = cfg.augment_views if cfg.augment else 0
    return trial.builder.ensure(_requests(trial, cuts, views=views, with_plain_train=True))


def _usable_rows(cut, cache, samples) -> tuple | None:
    """``(cut, cache)`` when the cache has one row per sample, in order (no unreadable file), else None."""
    if cache is None or cache.rows != len(samples) or cache.meta.get("bad_files"):
        return None
    return cut, cache


def _find(caches: dict, split: str, cut, view=None):
    for r, c in caches.items():
        if r.split == split and r.view == view and r.cut.frontier == cut.frontier and r.cut.prefix == cut.prefix:
            return c
    return None


# -- the linear probe ------------------------------------------------------------------------

def _probe_features(trial: Trial, cut, caches: dict | None):
    """(x_train, y_train, x_val, y_val) pooled features at the initial weights, from the caches or the images."""
    if caches is not None:
        tr, va = _find(caches, "train", cut), _find(caches, "val", cut)
        xt, yt = tr.read(np.arange(tr.rows))[0], tr.labels
        xv, yv = (va.read(np.arange(va.rows))[0], va.labels) if va is not None else (None, None)
        return xt, yt, xv, yv
    from ..models.split import inference_function, prefix_model

    prefix = inference_function(prefix_model(trial.model, cut))

    def features(samples):
        src = _source(trial.data_root, samples, trial.cfg, trial.spec, train=False, recipe=trial.recipe)
        xs, ys = [], []
        for i in range(len(src)):
            b = src.get(i)
            xs.append(np.asarray(prefix(b.x)[0]))
            ys.append(b.y)
        return np.concatenate(xs), np.concatenate(ys)

    xt, yt = features(trial.train)
    xv, yv = features(trial.val) if trial.val else (None, None)
    return xt, yt, xv, yv


def _linear_probe(trial: Trial, stage: Stage):
    """The converged linear probe of this backbone's initial pooled features (fitted once, then reused)."""
    import hashlib

    from ..models.freeze import apply_freeze
    from ..models.split import find_cut
    from .probe import L2_GRID, MAX_ITER, Probe, fit_probe

    apply_freeze(trial.model, trial.info, 0.0, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    cut = find_cut(trial.model, trial.info, through_features=True)
    caches = _prepare_caches(trial, stage, cut) if trial.builder is not None else None
    used = [c for r, c in (caches or {}).items() if r.cut.frontier == cut.frontier and r.view is None]
    trial.record["probe_cache"] = {"mode": "cached" if caches is not None else "uncached", "cut": cut.label,
                                   "frozen_layers": cut.depth, "bytes": sum(c.nbytes for c in used),
                                   "folders": sorted(c.folder.name for c in used),
                                   "prefix_seconds": round(sum(float(c.meta.get("seconds", 0.0)) for c in used), 3)}
    if caches is None:
        trial.record["probe_cache"]["reason"] = "the cache is off: pooled features computed in memory"
    else:  # a probe stage's model reads its training images' features from this cache
        trial.train_rows = _usable_rows(cut, _find(caches, "train", cut), trial.train)
    path = None
    if caches is not None:
        keys = [trial.builder.ctx.key(r) for r in caches if r.cut.frontier == cut.frontier and r.view is None]
        ident = "|".join(sorted(keys) + [trial.cfg.loss, repr(L2_GRID), str(MAX_ITER)])
        path = trial.builder.ctx.root / f"probe-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npz"
        if path.is_file():
            try:
                return Probe.load(path), True
            except (OSError, ValueError, KeyError):
                pass
    xt, yt, xv, yv = _probe_features(trial, cut, caches)
    probe = fit_probe(xt, yt, xv, yv, num_classes=trial.num_classes, loss=trial.cfg.loss)
    if path is not None:
        with atomic_path(path, suffix=".npz") as tmp:
            probe.save(tmp)
    return probe, False


def _set_head(model, probe) -> None:
    model.get_layer("probs").set_weights([probe.kernel, probe.bias])


def _probe_stage(trial: Trial, stage: Stage, state, history: list, epoch: int) -> None:
    """A head-only stage of a pooled backbone: the linear probe is the head (one history row)."""
    t0 = time.perf_counter()
    probe, reused = _linear_probe(trial, stage)
    _set_head(trial.model, probe)
    trial.say(f"linear probe on the pooled features{' (reused)' if reused else ''}: train acc "
              f"{probe.train_accuracy:.4f}" + (f", val acc {probe.val_accuracy:.4f}" if probe.val_accuracy is not None
                                                else "") + f" (L2 {probe.l2:.3g}, {probe.iterations} L-BFGS steps)")
    if probe.coarse:
        trial.say(f"  note: the pooled features vary by so little around their mean that float32 resolves them to "
                  f"~{probe.resolution_bits:.0f} bits (ordinary features: ~23); a float32 head's numbers on them "
                  "are noisy (a mostly frozen random backbone?)")
    monitor = probe.val_loss if probe.val_loss is not None else probe.train_loss
    row = {"epoch": epoch, "loss": probe.train_loss, "accuracy": probe.train_accuracy, "val_loss": probe.val_loss,
           "val_accuracy": probe.val_accuracy, "lr": None, "seconds": round(time.perf_counter() - t0, 3)}
    history.append(row)
    trial.files.history(history)
    state.best_loss, state.best_epoch, state.wait, state.epoch = monitor, epoch, 0, epoch
    trial.files.save_checkpoint(trial.model, None, state)
    trial.record["head"] = {"init": "linear probe", **probe.record()}
    trial.record["cache"] = trial.record.pop("probe_cache")


# -- a stage's data ------------------------------------------------------------------------

def _bn_refresher(trial: Trial, model, dataset):
    from .bnstats import PopulationStatistics

    stats = PopulationStatistics(model)
    if not stats:
        return None

    def refresh():
        out = stats.update(dataset)
        trial.record["batchnorm"] = {"statistics": "population", "layers": out.layers, "images": out.images,
                                     "seconds_per_pass": round(out.seconds, 3)}
        return out

    return refresh


def _validator(model, dataset):
    from . import loop

    step = loop.StepFunction(model, "test_step")

    def validate():
        res = loop.evaluate(step, dataset)
        return float(res["loss"]), float(res["accuracy"])

    return validate


def _cached_data(trial: Trial, stage: Stage, cut, caches: dict) -> StageData:
    from ..models.split import suffix_model
    from .bnstats import stats_rows
    from .keras_data import cached_dataset

    cfg = trial.cfg
    views = cfg.augment_views if cfg.augment else 0
    train_views = [_find(caches, "train", cut, k) for k in range(views)] or [_find(caches, "train", cut)]
    plain = _find(caches, "train", cut)
    order = _source(trial.data_root, trial.train, cfg, trial.spec, train=True, recipe=trial.recipe)
    one_hot = cfg.loss == "l1"
    kw = dict(batch_size=cfg.batch_size, num_classes=trial.num_classes, one_hot=one_hot, workers=cfg.workers)
    train_ds = cached_dataset(train_views, order, shuffle=True, pad_to_multiple=trial.replicas, **kw)
    model = suffix_model(trial.model, cut)
    stats_ds = cached_dataset([plain], order, shuffle=False, rows=stats_rows(plain.rows, cfg.seed), **kw)
    data = StageData(model=model, train=train_ds, sources=[train_ds], refresh_bn=_bn_refresher(trial, model, stats_ds))
    trial.train_rows = _usable_rows(cut, plain, trial.train)
    if trial.val:
        val = _find(caches, "val", cut)
        data.validate = _validator(model, cached_dataset([val], order, shuffle=False,
                                                         pad_to_multiple=trial.replicas, **kw))
    used = [c for r, c in caches.items() if r.cut.frontier == cut.frontier and r.cut.prefix == cut.prefix]
    data.record = {"mode": "cached", "cut": cut.label, "frozen_layers": cut.depth,
                   "frontier": list(cut.frontier), "views": views,
                   "bytes": sum(c.nbytes for c in used), "folders": sorted(c.folder.name for c in used),
                   "prefix_seconds": round(sum(float(c.meta.get("seconds", 0.0)) for c in used), 3)}
    for c in used:
        trial.files.bad_files([_Bad(p, r) for p, r in c.meta.get("bad_files", [])])
    return data


@dataclass(frozen=True)
class _Bad:
    path: str
    reason: str


def _plain_train_dataset(trial: Trial):
    """Training images without augmentation, at most :data:`~transfer.trainer.bnstats.MAX_IMAGES` (seeded)."""
    from .bnstats import stats_rows

    rows = stats_rows(len(trial.train), trial.cfg.seed)
    src = _source(trial.data_root, [trial.train[i] for i in rows], trial.cfg, trial.spec, train=False, recipe=trial.recipe)
    return _dataset(src, trial.cfg, trial.num_classes)


def _pixel_data(trial: Trial, model) -> StageData | None:
    """The data of a stage with no frozen part from decoded-pixel caches (the images decoded
    once, not every epoch), or None when they cannot be used (the cache is off, augmentation,
    a full disk, unreadable files): then the images are decoded every epoch."""
    from ..models.split import pixel_cut
    from .bnstats import stats_rows
    from .cache import CacheRequest, CacheSpaceError
    from .keras_data import cached_dataset

    cfg = trial.cfg
    if trial.builder is None or cfg.augment:
        return None
    pc = pixel_cut(trial.spec.image_size)
    reqs = {split: CacheRequest(split, tuple(samples), pc, None, "uint8")
            for split, samples in (("train", trial.train), ("val", trial.val)) if samples}
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
    trial.train_rows = _usable_rows(pc, train, trial.train)
    order = _source(trial.data_root, trial.train, cfg, trial.spec, train=True, recipe=trial.recipe)
    kw = dict(batch_size=cfg.batch_size, num_classes=trial.num_classes, one_hot=cfg.loss == "l1", workers=cfg.workers)
    train_ds = cached_dataset([train], order, shuffle=True, pad_to_multiple=trial.replicas, **kw)
    stats_ds = cached_dataset([train], order, shuffle=False, rows=stats_rows(train.rows, cfg.seed), **kw)
    data = StageData(model=model, train=train_ds, sources=[train_ds], refresh_bn=_bn_refresher(trial, model, stats_ds))
    if "val" in reqs:
        data.validate = _validator(model, cached_dataset([caches[reqs["val"]]], order, shuffle=False,
                                                         pad_to_multiple=trial.replicas, **kw))
    data.record = {"pixels": {"decoded": "once", "folders": sorted(c.folder.name for c in caches.values()),
                              "bytes": sum(c.nbytes for c in caches.values()),
                              "seconds": round(sum(float(c.meta.get("seconds", 0.0)) for c in caches.values()), 3)}}
    return data


def _image_data(trial: Trial, stage: Stage, cut, why: str) -> StageData:
    from ..models.split import training_model

    cfg = trial.cfg
    model = training_model(trial.model, cut)
    data = None if cut.has_backbone else _pixel_data(trial, model)
    if data is None:
        train_src = _source(trial.data_root, trial.train, cfg, trial.spec, train=True, replicas=trial.replicas,
                            recipe=trial.recipe)
        train_ds = _dataset(train_src, cfg, trial.num_classes)
        data = StageData(model=model, train=train_ds, sources=[train_ds],
                         refresh_bn=_bn_refresher(trial, model, _plain_train_dataset(trial)))
        if trial.val:
            val_src = _source(trial.data_root, trial.val, cfg, trial.spec, train=False, replicas=trial.replicas,
                              recipe=trial.recipe)
            val_ds = _dataset(val_src, cfg, trial.num_classes)
            data.sources.append(val_ds)
            data.validate = _validator(model, val_ds)
    data.record = {"mode": "uncached" if cut.has_backbone else "none", "reason": why, "cut": cut.label,
                   "frozen_layers": cut.depth, "prefix_seconds": 0.0, **data.record}
    return data


def _stage_data(trial: Trial, stage: Stage) -> StageData:
    """The stage's training model and data: cached frozen prefix when it can, images otherwise (the log says which)."""
    from ..models.split import find_cut

    cfg = trial.cfg
    cut = find_cut(trial.model, trial.info)
    trial.train_rows = None  # until a cache of the training images is read (below)
    if not cut.has_backbone:
        return _image_data(trial, stage, cut, "every backbone layer trains")
    if trial.builder is None:
        why = "the cache is off"
    elif cfg.augment and not cfg.augment_views:
        why = ("augmentation changes the frozen layers' input every epoch (cache augmented views with "
               "augment_views K to train cached)")
    else:
        caches = _prepare_caches(trial, stage, cut)
        data = _cached_data(trial, stage, cut, caches)
        trial.say(f"training the last layers from {cut.label} on the cached frozen part "
                  f"({data.record['frozen_layers']} layers" +
                  (f", {data.record['views']} augmented views" if data.record["views"] else "") + ")")
        return data
    trial.say(f"training uncached: {why}")
    return _image_data(trial, stage, cut, why)


# -- the trial ---------------------------------------------------------------------------

def run_trial(
    run_dir: str | os.PathLike,
    cfg: TrainConfig,
    spec: TrialSpec,
    *,
    data_root: str | os.PathLike,
    class_names: Sequence[str],
    train: Sequence,
    val: Sequence,
    test: Sequence,
    progress: ProgressLike = None,
    siblings: Sequence[float] = (),
) -> dict:
    """Train (or resume, or skip) one trial and return its metrics.

    With ``cfg.strategy == "mirrored"`` the model is built, loaded, compiled and trained
    inside a ``tf.distribute.MirroredStrategy`` scope (one replica per device; see
    :func:`transfer.trainer.strategy.make_strategy`); the final evaluation runs outside it,
    on one device, so the metrics are exact. The run folder it writes is the same.

    Args:
        run_dir: the run folder.
        cfg: the resolved configuration.
        spec: the trial (backbone, init, fraction, image size, ...).
        data_root: the dataset folder the samples are relative to.
        class_names: class names (index = label).
        train, val, test: lists of ``transfer.data.folder.Sample``.
        progress: receives one line per epoch (a :class:`~transfer.progress.Progress`,
            a line callable, or None for silence).
        siblings: trainable fractions of the sweep's other trials of this backbone, initial
            weights and fold: their frozen-prefix caches are built in the same pass.

    Returns:
        The content of ``metrics.json``.

    Raises:
        TransferError: bad backbone / weights / size (from the model builder), not enough
            disk for the cache.

    Example::

        metrics = run_trial("runs/d", cfg, spec, data_root="data/d", class_names=names,
                            train=tr, val=va, test=te)
    """
    p = as_progress(progress)
    writer = RunWriter(run_dir)
    paths = writer.trial_paths(spec.name)
    if paths.finished():
        return read_json(paths.metrics_json)
    recipe = writer.saved_dataset().get("preprocessing")  # what the run's first trials decoded with
    trial = Trial(writer, cfg, spec, Path(data_root), list(class_names), list(train), list(val), p, 1,
                  tuple(float(f) for f in siblings), recipe=recipe)
    if cfg.strategy == "default":
        trained = _train_trial(trial)
    else:
        from .strategy import make_strategy

        strategy = make_strategy(cfg.strategy)
        p.say(f"  [{spec.name}] {cfg.strategy} strategy: {strategy.num_replicas_in_sync} replica(s) on "
              f"{', '.join(strategy.extended.worker_devices)}")
        trial.replicas = int(strategy.num_replicas_in_sync)
        with strategy.scope():
            trained = _train_trial(trial)
    return _evaluate_trial(writer, cfg, spec, trained, data_root=Path(data_root), num_classes=len(class_names),
                           splits=(("train", train), ("val", val), ("test", test)), recipe=recipe)


def _trial_meta(trial: Trial) -> dict:
    spec, info = trial.spec, trial.info
    return {"name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
            "init": spec.init, "weights": spec.weights, "trainable": spec.trainable,
            "freeze_by": spec.freeze_by, "image_size": list(spec.image_size),
            "gradcam_layer": info.gradcam_layer, "feature_dim": int(info.feature_dim),
            "num_classes": trial.num_classes, "preprocess": info.preprocess,
            "lp_ft": _uses_lp_ft(trial), "cache": trial.cfg.cache,
            "augment_views": trial.cfg.augment_views if trial.cfg.augment else 0}


def _uses_lp_ft(trial: Trial) -> bool:
    """Linear probe, then fine-tune: pretrained starts with something to fine-tune."""
    return bool(trial.cfg.lp_ft and trial.spec.init == "pretrained" and trial.spec.trainable > 0)


def _resume(trial: Trial, state) -> list[dict]:
    """Load the resume checkpoint into the trial (model, random-generator states); the history up to it."""
    from .epochs import load_weights, restore_rng

    paths = trial.files.paths
    if state.epoch == 0:
        return []
    if not load_weights(trial.model, paths.weights_at(state.epoch)):
        trial.say(f"note: the checkpoint of epoch {state.epoch} ({paths.weights_at(state.epoch).name}) is missing or "
                  "not this model's; the trial starts again from its first epoch")
        return []
    trial.say(f"resuming after epoch {state.epoch}")
    restore_rng(trial.model, state.rng)
    return [r for r in paths.history() if r["epoch"] <= state.epoch]


def _stage_bounds(stages: list[Stage]) -> list[int]:
    """The epoch each stage ends at (epochs count across stages)."""
    out, total = [], 0
    for s in stages:
        total += s.epochs
        out.append(total)
    return out


def _next_stage(state, bounds: list[int]) -> int:
    """Index of the stage a (resumed) trial continues with (``len(bounds)``: none left)."""
    i = sum(1 for b in bounds if state.epoch >= b)
    if state.stopped and i < len(bounds):  # early stopping ended stage i
        if i == len(bounds) - 1:
            return len(bounds)
        state.epoch = bounds[i]
        i += 1
    return i


def _lp_ft_head(trial: Trial, stage: Stage) -> None:
    """Start the head from the converged linear probe (before the first epoch of a fresh trial)."""
    from ..models.freeze import apply_freeze

    probe, reused = _linear_probe(trial, stage)
    _set_head(trial.model, probe)
    trial.record["head"] = {"init": "linear probe", **probe.record()}
    trial.say(f"head starts from the linear probe{' (reused)' if reused else ''} (val acc "
              f"{probe.val_accuracy if probe.val_accuracy is not None else probe.train_accuracy:.4f})")
    apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by, train_bn=stage.train_bn)


def _run_stage(trial: Trial, stage: Stage, si: int, bounds: list[int], state, history: list) -> dict:
    """Train one stage (from where a resumed trial left it); returns its freeze summary."""
    keras = import_keras()
    from ..models.freeze import apply_freeze
    from . import loop
    from .epochs import EpochHooks, EpochRecorder, restore_optimizer

    summary = apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    resumed_stage = state.stage == stage.name
    state.stage = stage.name
    start = max(state.epoch, bounds[si] - stage.epochs)
    if stage.probe:
        if start < bounds[si]:
            _probe_stage(trial, stage, state, history, bounds[si])
        return asdict(summary)
    if _uses_lp_ft(trial) and state.epoch == 0:
        _lp_ft_head(trial, stage)
    data = _stage_data(trial, stage)
    trial.record["cache"] = data.record
    _compile(data.model, trial.cfg, stage.lr)  # recompile after every change of `trainable`
    saved_optimizer = trial.files.paths.optimizer_at(state.epoch)
    if resumed_stage and start > bounds[si] - stage.epochs and saved_optimizer.is_file():
        if not restore_optimizer(data.model.optimizer, data.model.trainable_variables, saved_optimizer):
            trial.say("note: the saved optimizer state does not fit; the optimizer starts afresh")
    if si > 0 and not resumed_stage:
        state.wait, state.stopped = 0, False
    hooks = EpochHooks(sources=data.sources, refresh_bn=data.refresh_bn, validate=data.validate)
    callbacks = [EpochRecorder(trial.files, trial.model, state, history, stage_end=bounds[si], total=bounds[-1],
                               patience=trial.cfg.patience, hooks=hooks, say=trial.progress.say)]
    if trial.cfg.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(trial.files.paths.tensorboard)))
    if start < bounds[si]:
        loop.fit(data.model, data.train, initial_epoch=start, epochs=bounds[si], callbacks=callbacks)
    if data.refresh_bn is None:
        trial.record.setdefault("batchnorm", {"statistics": "stored (no BatchNormalization layer trains)"})
    return asdict(summary)


def _train_trial(trial: Trial) -> TrainedTrial:
    """Train every stage of a trial (resuming after the last committed epoch)."""
    from ..models.freeze import count_params
    from .epochs import TrialFiles, TrialState

    spec = trial.spec
    trial.files = TrialFiles(trial.writer, spec.name, trial.data_root)
    trial.files.paths.dir.mkdir(parents=True, exist_ok=True)
    trial.writer.remove_leftovers(spec.name)
    trial.model, trial.info = build_trial_model(trial.writer.path, trial.cfg, spec, trial.num_classes)
    trial.builder = _cache_builder(trial)  # hashes the initial weights, before a checkpoint is loaded
    trial.writer.write_trial_meta(spec.name, _trial_meta(trial))
    stages = plan_stages(trial.cfg, spec)
    bounds = _stage_bounds(stages)
    state = TrialState.load(trial.files.paths.state_json) or TrialState()
    history = _resume(trial, state)
    if not history:
        state = TrialState()
    trial.files.status("running", state.epoch)
    trial.record["head"] = {"init": "resumed" if history else "random"}
    freeze = None
    for si in range(_next_stage(state, bounds), len(stages)):
        freeze = _run_stage(trial, stages[si], si, bounds, state, history)
        if state.stopped and si == len(stages) - 1:
            break
        state.stopped = False
    trial.files.write_model(trial.model, state)  # the best epoch's weights (the last ones if none improved)
    return TrainedTrial(history=history, best_epoch=int(state.best_epoch), last_epoch=int(state.epoch),
                        params=count_params(trial.model), freeze=freeze, record=trial.record,
                        probe_only=all(s.probe for s in stages), train_rows=trial.train_rows)


def _pooled_outputs(forward, data_root: Path, samples, cfg: TrainConfig, spec: TrialSpec, files,
                    recipe: dict | None = None):
    """(pooled features, labels, paths) of ``samples`` through the saved model (``forward``:
    images -> pooled features), the images decoded as for training while the model runs on
    the batch before; an unreadable file is left out and listed."""
    from ..data.batches import read_ahead

    src = _source(data_root, samples, cfg, spec, train=False, recipe=recipe)
    feats, labels, paths = [], [], []
    workers = max(1, int(cfg.workers))
    for b in read_ahead(src.get, len(src), workers=workers, ahead=workers + 1):
        feats.append(np.asarray(forward(b.x)[0], dtype=np.float32))
        labels.append(b.y)
        paths += list(b.paths)
    files.bad_files(src.failed)
    return np.concatenate(feats), np.concatenate(labels), paths


def _cached_outputs(best, cut, cache, samples, batch_size: int):
    """(pooled features, labels, paths) of the training images from the cache of their frozen
    part (computed once, before training; the frozen layers of ``best`` are those weights),
    through the rest of the saved model."""
    from ..models.split import features_model, inference_function

    rows = np.arange(cache.rows)
    if cut.frontier == ("features",):
        feats = cache.read(rows)[0]
    else:
        forward = inference_function(features_model(best, cut))
        feats = np.concatenate([np.asarray(forward(*cache.read(rows[i:i + batch_size]))[0], dtype=np.float32)
                                for i in range(0, len(rows), batch_size)])
    return feats, np.asarray(cache.labels[:], dtype=np.int64), [s.path for s in samples]


def _head_numbers(feats: np.ndarray, labels: np.ndarray, kernel, bias, loss: str) -> dict:
    """Accuracy and loss of the softmax head ``(kernel, bias)`` on pooled features, as Keras computes them."""
    from .probe import head_numbers

    value, accuracy = head_numbers(feats, labels, kernel, bias, loss)
    return {"accuracy": accuracy, "loss": value}


def _refit_head(best, outputs: dict, cfg: TrainConfig, files) -> dict:
    """Fit the softmax head to convergence on the trained model's own pooled features and keep it
    when its validation loss is lower than the trained head's (the saved model is then rewritten).

    A fine-tuned backbone's head ends where the last epoch left it; a logistic regression on
    the same features can do better. Without validation images the trained head is kept.
    """
    from .probe import fit_probe

    kernel, bias = best.get_layer("probs").get_weights()
    record: dict = {"trained": _head_numbers(*outputs["val"][:2], kernel, bias, cfg.loss) if "val" in outputs else None}
    if "val" not in outputs or "train" not in outputs:
        record["refit"] = {"chosen": False, "why": "no validation images to choose by"}
        return record
    probe = fit_probe(*outputs["train"][:2], *outputs["val"][:2], num_classes=len(bias), loss=cfg.loss)
    refit = _head_numbers(*outputs["val"][:2], probe.kernel, probe.bias, cfg.loss)
    chosen = refit["loss"] < record["trained"]["loss"]
    record["refit"] = {"chosen": bool(chosen), "val": refit, **probe.record()}
    if chosen:
        best.get_layer("probs").set_weights([probe.kernel, probe.bias])
        files.save_model(best, files.paths.model_keras)
    return record


def _evaluate_trial(writer: RunWriter, cfg: TrainConfig, spec: TrialSpec, trained: TrainedTrial, *,
                    data_root: Path, num_classes: int, splits, recipe: dict | None = None) -> dict:
    """Evaluate the saved best model on the images of every split (as a user runs it) and write
    ``metrics.json`` / ``status.json``.

    When test images have a duplicate in train or val (``duplicates.csv`` of the run, made
    without ``--dedupe``), ``test_without_duplicates`` is the accuracy on the other test
    images: what a split that keeps duplicates on one side would have measured.

    The model runs once per image (pooled features and its softmax head); a trial whose
    training moved the features first gets its head refitted on them when that validates
    better (:func:`_refit_head`), so no trial's head is undertrained for its own features.
    """
    from ..data.image import recipe_version
    from ..models.build import load_model
    from ..models.split import features_model, inference_function, pixel_cut
    from .epochs import TrialFiles

    t0 = time.perf_counter()
    files = TrialFiles(writer, spec.name, data_root)
    best = load_model(files.paths.model_keras)
    forward = None  # the saved model from images to pooled features, traced on first use
    outputs, computed_from = {}, {}
    for split, samples in splits:
        if not len(samples):
            continue
        if split == "train" and trained.train_rows is not None:
            cut, cache = trained.train_rows
            outputs[split] = _cached_outputs(best, cut, cache, samples, cfg.batch_size)
            computed_from[split] = (f"the decoded pixels {cache.folder.name}, through the saved model"
                                    if cut.label == "pixels" else f"the cache {cache.folder.name} "
                                    f"({cache.dtype.name}), through the saved model's trained layers")
            continue
        if forward is None:
            forward = inference_function(features_model(best, pixel_cut(spec.image_size)))
        outputs[split] = _pooled_outputs(forward, data_root, samples, cfg, spec, files, recipe)
        computed_from[split] = "the images, through the saved model"
    record = dict(trained.record)
    head = dict(record.get("head") or {})
    if not trained.probe_only:
        head.update(_refit_head(best, outputs, cfg, files))
    kernel, bias = best.get_layer("probs").get_weights()
    metrics: dict = {split: (_head_numbers(*outputs[split][:2], kernel, bias, cfg.loss) if split in outputs
                             else {"accuracy": None, "loss": None}) for split, _ in splits}
    leaked = writer.leaked_paths("test")
    if leaked and "test" in outputs:
        feats, labels, paths = outputs["test"]
        keep = np.array([p not in leaked for p in paths], dtype=bool)
        metrics["test_without_duplicates"] = {
            **(_head_numbers(feats[keep], labels[keep], kernel, bias, cfg.loss) if keep.any()
               else {"accuracy": None, "loss": None}),
            "images": int(keep.sum()), "left_out": int((~keep).sum())}
    p_tr, p_nt = trained.params
    secs = [r["seconds"] for r in trained.history if r.get("seconds") is not None]
    cache = record.get("cache") or {"mode": "none", "prefix_seconds": 0.0}
    metrics.update({
        "params": {"trainable": p_tr, "non_trainable": p_nt, "total": p_tr + p_nt},
        "seconds_per_epoch": (sum(secs) / len(secs)) if secs else None,
        "epochs_run": len(trained.history),
        "best_epoch": trained.best_epoch,
        "freeze": trained.freeze,
        "cache": cache,
        "batchnorm": record.get("batchnorm", {"statistics": "stored (no BatchNormalization layer trains)"}),
        "head": head,
        "features_from": computed_from,  # where each split's pooled features were computed
        "recipe": recipe_version(recipe),  # the pixel recipe the images were decoded with
        "cost": {"prefix_seconds": float(cache.get("prefix_seconds") or 0.0), "train_seconds": round(sum(secs), 3),
                 "evaluate_seconds": round(time.perf_counter() - t0, 3)},
    })
    if trained.history:
        from ..plots import plot_curves

        plot_curves(trained.history, files.paths.curves_png, title=spec.name)
    writer.write_metrics(spec.name, metrics)
    writer.write_status(spec.name, "done", trained.last_epoch)
    writer.remove_resume_checkpoint(spec.name)
    return metrics


def mark_failed(run_dir: str | os.PathLike, name: str, error: str) -> None:
    """Record a failed trial in its ``status.json``."""
    RunWriter(run_dir).mark_failed(name, error)


__all__ = ["TrialSpec", "Stage", "trial_name", "plan_stages", "run_trial", "is_finished", "read_history",
           "mark_failed", "build_trial_model"]
