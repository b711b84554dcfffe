"""The training configuration: one frozen dataclass, YAML in, flags override.

``TrainConfig`` holds every option of ``transfer train``. ``load_config`` reads an
optional YAML file and applies the options the user actually gave on the command line
on top of it; the resolved config is saved as ``RUN/config.yaml``.

Learning-rate default: ``lr`` is used as given for every trial. When ``lr`` is left
unset (``None``) it resolves per trial: ``1e-3`` for trials that train from scratch or
only train the head (trainable 0), ``1e-4`` for trials that fine-tune pretrained
weights (trainable > 0 with ``weights`` imagenet or a file) -- the low fine-tuning rate
the Keras transfer-learning guide recommends. ``fine_tune_lr`` (two-stage only)
defaults to the head rate / 10.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..data.batches import AUGMENTATIONS
from ..errors import ConfigError
from ..options import Check, Flag, Interval, ListOf, OneOf, Text, make, option, validate

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("crossentropy", "l1")
FREEZE_BY = ("layers", "params", "blocks")
SPLIT_METHODS = ("stratified", "random")
STRATEGIES = ("default", "mirrored")  # mirrored: tf.distribute.MirroredStrategy over this machine's devices
SCHEDULES = ("full", "halving")
_PATH = Check(lambda v: isinstance(v, str), "a folder path", read=os.fspath)


def _weights_text(value: Any) -> Any:
    """A ``--config`` mapping ``{backbone: weights}`` as the flag's text ``backbone=weights,...``."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return os.fspath(value) if hasattr(value, "__fspath__") else value


def weights_by_backbone(text: str) -> dict[str, str] | None:
    """``{backbone: weights}`` of a ``backbone=weights,...`` value; None for one value for every backbone.

    A value that is an existing file is a path even when it holds ``=`` or a comma.

    Example::

        weights_by_backbone("mobilenet_v2=runs/pre/model.keras,arc2=none")
        # {'mobilenet_v2': 'runs/pre/model.keras', 'arc2': 'none'}
    """
    if "=" not in text or Path(text).is_file():
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip() or name.strip() in out:
            return {}
        out[name.strip()] = value.strip()
    return out


_WEIGHTS = Check(lambda v: isinstance(v, str) and bool(v.strip()) and weights_by_backbone(v) != {},
                 "imagenet, none, a weights file, or backbone=imagenet|none|PATH pairs separated by commas "
                 "(backbones not named start from imagenet)", read=_weights_text)

# keys whose change alters the results of an existing run (resume must refuse)
RESULT_KEYS = (
    "data", "backbones", "trainable", "random_init", "freeze_by", "weights", "epochs",
    "batch_size", "image_size", "optimizer", "lr", "fine_tune_lr", "loss", "dropout",
    "augment", "seed", "split", "val", "test", "kfold", "patience", "two_stage",
    "head_epochs", "train_bn", "lp_ft", "augment_views", "dedupe", "allow_nested", "allow_case_clash",
    "schedule", "halving_rate", "first_rung",
)
#: keys a prepared run folder depends on before any trial has trained (its split, its initial weights):
#: a folder prepared by ``transfer rank`` (or a sweep killed before its first trial) may be trained with
#: other epochs or fractions, not with another split or other initial weights
PREPARED_KEYS = ("data", "weights", "seed", "split", "val", "test", "kfold", "dedupe", "allow_nested",
                 "allow_case_clash")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training sweep, declared once (:mod:`transfer.options`): each field's
    constraint, help and flag; ``transfer train``'s flags, ``--config`` YAML keys and the saved
    ``config.yaml`` are these fields.

    Example::

        cfg = TrainConfig(data="data/digits", out="runs/d", backbones=("arc2",))
        cfg.epochs   # 10
    """

    data: str = option("", _PATH, "The image folder (the DATA argument).", cli=False)
    out: str = option("", _PATH, "Run folder (re-run the same command to resume).", metavar="RUN")
    backbones: tuple[str, ...] = option(("mobilenet_v2",), ListOf(Text("a backbone name")),
                                        "Backbone name(s), comma-separated (see `transfer backbones`).",
                                        flag="--backbone", metavar="A,B")
    trainable: tuple[float, ...] = option((0.0,), ListOf(Interval(float, 0, 1), min_items=0),
                                          "Trainable fraction(s) of the backbone: 0 = frozen feature extractor, "
                                          "1 = full fine-tuning.", metavar="F,..")
    random_init: bool = option(False, Flag(), "Also train each backbone from random weights (everything trainable).")
    freeze_by: str = option("layers", OneOf(*FREEZE_BY), "What the fraction counts.")
    weights: str = option("imagenet", _WEIGHTS,
                          "Initial weights: ImageNet, none (random), or a Keras weights/model file; per backbone "
                          "as backbone=VALUE pairs (mobilenet_v2=runs/pre/model.keras; backbones not named start "
                          "from ImageNet, or from random weights where they have none).",
                          metavar="imagenet|none|PATH|B=W,..")
    epochs: int = option(10, Interval(int, 1), "Epochs per trial (fine-tuning epochs with --two-stage).")
    batch_size: int = option(32, Interval(int, 1), "Images per training step.")
    image_size: int | None = option(None, Interval(int, 1), "Input size in pixels. [default: each backbone's "
                                    "own size]", none=True)
    optimizer: str = option("adam", OneOf(*OPTIMIZERS), "Optimizer.")
    lr: float | None = option(None, Interval(float, 0, closed="neither"), "Learning rate. [default: 1e-3; 1e-4 "
                              "when fine-tuning pretrained weights]", none=True)
    fine_tune_lr: float | None = option(None, Interval(float, 0, closed="neither"),
                                        "Learning rate of the unfreeze stage of --two-stage. [default: lr/10]",
                                        none=True)
    loss: str = option("crossentropy", OneOf(*LOSSES), "Loss.")
    dropout: float = option(0.2, Interval(float, 0, 1, closed="left"), "Dropout before the classifier.")
    augment: tuple[str, ...] = option((), ListOf(OneOf(*AUGMENTATIONS), min_items=0),
                                      "Augmentations in the input pipeline, e.g. flip,translate.", metavar="A,B")
    seed: int = option(0, Interval(int), "Seed of splits, initial weights and training.")
    split: str = option("stratified", OneOf(*SPLIT_METHODS), "How val and test are drawn.")
    val: float = option(0.2, Interval(float, 0, 1, closed="left"), "Validation fraction.")
    test: float = option(0.1, Interval(float, 0, 1, closed="left"), "Test fraction.")
    kfold: int | None = option(None, Interval(int, 2), "Run every trial K times on K folds; the table shows "
                               "mean ± std.", none=True)
    patience: int = option(3, Interval(int, 0), "Early stopping on val_loss after this many epochs without "
                           "improvement (0 = off).")
    two_stage: bool = option(False, Flag(), "Train the head first, then unfreeze to the fraction with a lower "
                             "learning rate.")
    head_epochs: int = option(2, Interval(int, 0), "Head-only epochs of --two-stage.")
    tensorboard: bool = option(False, Flag(), "Write TensorBoard logs into each trial folder.")
    workers: int = option(2, Interval(int, 1), "Image decode threads.")
    train_bn: bool = option(False, Flag(), "Let BatchNormalization layers of the trainable part update their "
                            "statistics.")
    strategy: str = option("default", OneOf(*STRATEGIES), "mirrored: each trial over all GPUs of the machine "
                           "(tf.distribute.MirroredStrategy; --batch-size stays global).")
    cache: bool = option(True, Flag(), "Run the frozen layers on every image in every epoch instead of caching "
                         "their output once.", negative="--no-cache")
    lp_ft: bool = option(True, Flag(), "Start fine-tuning trials from a random head instead of the linear probe "
                         "of the frozen backbone.", negative="--no-lp-ft")
    augment_views: int = option(0, Interval(int, 0), "With --augment: cache this many augmented views of each "
                                "training image (0: train uncached).")
    dedupe: bool = option(False, Flag(), "Keep every group of duplicate images (same pixels, or resized / "
                          "re-compressed / slightly cropped copies) on one side of train / val / test; a given "
                          "split's val/test copies of train images are left out. Without it, duplicates across "
                          "the split are listed in RUN/duplicates.csv and warned about.")
    allow_nested: bool = option(False, Flag(), "Accept images in sub-folders of a class folder as that class "
                                "(refused by default).")
    allow_case_clash: bool = option(False, Flag(), "Accept class folders whose names differ only in case (Cat/ "
                                    "and cat/) as two classes.")
    schedule: str = option("full", OneOf(*SCHEDULES), "full: every trial trains every epoch. halving: successive "
                           "halving: every trial trains the first rung, the best 1/--halving-rate by validation "
                           "accuracy go on to the next rung, and so on until the last rung ends at --epochs; a "
                           "stopped trial is evaluated at the epoch it stopped, and the best trial is chosen among "
                           "the trials trained to the full budget (rung decisions: RUN/rungs.json).")
    halving_rate: int = option(3, Interval(int, 2), "With --schedule halving: the best 1/N of the trials still "
                               "training at a rung (rounded up) go on to the next one.", metavar="N")
    first_rung: int = option(1, Interval(int, 1), "With --schedule halving: epochs of the first rung; each next "
                             "rung is --halving-rate times longer, the last ends at --epochs.", metavar="EPOCHS")

    def __post_init__(self) -> None:
        validate(self)
        if not self.trainable and not self.random_init:
            raise ConfigError("no trial to run: no trainable fraction given and no random-init trial asked for",
                              option="trainable")
        if self.val + self.test >= 1.0:
            raise ConfigError(f"val + test = {self.val + self.test:g} leaves no training data; keep it below 1",
                              option="val")
        named = weights_by_backbone(self.weights) or {}
        unknown = [b for b in named if b not in self.backbones]
        if unknown:
            raise ConfigError(f"initial weights named for {', '.join(unknown)}, which the sweep does not train "
                              f"(backbones: {', '.join(self.backbones)})",
                              hint="name only backbones given with --backbone", option="weights")

    # -- derived -------------------------------------------------------------
    def lr_for(self, trainable: float, pretrained: bool) -> float:
        """Learning rate of a trial (see module docstring for the default rule)."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-4 if (pretrained and trainable > 0 and not self.two_stage) else 1e-3

    def fine_tune_lr_for(self, head_lr: float) -> float:
        return float(self.fine_tune_lr) if self.fine_tune_lr is not None else head_lr / 10.0

    def weights_for(self, backbone: str) -> str:
        """The initial weights asked for ``backbone``: ``imagenet``, ``none`` or a PATH."""
        named = weights_by_backbone(self.weights)
        return self.weights if named is None else named.get(backbone, "imagenet")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def result_diff(self, other: "TrainConfig | dict", keys: tuple[str, ...] = RESULT_KEYS) -> list[str]:
        """Keys in ``keys`` (:data:`RESULT_KEYS` by default) whose value differs from ``other``."""
        o = other.to_dict() if isinstance(other, TrainConfig) else dict(other)
        mine = self.to_dict()
        out = []
        for k in keys:
            if k in ("val", "split") and mine.get("kfold") and o.get("kfold"):
                continue  # k folds make their own val splits: these options were not used
            a, b = mine.get(k), o.get(k)
            if k == "data":
                a = os.path.abspath(str(a)) if a else a
                b = os.path.abspath(str(b)) if b else b
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                a, b = list(a), list(b)
            if a != b:
                out.append(k)
        return out


ACCEPTED_KEYS = tuple(f.name for f in fields(TrainConfig))
#: other spellings of keys in a --config file
_ALIASES = {"backbone": "backbones", "fractions": "trainable"}


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping (YAML, a saved config), refusing unknown keys.

    Raises:
        ConfigError: an unknown key (the accepted ones are listed) or an invalid value.
    """
    return make(TrainConfig, values, aliases=_ALIASES)


def load_config(yaml_path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read ``yaml_path`` (optional) and apply ``overrides`` (flags the user gave) on top.

    Args:
        yaml_path: a YAML mapping of TrainConfig keys, or None.
        overrides: values that win over the YAML (only the flags given explicitly).

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        ConfigError: unreadable YAML, unknown keys (the accepted ones are listed) or
            invalid values.

    Example::

        load_config("sweep.yaml", {"data": "d", "out": "r", "backbones": "arc2", "epochs": 2}).epochs   # 2
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        import yaml

        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse YAML config {p}: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of option: value, got {type(loaded).__name__}")
        values.update(loaded)
    for k, v in values.copy().items():  # a YAML key spelled another way gives way to the flag
        if isinstance(k, str) and _ALIASES.get(k, k).replace("-", "_") != k:
            values[_ALIASES.get(k, k).replace("-", "_")] = values.pop(k)
    for k, v in (overrides or {}).items():
        values[_ALIASES.get(k, k).replace("-", "_")] = v
    return make_config(values)


def config_from_yaml_text(text: str) -> TrainConfig:
    """Parse a saved ``config.yaml`` back into a TrainConfig."""
    import yaml

    return make_config(yaml.safe_load(text) or {})
