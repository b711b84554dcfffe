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

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("crossentropy", "l1")
FREEZE_BY = ("layers", "params", "blocks")
SPLIT_METHODS = ("stratified", "random")
STRATEGIES = ("default", "mirrored")  # mirrored: tf.distribute.MirroredStrategy over this machine's devices

# keys whose change alters the results of an existing run (resume must refuse)
RESULT_KEYS = (
    "data", "backbones", "trainable", "random_init", "freeze_by", "weights", "epochs",
    "batch_size", "image_size", "optimizer", "lr", "fine_tune_lr", "loss", "dropout",
    "augment", "seed", "split", "val", "test", "kfold", "patience", "two_stage",
    "head_epochs", "train_bn", "lp_ft", "augment_views", "dedupe", "allow_nested", "allow_case_clash",
)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training sweep.

    Example::

        cfg = TrainConfig(data="data/digits", out="runs/d", backbones=("arc2",))
        cfg.epochs   # 10
    """

    data: str = ""
    out: str = ""
    backbones: tuple[str, ...] = ("mobilenet_v2",)
    trainable: tuple[float, ...] = (0.0,)
    random_init: bool = False
    freeze_by: str = "layers"
    weights: str = "imagenet"
    epochs: int = 10
    batch_size: int = 32
    image_size: int | None = None
    optimizer: str = "adam"
    lr: float | None = None
    fine_tune_lr: float | None = None
    loss: str = "crossentropy"
    dropout: float = 0.2
    augment: tuple[str, ...] = ()
    seed: int = 0
    split: str = "stratified"
    val: float = 0.2
    test: float = 0.1
    kfold: int | None = None
    patience: int = 3
    two_stage: bool = False
    head_epochs: int = 2
    tensorboard: bool = False
    workers: int = 2
    train_bn: bool = False
    strategy: str = "default"
    cache: bool = True
    lp_ft: bool = True
    augment_views: int = 0
    dedupe: bool = False  # duplicate groups (data.dedupe) stay on one side of the split
    allow_nested: bool = False  # images in sub-folders of a class folder belong to that class
    allow_case_clash: bool = False  # class folders whose names differ only in case are kept apart

    def __post_init__(self) -> None:
        validate(self)

    # -- derived -------------------------------------------------------------
    def lr_for(self, trainable: float, pretrained: bool) -> float:
        """Learning rate of a trial (see module docstring for the default rule)."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-4 if (pretrained and trainable > 0 and not self.two_stage) else 1e-3

    def fine_tune_lr_for(self, head_lr: float) -> float:
        return float(self.fine_tune_lr) if self.fine_tune_lr is not None else head_lr / 10.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def result_diff(self, other: "TrainConfig | dict") -> list[str]:
        """Keys in :data:`RESULT_KEYS` whose value differs from ``other``."""
        o = other.to_dict() if isinstance(other, TrainConfig) else dict(other)
        mine = self.to_dict()
        out = []
        for k in RESULT_KEYS:
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


def _fail(key: str, value, accepted: str) -> None:
    raise ConfigError(f"invalid {key}: {value!r}; accepted: {accepted}", option=key)


def validate(c: TrainConfig) -> None:
    """Raise :class:`ConfigError` for any invalid value (called by the constructor)."""
    if not c.backbones:
        raise ConfigError("no backbone given", hint="name one or more backbones (`transfer backbones` lists them)",
                          option="backbones")
    if not c.trainable and not c.random_init:
        raise ConfigError("no trial to run: no trainable fraction given and no random-init trial asked for",
                          option="trainable")
    for t in c.trainable:
        if not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ConfigError(f"invalid trainable fraction: {t!r}; accepted: numbers between 0 and 1 "
                              "(0 = frozen backbone, 1 = all)", option="trainable")
    if c.freeze_by not in FREEZE_BY:
        _fail("freeze_by", c.freeze_by, ", ".join(FREEZE_BY))
    if c.optimizer not in OPTIMIZERS:
        _fail("optimizer", c.optimizer, ", ".join(OPTIMIZERS))
    if c.loss not in LOSSES:
        _fail("loss", c.loss, ", ".join(LOSSES))
    if c.strategy not in STRATEGIES:
        _fail("strategy", c.strategy, ", ".join(STRATEGIES)
              + " (mirrored: one trial over all GPUs of the machine, or its logical CPU devices)")
    if c.split not in SPLIT_METHODS:
        _fail("split", c.split, ", ".join(SPLIT_METHODS))
    if not isinstance(c.epochs, int) or c.epochs < 1:
        _fail("epochs", c.epochs, "a positive integer")
    if not isinstance(c.batch_size, int) or c.batch_size < 1:
        _fail("batch_size", c.batch_size, "a positive integer")
    if c.image_size is not None and (not isinstance(c.image_size, int) or c.image_size < 1):
        _fail("image_size", c.image_size, "a positive integer (pixels) or unset for the backbone default")
    for k in ("lr", "fine_tune_lr"):
        v = getattr(c, k)
        if v is not None and (not isinstance(v, (int, float)) or v <= 0):
            _fail(k, v, "a positive number")
    if not isinstance(c.dropout, (int, float)) or not 0.0 <= c.dropout < 1.0:
        _fail("dropout", c.dropout, "a number in [0, 1)")
    for k in ("val", "test"):
        v = getattr(c, k)
        if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            _fail(k, v, "a fraction in [0, 1)")
    if c.val + c.test >= 1.0:
        raise ConfigError(f"val + test = {c.val + c.test:g} leaves no training data; keep it below 1", option="val")
    if c.kfold is not None and (not isinstance(c.kfold, int) or c.kfold < 2):
        _fail("kfold", c.kfold, "an integer >= 2 (or unset)")
    if not isinstance(c.patience, int) or c.patience < 0:
        _fail("patience", c.patience, "an integer >= 0 (0 = no early stopping)")
    if not isinstance(c.head_epochs, int) or c.head_epochs < 0:
        _fail("head_epochs", c.head_epochs, "an integer >= 0")
    if not isinstance(c.augment_views, int) or isinstance(c.augment_views, bool) or c.augment_views < 0:
        _fail("augment_views", c.augment_views, "an integer >= 0 (0 = train uncached when augmenting)")
    if not isinstance(c.workers, int) or c.workers < 1:
        _fail("workers", c.workers, "a positive integer")
    if not isinstance(c.seed, int):
        _fail("seed", c.seed, "an integer")
    if c.augment:
        bad = [a for a in c.augment if a not in AUGMENTATIONS]
        if bad:
            _fail("augment", ",".join(bad), ", ".join(sorted(AUGMENTATIONS)))


_TUPLE_KEYS = {"backbones": str, "trainable": float, "augment": str}
_ALIASES = {"backbone": "backbones", "fractions": "trainable"}


def _coerce(key: str, value):
    if key in _TUPLE_KEYS:
        cast = _TUPLE_KEYS[key]
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        try:
            return tuple(cast(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {key}: {value!r} ({exc})", option=key) from exc
    if key in ("data", "out", "weights") and value is not None:
        return str(value)
    if key in ("lr", "fine_tune_lr", "dropout", "val", "test") and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigError(f"invalid {key}: {value!r}; accepted: a number", option=key) from exc
    return value


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a dict, refusing unknown keys."""
    clean: dict[str, Any] = {}
    for k, v in values.items():
        key = _ALIASES.get(k, k).replace("-", "_")
        if key not in ACCEPTED_KEYS:
            raise ConfigError(
                f"unknown config key {k!r}",
                hint=f"accepted keys: {', '.join(ACCEPTED_KEYS)}",
            )
        clean[key] = _coerce(key, v)
    try:
        return TrainConfig(**clean)
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"invalid config: {exc}") from exc


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
    for k, v in (overrides or {}).items():
        values[_ALIASES.get(k, k).replace("-", "_")] = v
    # normalise aliases in YAML keys too
    norm: dict[str, Any] = {}
    for k, v in values.items():
        norm[_ALIASES.get(k, k).replace("-", "_") if isinstance(k, str) else k] = v
    return make_config(norm)


def config_from_yaml_text(text: str) -> TrainConfig:
    """Parse a saved ``config.yaml`` back into a TrainConfig."""
    import yaml

    return make_config(yaml.safe_load(text) or {})
