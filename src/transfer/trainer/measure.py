"""The evaluation of a trained trial: its saved model run on the images of every split, the way
a user runs it, into ``metrics.json``.

The model runs once per image (pooled features, then its softmax head on them). Each split's
frozen part is read from the cache a stage computed before training when there is one (the
frozen layers of the saved model are those weights: only its trained layers run, traced once
for the three splits; validation and test rows are float32, so their numbers are what the
saved model computes from the images), the rest from the images. A
trial whose training moved the features gets its head refitted on them when that validates
better (:func:`refit_head`), so no trial's head is undertrained for its own features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..data.batches import read_ahead
from ..data.image import recipe_version
from ..models.build import load_model
from ..models.split import features_model, inference_function, pixel_cut
from ..plots import plot_curves
from .epochs import TrialFiles
from .probe import fit_probe, head_numbers
from .stage_data import CachedRows, image_source
from .trial import Trial

#: ``batchnorm`` of ``metrics.json`` when no BatchNormalization layer trained
STORED_STATISTICS = {"statistics": "stored (no BatchNormalization layer trains)"}


@dataclass(frozen=True)
class TrainedTrial:
    """What training left for the evaluation (see :func:`transfer.trainer.fit.run_trial`).

    Attributes:
        history: the rows of ``history.csv``.
        best_epoch: the epoch ``model.keras`` holds.
        last_epoch: the last finished epoch.
        params: (trainable, non-trainable) parameter counts.
        freeze: the last stage's freeze summary (None when no stage ran in this process).
        head: how the head started (``random``, ``resumed`` or the linear probe's record).
        cache: what the last stage's data was read from (None: no stage ran in this process).
        batchnorm: the last population BatchNormalization pass (None: none ran).
        probe_only: the trial trained nothing but a converged linear probe.
        rows: ``{split: cached rows}`` the last stage's caches hold for every image of the split.
        budget: the epochs of the trial's whole plan.
        stopped: why the trial stopped before the end of its plan (a sweep's rung: the epoch,
            the rung, its place); None when its training ended.
    """

    history: list[dict]
    best_epoch: int
    last_epoch: int
    params: tuple[int, int]
    freeze: dict | None
    head: dict = field(default_factory=dict)
    cache: dict | None = None
    batchnorm: dict | None = None
    probe_only: bool = False
    rows: dict = field(default_factory=dict)
    budget: int | None = None
    stopped: dict | None = None


def _pooled_outputs(forward, trial: Trial, samples):
    """(pooled features, labels, paths) of ``samples`` through the saved model (``forward``:
    images -> pooled features), the images decoded as for training while the model runs on
    the batch before; an unreadable file is left out and listed."""
    src = image_source(trial, samples, train=False)
    feats, labels, paths = [], [], []
    workers = max(1, int(trial.cfg.workers))
    for b in read_ahead(src.get, len(src), workers=workers, ahead=workers + 1):
        feats.append(np.asarray(forward(b.x)[0], dtype=np.float32))
        labels.append(b.y)
        paths += list(b.paths)
    trial.files.bad_files(src.failed)
    return np.concatenate(feats), np.concatenate(labels), paths


def _cached_outputs(forward, rows: CachedRows, samples, batch_size: int):
    """(pooled features, labels, paths) of a split's images from the cache of their frozen part
    (computed once, before training; the frozen layers of the saved model are those weights),
    through ``forward``, the rest of the saved model (None: the cache holds the pooled features)."""
    cache = rows.cache
    index = np.arange(cache.rows)
    if forward is None:
        feats = cache.read(index)[0]
    else:
        feats = np.concatenate([np.asarray(forward(*cache.read(index[i:i + batch_size]))[0], dtype=np.float32)
                                for i in range(0, len(index), batch_size)])
    return feats, np.asarray(cache.labels[:], dtype=np.int64), [s.path for s in samples]


def _head_numbers(feats: np.ndarray, labels: np.ndarray, kernel, bias, loss: str) -> dict:
    """Accuracy and loss of the softmax head ``(kernel, bias)`` on pooled features, as Keras computes them."""
    value, accuracy = head_numbers(feats, labels, kernel, bias, loss)
    return {"accuracy": accuracy, "loss": value}


def refit_head(best, outputs: dict, loss: str, files: TrialFiles) -> dict:
    """Fit the softmax head to convergence on the trained model's own pooled features and keep it
    when its validation loss is lower than the trained head's (the saved model is then rewritten).

    A fine-tuned backbone's head ends where the last epoch left it; a logistic regression on
    the same features can do better. Without validation images the trained head is kept.
    """
    kernel, bias = best.get_layer("probs").get_weights()
    record: dict = {"trained": _head_numbers(*outputs["val"][:2], kernel, bias, loss) if "val" in outputs else None}
    if "val" not in outputs or "train" not in outputs:
        record["refit"] = {"chosen": False, "why": "no validation images to choose by"}
        return record
    probe = fit_probe(*outputs["train"][:2], *outputs["val"][:2], num_classes=len(bias), loss=loss)
    refit = _head_numbers(*outputs["val"][:2], probe.kernel, probe.bias, loss)
    chosen = refit["loss"] < record["trained"]["loss"]
    record["refit"] = {"chosen": bool(chosen), "val": refit, **probe.record()}
    if chosen:
        best.get_layer("probs").set_weights([probe.kernel, probe.bias])
        files.save_model(best, files.paths.model_keras)
    return record


def _split_outputs(trial: Trial, trained: TrainedTrial, best) -> tuple[dict, dict]:
    """``{split: (pooled features, labels, paths)}`` of every split with images, and where each
    split's features were computed."""
    forward = None  # the saved model from images to pooled features, traced on first use
    trained_part: dict = {}  # the saved model from a cut's frontier to pooled features, traced once per cut
    outputs, computed_from = {}, {}
    for split, samples in trial.data.splits():
        if not len(samples):
            continue
        rows = trained.rows.get(split)
        if rows is not None:
            cut, key = rows.cut, (rows.cut.prefix, rows.cut.frontier)
            if cut.frontier != ("features",) and key not in trained_part:
                trained_part[key] = inference_function(features_model(best, cut))
            outputs[split] = _cached_outputs(trained_part.get(key), rows, samples, trial.cfg.batch_size)
            computed_from[split] = (f"the decoded pixels {rows.cache.folder.name}, through the saved model"
                                    if cut.label == "pixels" else f"the cache {rows.cache.folder.name} "
                                    f"({rows.cache.dtype.name}), through the saved model's trained layers")
            continue
        if forward is None:
            forward = inference_function(features_model(best, pixel_cut(trial.spec.image_size)))
        outputs[split] = _pooled_outputs(forward, trial, samples)
        computed_from[split] = "the images, through the saved model"
    return outputs, computed_from


def _without_duplicates(trial: Trial, outputs: dict, kernel, bias) -> dict | None:
    """The test numbers without the images that have a copy in train or val (None: no such copy)."""
    leaked = trial.writer.leaked_paths("test")
    if not leaked or "test" not in outputs:
        return None
    feats, labels, paths = outputs["test"]
    keep = np.array([p not in leaked for p in paths], dtype=bool)
    return {**(_head_numbers(feats[keep], labels[keep], kernel, bias, trial.cfg.loss) if keep.any()
               else {"accuracy": None, "loss": None}),
            "images": int(keep.sum()), "left_out": int((~keep).sum())}


def evaluate_trial(trial: Trial, trained: TrainedTrial) -> dict:
    """Evaluate the saved best model on the images of every split (as a user runs it) and write
    ``metrics.json``, ``curves.png`` and ``status.json`` (done); the resume checkpoint is then removed.

    When test images have a duplicate in train or val (``duplicates.csv`` of the run, made
    without ``--dedupe``), ``test_without_duplicates`` is the accuracy on the other test
    images: what a split that keeps duplicates on one side would have measured.

    Returns:
        The content of ``metrics.json``.
    """
    t0 = time.perf_counter()
    spec, cfg, files = trial.spec, trial.cfg, trial.files
    best = load_model(files.paths.model_keras)
    outputs, computed_from = _split_outputs(trial, trained, best)
    head = dict(trained.head)
    if not trained.probe_only:
        head.update(refit_head(best, outputs, cfg.loss, files))
    kernel, bias = best.get_layer("probs").get_weights()
    metrics: dict = {split: (_head_numbers(*outputs[split][:2], kernel, bias, cfg.loss) if split in outputs
                             else {"accuracy": None, "loss": None}) for split, _ in trial.data.splits()}
    clean = _without_duplicates(trial, outputs, kernel, bias)
    if clean is not None:
        metrics["test_without_duplicates"] = clean
    p_tr, p_nt = trained.params
    secs = [r["seconds"] for r in trained.history if r.get("seconds") is not None]
    cache = trained.cache or {"mode": "none", "prefix_seconds": 0.0}
    metrics.update({
        "params": {"trainable": p_tr, "non_trainable": p_nt, "total": p_tr + p_nt},
        "seconds_per_epoch": (sum(secs) / len(secs)) if secs else None,
        "epochs_run": len(trained.history),
        "epochs_trained": trained.last_epoch,  # epochs count across stages; a probe stage is one
        "epochs_budget": trained.budget,
        "stopped": trained.stopped,  # None: trained to the end of its plan (or early stopping ended it)
        "best_epoch": trained.best_epoch,
        "freeze": trained.freeze,
        "cache": cache,
        "batchnorm": trained.batchnorm or dict(STORED_STATISTICS),
        "head": head,
        "features_from": computed_from,  # where each split's pooled features were computed
        "recipe": recipe_version(trial.recipe),  # the pixel recipe the images were decoded with
        "cost": {"prefix_seconds": float(cache.get("prefix_seconds") or 0.0), "train_seconds": round(sum(secs), 3),
                 "evaluate_seconds": round(time.perf_counter() - t0, 3)},
    })
    if trained.history:
        plot_curves(trained.history, files.paths.curves_png, title=spec.name)
    trial.writer.write_metrics(spec.name, metrics)
    trial.writer.write_status(spec.name, "done", trained.last_epoch)
    trial.writer.remove_resume_checkpoint(spec.name)
    return metrics
