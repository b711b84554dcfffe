"""Cheap signals before any training: each candidate backbone's LogME score
(:mod:`transfer.trainer.transferability`) and converged linear probe on the pooled features of
its initial weights, read from the frozen-prefix cache the sweep builds anyway.

:func:`backbone_signals` gives them for the backbones of a sweep (``--schedule halving`` orders
its trials by them); :func:`rank_backbones` is ``transfer rank``: it prepares the run folder as a
sweep would (index, split, initial weights), scores every backbone and writes ``rank.json`` /
``rank.md``. A sweep trained into the same run folder afterwards finds the initial weights, the
caches (every cut of each backbone is computed in the same pass) and the fitted probes, and
does not compute them again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..locks import locked
from ..progress import Progress, ProgressLike, as_progress, clock
from ..runfolder import RunWriter
from .config import TrainConfig
from .head_init import initial_features, linear_probe
from .plan import TrialSpec, plan_stages, plan_trials
from .prepare import PreparedRun, check_options, prepare_run
from .transferability import logme
from .trial import open_trial


@dataclass(frozen=True)
class BackboneSignal:
    """What a backbone's initial pooled features say about the target, before any training.

    Attributes:
        backbone: the backbone.
        weights: its initial weights (imagenet, none or a PATH).
        feature_dim: width of its pooled features.
        images: training images scored.
        logme: the LogME score on the training images (higher is better).
        probe_val_accuracy: validation accuracy of the converged linear probe (training
            accuracy without validation images: ``probe_metric`` says which).
        probe_metric: ``val_accuracy`` or ``train_accuracy``.
        seconds: what the signals cost (model, cache pass, score, probe).
    """

    backbone: str
    weights: str
    feature_dim: int
    images: int
    logme: float
    probe_val_accuracy: float | None
    probe_metric: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _signal(run: PreparedRun, cfg: TrainConfig, spec: TrialSpec, siblings, p: Progress) -> BackboneSignal:
    t0 = time.perf_counter()
    data = run.trial_data(spec)
    probe_spec = replace(spec, trainable=0.0)
    trial = open_trial(run.writer, cfg, probe_spec, data, siblings=siblings, progress=p, folder=False)
    stage = plan_stages(cfg, probe_spec)[0]
    xt, yt, _, _ = initial_features(trial, stage)
    score = logme(xt, yt, num_classes=len(run.class_names))
    probe = linear_probe(trial, stage).probe
    val = probe.val_accuracy
    return BackboneSignal(backbone=spec.backbone, weights=spec.weights, feature_dim=int(xt.shape[1]),
                          images=int(xt.shape[0]), logme=round(score.score, 6),
                          probe_val_accuracy=val if val is not None else probe.train_accuracy,
                          probe_metric="val_accuracy" if val is not None else "train_accuracy",
                          seconds=round(time.perf_counter() - t0, 3))


def backbone_signals(run: PreparedRun, cfg: TrainConfig, specs: list[TrialSpec], progress: ProgressLike = None,
                     ) -> dict[str, BackboneSignal]:
    """The signals of every backbone of ``specs`` (first fold, non-random starts), in plan order.

    Each backbone's caches are built here for all of the sweep's cuts in one pass (``siblings``),
    so its trials find them.
    """
    p = as_progress(progress)
    out: dict[str, BackboneSignal] = {}
    for spec in specs:
        if spec.backbone in out or spec.init == "random" or (spec.fold or 1) != 1:
            continue
        siblings = run.siblings(spec, specs)
        sig = _signal(run, cfg, spec, siblings, p)
        out[spec.backbone] = sig
        p.say(f"  {spec.backbone}: LogME {sig.logme:.4f}, linear probe {sig.probe_metric.replace('_', ' ')} "
              f"{sig.probe_val_accuracy:.4f} ({sig.feature_dim} features of {sig.images} training images, "
              f"{clock(sig.seconds)})")
    return out


def ranked(signals: dict[str, BackboneSignal]) -> list[BackboneSignal]:
    """Best first: higher LogME, then the better linear probe, then the name."""
    return sorted(signals.values(), key=lambda s: (-s.logme, -(s.probe_val_accuracy or 0.0), s.backbone))


@dataclass
class RankResult:
    """What ``transfer rank`` found: backbones best first, and where it was written."""

    run_dir: Path
    backbones: list[BackboneSignal] = field(default_factory=list)
    seconds: float = 0.0
    table_md: str = ""


RANK_HEADER = ("place", "backbone", "weights", "LogME", "linear probe", "features", "images", "seconds")


def rank_rows(signals: list[BackboneSignal]) -> list[list]:
    return [[i, s.backbone, s.weights if len(s.weights) <= 40 else "..." + s.weights[-37:], f"{s.logme:.4f}",
             f"{s.probe_val_accuracy:.4f}" + ("" if s.probe_metric == "val_accuracy" else " (train)"),
             s.feature_dim, s.images, f"{s.seconds:.1f}"] for i, s in enumerate(signals, 1)]


def rank_backbones(config: TrainConfig, *, progress: ProgressLike = None) -> RankResult:
    """Rank the backbones of ``config`` by LogME on their initial pooled features, before any training.

    Prepares ``config.out`` as a sweep would (index, split, initial weights; a run folder that
    exists keeps its split, and must have been made with the same split and initial weights),
    then scores each backbone. Writes ``rank.json`` and ``rank.md`` into the run folder.

    Returns:
        A :class:`RankResult`, best backbone first.

    Raises:
        ConfigError, DataError, RunFolderError, LockedError: as :func:`transfer.trainer.sweep.run_sweep`.

    Example::

        res = rank_backbones(load_config(None, {"data": "data/d", "out": "runs/d",
                                                "backbones": "mobilenet_v2,arc2,arc3"}))
        [s.backbone for s in res.backbones]
    """
    p = as_progress(progress)
    t0 = time.perf_counter()
    _, run_dir = check_options(config)
    RunWriter(run_dir).check_target()
    with locked(run_dir, purpose="rank"):
        run, _ = prepare_run(config, p, trains=False)
        cfg = replace(config, trainable=(0.0,), random_init=False, schedule="full")
        specs = plan_trials(cfg)
        p.say(f"rank: {len(cfg.backbones)} backbone(s) on {len(run.parts['train'])} training images "
              f"({len(run.class_names)} classes)")
        order = ranked(backbone_signals(run, cfg, specs, p))
        seconds = time.perf_counter() - t0
        md = run.writer.write_rank([s.to_dict() for s in order], RANK_HEADER, rank_rows(order),
                                   seconds=round(seconds, 3))
    return RankResult(run_dir=run.writer.path, backbones=order, seconds=seconds, table_md=md)


__all__ = ["BackboneSignal", "backbone_signals", "ranked", "rank_backbones", "RankResult", "rank_rows"]
