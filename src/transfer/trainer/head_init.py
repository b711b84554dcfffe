"""How a trial's softmax head starts: the converged linear probe on the initial model's pooled
features (fitted by :mod:`transfer.trainer.probe`).

* LP-FT: a pretrained start that fine-tunes gets the probe as its initial head before its
  first epoch (:func:`lp_ft_head`), so fine-tuning does not start from a random head.
* A head-only stage of a pooled backbone *is* the probe (:func:`probe_stage`): one fit to
  convergence, recorded as one epoch (one history row, one checkpoint).

The probe's features come from the frozen-prefix caches when the cache is on (then the
fitted probe is saved beside them and reused by the sweep's other trials of the backbone),
or are computed in memory from the images.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from ..fsutil import atomic_path
from ..models.freeze import apply_freeze
from ..models.split import Cut, find_cut, inference_function, prefix_model
from .epochs import TrialState
from .plan import Stage
from .probe import L2_GRID, MAX_ITER, Probe, fit_probe
from .stage_data import find_cache, image_source, prepare_caches, split_rows
from .trial import Trial


@dataclass(frozen=True)
class ProbeFit:
    """The linear probe of a trial's initial pooled features and where they came from.

    Attributes:
        probe: the fitted probe.
        reused: it was read from the probe file the sweep's first trial of the backbone saved.
        cache: what ``metrics.json`` says of the features' cache (``cache`` of a probe stage).
        rows: ``{split: cached pooled features}`` (empty: computed in memory).
    """

    probe: Probe
    reused: bool
    cache: dict
    rows: dict

    def head_record(self) -> dict:
        """``head`` of ``metrics.json``: the head started from this probe."""
        return {"init": "linear probe", **self.probe.record()}


def _features_in_memory(trial: Trial, cut: Cut):
    """(x_train, y_train, x_val, y_val) pooled features at the initial weights, from the images."""
    prefix = inference_function(prefix_model(trial.model, cut))

    def features(samples):
        src = image_source(trial, samples, train=False)
        xs, ys = [], []
        for i in range(len(src)):
            b = src.get(i)
            xs.append(np.asarray(prefix(b.x)[0]))
            ys.append(b.y)
        return np.concatenate(xs), np.concatenate(ys)

    xt, yt = features(trial.data.train)
    xv, yv = features(trial.data.val) if trial.data.val else (None, None)
    return xt, yt, xv, yv


def _features_from_caches(caches: dict, cut: Cut):
    """(x_train, y_train, x_val, y_val) pooled features at the initial weights, from the caches."""
    tr, va = find_cache(caches, "train", cut), find_cache(caches, "val", cut)
    xt, yt = tr.read(np.arange(tr.rows))[0], tr.labels
    xv, yv = (va.read(np.arange(va.rows))[0], va.labels) if va is not None else (None, None)
    return xt, yt, xv, yv


def _cache_record(caches: dict | None, cut: Cut) -> dict:
    used = [c for r, c in (caches or {}).items() if r.cut.frontier == cut.frontier and r.view is None]
    record = {"mode": "cached" if caches is not None else "uncached", "cut": cut.label, "frozen_layers": cut.depth,
              "bytes": sum(c.nbytes for c in used), "folders": sorted(c.folder.name for c in used),
              "prefix_seconds": round(sum(float(c.meta.get("seconds", 0.0)) for c in used), 3)}
    if caches is None:
        record["reason"] = "the cache is off: pooled features computed in memory"
    return record


def _probe_file(trial: Trial, caches: dict, cut: Cut):
    """Where the probe of these cached features is saved: keyed by the caches, the loss and the fit's settings."""
    keys = [trial.builder.ctx.key(r) for r in caches if r.cut.frontier == cut.frontier and r.view is None]
    ident = "|".join(sorted(keys) + [trial.cfg.loss, repr(L2_GRID), str(MAX_ITER)])
    return trial.builder.ctx.root / f"probe-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npz"


def initial_features(trial: Trial, stage: Stage) -> tuple:
    """``(x_train, y_train, x_val, y_val)``: the pooled features of the initial model (from the
    frozen-prefix cache when the cache is on, built with the sweep's other cuts in one pass; in
    memory otherwise). Leaves the model frozen as ``stage`` freezes it."""
    apply_freeze(trial.model, trial.info, 0.0, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    cut = find_cut(trial.model, trial.info, through_features=True)
    if trial.builder is None:
        out = _features_in_memory(trial, cut)
    else:
        out = _features_from_caches(prepare_caches(trial, stage, probe=True), cut)
    apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    return out


def linear_probe(trial: Trial, stage: Stage) -> ProbeFit:
    """The converged linear probe of this backbone's initial pooled features (fitted once, then reused)."""
    apply_freeze(trial.model, trial.info, 0.0, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    cut = find_cut(trial.model, trial.info, through_features=True)
    caches = prepare_caches(trial, stage, probe=True) if trial.builder is not None else None
    record = _cache_record(caches, cut)
    if caches is None:
        xt, yt, xv, yv = _features_in_memory(trial, cut)
        probe = fit_probe(xt, yt, xv, yv, num_classes=trial.num_classes, loss=trial.cfg.loss)
        return ProbeFit(probe, False, record, {})
    rows = split_rows(trial, cut, caches)  # a probe stage's rows (the pooled features: nothing else trains)
    path = _probe_file(trial, caches, cut)
    if path.is_file():
        try:
            return ProbeFit(Probe.load(path), True, record, rows)
        except (OSError, ValueError, KeyError):
            pass
    xt, yt, xv, yv = _features_from_caches(caches, cut)
    probe = fit_probe(xt, yt, xv, yv, num_classes=trial.num_classes, loss=trial.cfg.loss)
    with atomic_path(path, suffix=".npz") as tmp:
        probe.save(tmp)
    return ProbeFit(probe, False, record, rows)


def _set_head(model, probe: Probe) -> None:
    model.get_layer("probs").set_weights([probe.kernel, probe.bias])


def lp_ft_head(trial: Trial, stage: Stage) -> dict:
    """Start the head from the converged linear probe (before the first epoch of a fresh trial);
    returns ``head`` of ``metrics.json``. Leaves the model frozen as ``stage`` freezes it."""
    probe_fit = linear_probe(trial, stage)
    probe = probe_fit.probe
    _set_head(trial.model, probe)
    trial.say(f"head starts from the linear probe{' (reused)' if probe_fit.reused else ''} (val acc "
              f"{probe.val_accuracy if probe.val_accuracy is not None else probe.train_accuracy:.4f})")
    apply_freeze(trial.model, trial.info, stage.fraction, by=trial.spec.freeze_by, train_bn=stage.train_bn)
    return probe_fit.head_record()


def probe_stage(trial: Trial, stage: Stage, state: TrialState, history: list, epoch: int) -> ProbeFit:
    """A head-only stage of a pooled backbone: the linear probe is the head, epoch ``epoch``
    (one history row, one checkpoint; ``state`` and ``history`` are updated in place)."""
    t0 = time.perf_counter()
    probe_fit = linear_probe(trial, stage)
    probe = probe_fit.probe
    _set_head(trial.model, probe)
    trial.say(f"linear probe on the pooled features{' (reused)' if probe_fit.reused else ''}: train acc "
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
    return probe_fit
