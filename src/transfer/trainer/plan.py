"""What a sweep and its trials will do, decided before anything is built: the trials of a
configuration (:func:`plan_trials`), a trial's stages, where each stage's epochs start and
end, and where a stage's data comes from.

Pure functions of the configuration and the trial's spec (no TensorFlow, no files): the
trial (:mod:`transfer.trainer.trial`), a stage's data (:mod:`transfer.trainer.stage_data`)
and the order of work (:mod:`transfer.trainer.fit`) follow these decisions.

Epochs count across the stages of a trial: a trial of two stages of 2 and 5 epochs has
stage bounds ``[2, 7]``; its resume state says how many epochs are done, and
:func:`resume_point` / :func:`stage_epochs` say where training continues. Training a
trial up to some epoch and continuing it later is the same resume: the checkpoint of the
last finished epoch is the commit point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..models.registry import get_backbone
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
class TrialData:
    """The images of one trial: ``transfer.data.folder.Sample`` lists relative to ``root``.

    Attributes:
        root: the dataset folder the samples' paths are relative to.
        class_names: class names (index = label).
        train, val, test: the trial's splits (its fold's train / val with ``--kfold``).
    """

    root: Path
    class_names: tuple[str, ...]
    train: tuple = ()
    val: tuple = ()
    test: tuple = ()

    @classmethod
    def of(cls, root, class_names: Sequence[str], train: Sequence = (), val: Sequence = (),
           test: Sequence = ()) -> "TrialData":
        """The images from any sequences (lists from a split, tuples)."""
        return cls(Path(root), tuple(class_names), tuple(train), tuple(val), tuple(test))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> tuple[tuple[str, tuple], ...]:
        """``(split name, samples)`` of train, val and test, in that order."""
        return (("train", self.train), ("val", self.val), ("test", self.test))


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


def trial_name(backbone: str, trainable: float | None, *, random_init: bool = False, fold: int | None = None) -> str:
    """Trial name of docs/design.md: ``mobilenet_v2-t030``, ``arc2-random``, ``...-f2``.

    Example::

        trial_name("mobilenet_v2", 0.3)              # 'mobilenet_v2-t030'
        trial_name("arc2", 1.0, random_init=True)    # 'arc2-random'
    """
    base = f"{backbone}-random" if random_init else f"{backbone}-t{int(round(float(trainable) * 100)):03d}"
    return f"{base}-f{fold}" if fold else base


def pooled_features(backbone: str) -> bool:
    """True when the backbone's ``features`` are a weightless pooling (the head is one softmax layer on them)."""
    return get_backbone(backbone).pooling == "avg"


def uses_lp_ft(cfg: TrainConfig, spec: TrialSpec) -> bool:
    """Linear probe, then fine-tune: pretrained starts with something to fine-tune."""
    return bool(cfg.lp_ft and spec.init == "pretrained" and spec.trainable > 0)


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
    probe = pooled_features(spec.backbone)

    def head(name: str, epochs: int) -> Stage:
        return Stage(name, 1, 0.0, lr, train_bn, probe=True) if probe else Stage(name, epochs, 0.0, lr, train_bn)

    if spec.trainable == 0:
        return [head("main", cfg.epochs)]
    if cfg.two_stage and cfg.head_epochs > 0:
        return [head("head", cfg.head_epochs),
                Stage("finetune", cfg.epochs, spec.trainable, cfg.fine_tune_lr_for(lr), train_bn)]
    return [Stage("main", cfg.epochs, spec.trainable, lr, train_bn)]


# -- the trials of a sweep ------------------------------------------------------------------

def resolve_image_size(cfg: TrainConfig, backbone: str) -> tuple[int, int]:
    """Input size of a backbone: ``cfg.image_size`` or the backbone default (never below its minimum)."""
    spec = get_backbone(backbone)
    min_size = int(getattr(spec, "min_size", 1) or 1)
    if cfg.image_size is None:
        s = max(int(spec.default_size), min_size)
        return (s, s)
    if cfg.image_size < min_size:
        raise ConfigError(
            f"image size {cfg.image_size} is below the minimum input size of {backbone} ({min_size})",
            hint=f"use an image size of {min_size} or more for {backbone}, or leave it unset for its default "
                 f"({spec.default_size})",
            option="image_size",
        )
    return (int(cfg.image_size), int(cfg.image_size))


def duplicate_random_trials(cfg: TrainConfig, specs: list[TrialSpec] | None = None) -> list[str]:
    """Backbones whose random-init trial :func:`plan_trials` skipped: they start from random
    weights already (weights "none", or no published weights) and the trainable fractions
    include 1.0, so that trial *is* the random-init one."""
    if not cfg.random_init:
        return []
    have = {s.backbone for s in (plan_trials(cfg) if specs is None else specs) if s.init == "random"}
    return [bb for bb in cfg.backbones if bb not in have]


def _variants(cfg: TrainConfig, init: str) -> list[tuple[float, bool]]:
    """(trainable fraction, random init) of each trial of one backbone."""
    variants = [(float(t), False) for t in cfg.trainable]
    # a backbone that already starts from random weights: its full fine-tuning trial
    # *is* the random-init trial (same init, same training); do not train it twice
    if cfg.random_init and not (init == "scratch" and 1.0 in {t for t, _ in variants}):
        variants.append((1.0, True))
    return variants


def plan_trials(cfg: TrainConfig) -> list[TrialSpec]:
    """The trial list of a config, in run order (names of docs/design.md).

    Example::

        [t.name for t in plan_trials(cfg)]   # ['arc2-t000', 'arc2-t100', 'arc2-random']
    """
    out: list[TrialSpec] = []
    folds = list(range(1, cfg.kfold + 1)) if cfg.kfold else [None]
    for bb in cfg.backbones:
        size = resolve_image_size(cfg, bb)
        # "imagenet" means "the backbone's published weights where they exist": the
        # small CNNs (arc2, arc3) have none and start from scratch, so one command can
        # sweep e.g. mobilenet_v2,arc2
        weights = cfg.weights_for(bb)
        weights = "none" if weights == "imagenet" and not get_backbone(bb).pretrainable else weights
        init = "scratch" if weights == "none" else "pretrained"
        seen: dict[str, float] = {}
        for t, rnd in _variants(cfg, init):
            group = trial_name(bb, t, random_init=rnd)
            if group in seen:  # names round to whole percent: 0.3 and 0.304 would share a folder
                raise ConfigError(f"trainable fractions {t:g} and {seen[group]:g} of {bb} are both trial {group} "
                                  "(trial names round to whole percent)",
                                  hint="list each fraction once, at least 0.01 apart", option="trainable")
            seen[group] = t
            out += [TrialSpec(name=trial_name(bb, t, random_init=rnd, fold=k), group=group, fold=k, backbone=bb,
                              init="random" if rnd else init, weights="none" if rnd else weights,
                              trainable=t, freeze_by=cfg.freeze_by, image_size=size) for k in folds]
    return out


# -- epochs across stages -----------------------------------------------------------------

def stage_bounds(stages: Sequence[Stage]) -> list[int]:
    """The epoch each stage ends at (epochs count across stages)."""
    out, total = [], 0
    for s in stages:
        total += s.epochs
        out.append(total)
    return out


@dataclass(frozen=True)
class ResumePoint:
    """Where a (resumed) trial continues: the index of its next stage (``len(bounds)``: none
    left) and the epoch count it continues from."""

    stage: int
    epoch: int


def resume_point(epoch: int, stopped: bool, bounds: Sequence[int]) -> ResumePoint:
    """The stage a trial continues with after ``epoch`` finished epochs.

    ``stopped``: early stopping ended the stage the epoch belongs to; the trial then goes on
    with the next stage from that stage's end (or is done after its last stage).

    Example::

        resume_point(3, False, [2, 7])   # ResumePoint(stage=1, epoch=3)
        resume_point(1, True, [2, 7])    # ResumePoint(stage=1, epoch=2)
    """
    i = sum(1 for b in bounds if epoch >= b)
    if stopped and i < len(bounds):  # early stopping ended stage i
        if i == len(bounds) - 1:
            return ResumePoint(len(bounds), epoch)
        return ResumePoint(i + 1, bounds[i])
    return ResumePoint(i, epoch)


def stage_epochs(index: int, stages: Sequence[Stage], epoch: int) -> tuple[int, int]:
    """``(start, end)``: the epochs stage ``index`` trains, from ``start`` (epochs done, at
    least the stage's beginning) to ``end`` (its bound); ``start >= end`` means nothing is left."""
    end = stage_bounds(stages)[index]
    return max(epoch, end - stages[index].epochs), end


# -- where a stage's data comes from ---------------------------------------------------------

def cache_views(cfg: TrainConfig) -> int:
    """Augmented views cached per training image (0: the images as they are)."""
    return cfg.augment_views if cfg.augment else 0


def cache_fractions(siblings: Sequence[float], stage: Stage) -> list[float]:
    """The trainable fractions whose frozen-prefix caches one pass builds: the stage's and
    those of the sweep's other trials of this backbone, initial weights and fold."""
    return sorted(set(siblings) | {stage.fraction})


def probe_features_needed(cfg: TrainConfig, spec: TrialSpec, fractions: Sequence[float]) -> bool:
    """Whether the pooled features of the initial model are cached too (the linear probe is
    fitted on them): an LP-FT start among the fractions, or a head-only trial of a pooled backbone."""
    return bool((cfg.lp_ft and spec.init == "pretrained" and any(f > 0 for f in fractions))
                or (pooled_features(spec.backbone) and 0.0 in fractions))


def train_cache_dtype(spec: TrialSpec, *, pooled: bool) -> str:
    """The dtype of the training images' cached rows: float16 for pretrained weights; pooled
    features, and every cache of random initial weights (whose stored 0 / 1 BatchNormalization
    statistics can leave activations below float16's range), are float32."""
    return "float16" if (spec.init == "pretrained" and not pooled) else "float32"


@dataclass(frozen=True)
class DataSource:
    """Where a stage's training batches come from.

    ``kind``: ``cached`` (the frozen prefix's cached outputs), ``pixels`` (the decoded pixels
    of a stage with no frozen part, cached when possible) or ``images`` (decoded every
    epoch); ``why``: why the stage does not train on a frozen-prefix cache (empty when it does).
    """

    kind: str
    why: str = ""


def data_source(cfg: TrainConfig, *, has_backbone: bool) -> DataSource:
    """The data source of a stage whose frozen part holds backbone layers (``has_backbone``) or none."""
    if not has_backbone:
        kind = "pixels" if cfg.cache and not cfg.augment else "images"
        return DataSource(kind, "every backbone layer trains")
    if not cfg.cache:
        return DataSource("images", "the cache is off")
    if cfg.augment and not cfg.augment_views:
        return DataSource("images", "augmentation changes the frozen layers' input every epoch (cache augmented "
                                    "views with augment_views K to train cached)")
    return DataSource("cached")


__all__ = ["TrialSpec", "TrialData", "Stage", "trial_name", "plan_trials", "resolve_image_size",
           "duplicate_random_trials", "plan_stages", "stage_bounds", "resume_point",
           "stage_epochs", "ResumePoint", "DataSource", "data_source"]
