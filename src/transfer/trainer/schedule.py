"""How far each trial of a sweep trains: every trial to its last epoch (``full``), or successive
halving (``halving``).

Successive halving (Jamieson & Talwalkar 2016; the synchronous form of Li et al.'s ASHA): the
rungs end at ``first_rung``, ``first_rung * rate``, ``first_rung * rate**2`` ... epochs, and the
last rung at ``epochs``. Every trial trains to the first rung; then the trials that still have
epochs to train are ranked by the validation accuracy of their saved epoch (the one
``model.keras`` would hold: lowest validation loss so far) and the best ``ceil(n / rate)`` go on
to the next rung; the others stop there and are evaluated as they are. Trials whose training has
already ended (a linear probe is one epoch; early stopping) do not take a place: they are
complete. Only the trials of the last rung, and the complete ones, are trained to their full
budget; the sweep's best trial is chosen among them.

Ties (the same validation accuracy) go to the trial with more trainable parameters (it has more
room to improve in the next rung), then to the name in alphabetical order: a decision is never a
random pick. With ``--kfold`` a trial group (all folds of one backbone and fraction) is ranked by
its mean over the folds, and its folds go on or stop together.

The decisions are a pure function of the trials' saved history (:func:`decide`); the sweep
records each in ``RUN/rungs.json`` as it is made, so a killed sweep resumes to the same decisions
and trains no epoch twice.

Why not a library's scheduler: Optuna's ``SuccessiveHalvingPruner`` and Ray Tune's
``ASHAScheduler`` are the asynchronous form. A trial is promoted when it is in the top ``1 / rate``
of the trials that reached the rung *before it* (Optuna promotes the first ``rate - 1`` trials
outright, "Optuna does not support suspending or resuming ongoing trials"; Ray Tune's cutoff is a
percentile of the results recorded so far), so in a sweep that trains trials one after another the
first trial of every rung is never stopped, and the decisions depend on the order trials finish:
a resumed sweep, or Ray workers finishing in another order, could decide differently. Both keep
their state in their own storage (an Optuna study, a Tune experiment), beside the run folder that
already holds every trial's per-epoch checkpoint. The synchronous form needs neither: trials pause
at the rung on their checkpoint (the same resume a killed trial uses), and the decision is one
sort of the rung's standings. This module is TensorFlow-free and file-free.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from .config import TrainConfig
from .plan import TrialSpec


@dataclass(frozen=True)
class Schedule:
    """How the trials of a sweep train.

    Attributes:
        kind: ``full`` (every trial to its last epoch) or ``halving``.
        rungs: halving: the epoch each rung ends at (the last is ``epochs``).
        rate: halving: the best ``ceil(n / rate)`` go on at each rung.
        note: why halving was asked for and the sweep runs as a full one ("" otherwise).
    """

    kind: str
    rungs: tuple[int, ...] = ()
    rate: int = 3
    note: str = ""

    @property
    def halving(self) -> bool:
        return self.kind == "halving"


def rung_epochs(epochs: int, first: int, rate: int) -> list[int]:
    """The epochs the rungs end at: ``first``, ``first * rate``, ... below ``epochs``, then ``epochs``.

    Example::

        rung_epochs(8, 1, 3)   # [1, 3, 8]
        rung_epochs(8, 8, 3)   # [8]: one rung
    """
    out, e = [], int(first)
    while e < epochs:
        out.append(e)
        e *= int(rate)
    return out + [int(epochs)]


def plan_schedule(cfg: TrainConfig, specs: Sequence[TrialSpec]) -> Schedule:
    """The schedule a sweep runs. Halving with one trial (group), or with fewer epochs than two
    rungs need, runs as a full sweep, and ``note`` says so."""
    if cfg.schedule != "halving":
        return Schedule("full")
    groups = {s.group for s in specs}
    rungs = rung_epochs(cfg.epochs, cfg.first_rung, cfg.halving_rate)
    if len(groups) < 2:
        return Schedule("full", note="successive halving compares trials and this sweep has one: it runs as a "
                                     "plain sweep (every epoch trained)")
    if len(rungs) < 2:
        return Schedule("full", note=f"successive halving needs at least two rungs, and --epochs {cfg.epochs} with "
                                     f"a first rung of {cfg.first_rung} epoch(s) leaves one: the sweep runs as a plain "
                                     "sweep (every epoch trained); give more epochs or a shorter --first-rung")
    return Schedule("halving", tuple(rungs), int(cfg.halving_rate))


# -- standings and decisions ----------------------------------------------------------------

TRAINING, COMPLETE, FAILED = "training", "complete", "failed"


@dataclass(frozen=True)
class Standing:
    """Where one trial (or trial group) stands at a rung.

    Attributes:
        trial: the trial's name (its group's with ``--kfold``).
        epoch: epochs trained.
        accuracy: validation accuracy of its saved epoch (training accuracy without validation
            images); None when it has none (failed).
        loss: validation (training) loss of that epoch.
        trainable_params: its trainable parameters (the tie-break).
        state: ``training`` (epochs left), ``complete`` (its training ended: the last epoch, a
            one-step linear probe, or early stopping) or ``failed``.
    """

    trial: str
    epoch: int
    accuracy: float | None
    loss: float | None
    trainable_params: int
    state: str = TRAINING

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Standing":
        return cls(trial=str(d["trial"]), epoch=int(d["epoch"]),
                   accuracy=None if d.get("accuracy") is None else float(d["accuracy"]),
                   loss=None if d.get("loss") is None else float(d["loss"]),
                   trainable_params=int(d.get("trainable_params") or 0), state=str(d.get("state", TRAINING)))


def group_standing(name: str, folds: Sequence[Standing]) -> Standing:
    """One standing of a trial group (its folds): mean accuracy and loss; failed when a fold failed,
    complete when every fold is."""
    states = {s.state for s in folds}
    state = FAILED if FAILED in states else (COMPLETE if states == {COMPLETE} else TRAINING)
    accs = [s.accuracy for s in folds if s.accuracy is not None]
    losses = [s.loss for s in folds if s.loss is not None]
    return Standing(trial=name, epoch=min(s.epoch for s in folds),
                    accuracy=sum(accs) / len(accs) if accs and state != FAILED else None,
                    loss=sum(losses) / len(losses) if losses and state != FAILED else None,
                    trainable_params=max(s.trainable_params for s in folds), state=state)


def rank_key(s: Standing) -> tuple:
    """Sort key, best first: higher accuracy, then more trainable parameters, then the name."""
    acc = -math.inf if s.accuracy is None else float(s.accuracy)
    return (-acc, -int(s.trainable_params), s.trial)


@dataclass(frozen=True)
class RungDecision:
    """What one rung decided.

    Attributes:
        rung: 1-based.
        epoch: the epoch the rung ends at.
        standings: every trial of the rung, best first among those still training (then the
            complete, then the failed ones).
        promoted: trials that go on to the next rung.
        stopped: trials stopped here (evaluated at ``epoch``).
    """

    rung: int
    epoch: int
    standings: tuple[Standing, ...]
    promoted: tuple[str, ...]
    stopped: tuple[str, ...]
    rate: int = 3

    @property
    def contenders(self) -> int:
        """Trials that were still training at the rung (those ranked)."""
        return len(self.promoted) + len(self.stopped)

    def place(self, trial: str) -> int | None:
        """1-based place of a ranked trial (None: complete or failed)."""
        ranked = list(self.promoted) + list(self.stopped)
        return ranked.index(trial) + 1 if trial in ranked else None

    def stop_record(self, trial: str) -> dict:
        """``stopped`` of a stopped trial's ``metrics.json``: at which epoch and why."""
        s = next(x for x in self.standings if x.trial == trial)
        return {"epoch": self.epoch, "rung": self.rung, "place": self.place(trial), "of": self.contenders,
                "kept": len(self.promoted), "val_accuracy": s.accuracy,
                "why": f"successive halving: place {self.place(trial)} of {self.contenders} at rung {self.rung} "
                       f"(epoch {self.epoch}); the best {len(self.promoted)} went on"}

    def to_dict(self) -> dict:
        return {"rung": self.rung, "epoch": self.epoch, "rate": self.rate,
                "standings": [s.to_dict() for s in self.standings],
                "promoted": list(self.promoted), "stopped": list(self.stopped)}

    @classmethod
    def from_dict(cls, d: dict) -> "RungDecision":
        return cls(rung=int(d["rung"]), epoch=int(d["epoch"]),
                   standings=tuple(Standing.from_dict(s) for s in d.get("standings", [])),
                   promoted=tuple(d.get("promoted", [])), stopped=tuple(d.get("stopped", [])),
                   rate=int(d.get("rate", 3)))


def decide(rung: int, epoch: int, standings: Iterable[Standing], rate: int) -> RungDecision:
    """Rank the trials still training at a rung and keep the best ``ceil(n / rate)``.

    Example::

        s = [Standing("a", 1, 0.8, 0.5, 10), Standing("b", 1, 0.8, 0.4, 20), Standing("c", 1, 0.6, 0.9, 30)]
        decide(1, 1, s, 3).promoted   # ('b',): tied with a on accuracy, more trainable parameters
    """
    standings = list(standings)
    contenders = sorted((s for s in standings if s.state == TRAINING), key=rank_key)
    keep = math.ceil(len(contenders) / int(rate)) if contenders else 0
    rest = sorted((s for s in standings if s.state == COMPLETE), key=rank_key) + \
        sorted((s for s in standings if s.state == FAILED), key=lambda s: s.trial)
    return RungDecision(rung=int(rung), epoch=int(epoch), standings=tuple(contenders + rest),
                        promoted=tuple(s.trial for s in contenders[:keep]),
                        stopped=tuple(s.trial for s in contenders[keep:]), rate=int(rate))


@dataclass
class RungRecord:
    """The content of ``RUN/rungs.json``: the schedule, the cheap signals the trials were ordered
    by, and every decision made so far (in rung order)."""

    rungs: tuple[int, ...]
    rate: int
    order: list[str] = field(default_factory=list)
    signals: dict = field(default_factory=dict)
    decisions: list[RungDecision] = field(default_factory=list)

    def decision(self, rung: int) -> RungDecision | None:
        return next((d for d in self.decisions if d.rung == rung), None)

    def add(self, decision: RungDecision) -> None:
        self.decisions = [d for d in self.decisions if d.rung != decision.rung] + [decision]
        self.decisions.sort(key=lambda d: d.rung)

    def to_dict(self) -> dict:
        return {"schedule": "halving", "rate": self.rate, "rungs": list(self.rungs), "order": list(self.order),
                "signals": self.signals, "decisions": [d.to_dict() for d in self.decisions]}

    @classmethod
    def from_dict(cls, d: dict) -> "RungRecord":
        return cls(rungs=tuple(int(e) for e in d.get("rungs", [])), rate=int(d.get("rate", 3)),
                   order=list(d.get("order", [])), signals=dict(d.get("signals") or {}),
                   decisions=[RungDecision.from_dict(x) for x in d.get("decisions", [])])

    def matches(self, schedule: Schedule) -> bool:
        """The record was made by this schedule (same rungs and rate)."""
        return tuple(self.rungs) == tuple(schedule.rungs) and self.rate == schedule.rate


__all__ = ["Schedule", "rung_epochs", "plan_schedule", "Standing", "group_standing", "rank_key", "RungDecision",
           "decide", "RungRecord", "TRAINING", "COMPLETE", "FAILED"]
