"""One trial while it trains: its model, files and caches, all made when the trial is opened.

:func:`open_trial` builds the classifier from the backbone's shared initial weights, opens
the trial's folder, makes the frozen-prefix cache builder and reads the run's pixel recipe;
the :class:`Trial` it returns does not change afterwards (the model's weights do, as it
trains). What changes from stage to stage (the resume state, which cached rows a stage
read, what its data and head were made from) is returned by the functions that run the
stages (:mod:`transfer.trainer.fit`, :mod:`transfer.trainer.head_init`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .._lazy import import_keras, import_tensorflow
from ..fsutil import atomic_path, file_stamp
from ..models.build import BuildInfo, build_classifier
from ..progress import Progress, ProgressLike, as_progress
from ..runfolder import RunLayout, RunWriter
from .cache import CacheBuilder, CacheContext, weights_sha256
from .config import TrainConfig
from .epochs import TrialFiles
from .plan import TrialData, TrialSpec, cache_views, uses_lp_ft


@dataclass(frozen=True)
class Trial:
    """One trial while it trains: its inputs, files, model and cache builder.

    Attributes:
        writer: the run folder's writer.
        cfg: the resolved configuration.
        spec: what the trial trains.
        data: its images.
        siblings: trainable fractions of the sweep's other trials of this backbone, initial
            weights and fold (their frozen-prefix caches are built in the same pass).
        progress: where its lines go.
        replicas: replicas of the distribution strategy the trial trains under (1 without one):
            training and per-epoch validation batches are padded to a multiple of it.
        recipe: the run's pixel recipe (``dataset.json``): a resumed run keeps its own.
        files: the files the trial writes while it trains.
        model: the contract classifier (``keras.Model``) whose weights the stages train.
        info: what the model builder built (layers, feature width, Grad-CAM layer).
        builder: opens and builds the frozen-prefix caches (None with the cache off).
    """

    writer: RunWriter
    cfg: TrainConfig
    spec: TrialSpec
    data: TrialData
    siblings: tuple[float, ...]
    progress: Progress
    replicas: int
    recipe: dict | None
    files: TrialFiles
    model: Any
    info: BuildInfo
    builder: CacheBuilder | None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def say(self, text: str) -> None:
        self.progress.say(f"  [{self.spec.name}] {text}")

    def meta(self) -> dict:
        """The content of ``trial.json``."""
        spec, info = self.spec, self.info
        return {"name": spec.name, "group": spec.group, "fold": spec.fold, "backbone": spec.backbone,
                "init": spec.init, "weights": spec.weights, "trainable": spec.trainable,
                "freeze_by": spec.freeze_by, "image_size": list(spec.image_size),
                "gradcam_layer": info.gradcam_layer, "feature_dim": int(info.feature_dim),
                "num_classes": self.num_classes, "preprocess": info.preprocess,
                "lp_ft": uses_lp_ft(self.cfg, spec), "cache": self.cfg.cache,
                "augment_views": cache_views(self.cfg)}


def open_trial(writer: RunWriter, cfg: TrainConfig, spec: TrialSpec, data: TrialData, *,
               siblings: Sequence[float] = (), progress: ProgressLike = None, replicas: int = 1,
               folder: bool = True) -> Trial:
    """Open a trial for training: its folder (leftovers of a killed write removed), its model at
    the shared initial weights, its cache builder (which hashes those weights, so it is made
    before any checkpoint is loaded) and the run's pixel recipe.

    Under a distribution strategy call it inside ``strategy.scope()``: the model is built there.
    ``folder`` False: the trial's folder is not made (the backbone's initial model and caches
    only, as :mod:`transfer.trainer.rank` reads them).

    Raises:
        TransferError: bad backbone / weights / size (from the model builder).
    """
    files = TrialFiles(writer, spec.name, data.root)
    if folder:
        files.paths.dir.mkdir(parents=True, exist_ok=True)
        writer.remove_leftovers(spec.name)
    model, info = build_trial_model(writer.path, cfg, spec, data.num_classes)
    p = as_progress(progress)
    recipe = writer.saved_dataset().get("preprocessing")  # what the run's first trials decoded with
    builder = _cache_builder(writer, cfg, spec, data.root, model, recipe, p) if cfg.cache else None
    return Trial(writer=writer, cfg=cfg, spec=spec, data=data, siblings=tuple(float(f) for f in siblings),
                 progress=p, replicas=int(replicas), recipe=recipe, files=files, model=model, info=info,
                 builder=builder)


def _cache_builder(writer: RunWriter, cfg: TrainConfig, spec: TrialSpec, data_root: Path, model, recipe: dict | None,
                   progress: Progress) -> CacheBuilder:
    """The cache builder of a trial, from the model at its initial weights."""
    ctx = CacheContext(root=writer.cache_group(spec.backbone, spec.init), data_root=data_root,
                       backbone=spec.backbone, init=spec.init, image_size=tuple(spec.image_size),
                       weights_sha256=weights_sha256(model), batch_size=cfg.batch_size, seed=cfg.seed,
                       augment=tuple(cfg.augment), workers=cfg.workers, say=progress.say, recipe=recipe)
    return CacheBuilder(ctx, model)


# -- the model ---------------------------------------------------------------------------

def _set_determinism(seed: int) -> None:
    tf = import_tensorflow()
    keras = import_keras()
    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def build_trial_model(run_dir: Path, cfg: TrainConfig, spec: TrialSpec, num_classes: int):
    """Build the classifier of a trial and load (or create) the shared initial weights.

    The initial weights ``RUN/init/<backbone>-<init>.weights.h5`` are written by the first
    trial of that backbone + init, so every trial of a backbone starts from the same weights.

    Random initial weights (``init`` random or scratch) keep Keras's BatchNormalization
    statistics 0 / 1 in their frozen layers, as a user's frozen random backbone has them.
    Their outputs can be tiny (MobileNetV2's pooled features are ~1e-12), so their caches
    are float32 (:func:`transfer.trainer.plan.train_cache_dtype`) and the linear probe
    standardizes the features. Setting population statistics in the frozen layers instead
    was tried and is worse: MobileNetV2 from random weights, 30 % trainable, on the digits
    reached val accuracy 0.33-0.44 with them against 0.83-0.90 without (5 epochs, 32x32,
    cached and uncached alike).

    Returns:
        ``(model, info)`` of :func:`transfer.models.build.build_classifier`.
    """
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
