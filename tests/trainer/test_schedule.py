"""The schedule of a sweep: rungs, the rung decisions and their tie-break (pure, no TensorFlow)."""

from __future__ import annotations

from transfer.trainer.config import TrainConfig
from transfer.trainer.plan import plan_trials
from transfer.trainer.schedule import (COMPLETE, FAILED, RungRecord, Standing, decide, group_standing, plan_schedule,
                                       rung_epochs)


def _cfg(**kw) -> TrainConfig:
    base = dict(data="d", out="r", backbones=("arc2",), trainable=(0.0, 0.5, 1.0), weights="none", epochs=8,
                schedule="halving")
    base.update(kw)
    return TrainConfig(**base)


def test_rungs_grow_by_the_rate_and_end_at_the_last_epoch():
    assert rung_epochs(8, 1, 3) == [1, 3, 8]
    assert rung_epochs(9, 1, 3) == [1, 3, 9]
    assert rung_epochs(10, 2, 2) == [2, 4, 8, 10]
    assert rung_epochs(8, 8, 3) == [8]
    cfg = _cfg()
    s = plan_schedule(cfg, plan_trials(cfg))
    assert s.halving and s.rungs == (1, 3, 8) and s.rate == 3 and not s.note
    assert not plan_schedule(_cfg(schedule="full"), plan_trials(cfg)).halving


def test_a_schedule_with_one_trial_or_fewer_epochs_than_rungs_runs_as_a_plain_sweep_and_says_so():
    one = _cfg(trainable=(1.0,))
    s = plan_schedule(one, plan_trials(one))
    assert s.kind == "full" and "has one" in s.note and "plain sweep" in s.note
    short = _cfg(epochs=1)
    s = plan_schedule(short, plan_trials(short))
    assert s.kind == "full" and "two rungs" in s.note and "--epochs 1" in s.note
    late = _cfg(first_rung=8)  # the first rung is the last epoch: one rung
    assert plan_schedule(late, plan_trials(late)).kind == "full"
    # k folds of one fraction are one trial group: nothing to compare
    folds = _cfg(trainable=(0.5,), kfold=3)
    assert len(plan_trials(folds)) == 3 and plan_schedule(folds, plan_trials(folds)).kind == "full"


def test_the_best_third_rounded_up_goes_on_ties_by_trainable_parameters_then_name():
    s = [Standing("a-t010", 1, 0.80, 0.50, 100), Standing("a-t030", 1, 0.80, 0.40, 300),
         Standing("b-t030", 1, 0.80, 0.45, 300), Standing("a-t050", 1, 0.90, 0.90, 50),
         Standing("a-t070", 1, 0.60, 0.30, 700), Standing("a-t100", 1, None, None, 1000)]
    d = decide(1, 1, s, 3)
    # 6 contenders -> 2 go on: the best accuracy, then the tie at 0.80 goes to more parameters, then the name
    assert d.promoted == ("a-t050", "a-t030") and d.contenders == 6
    assert d.stopped == ("b-t030", "a-t010", "a-t070", "a-t100")
    assert [x.trial for x in d.standings][:3] == ["a-t050", "a-t030", "b-t030"]
    rec = d.stop_record("a-t010")
    assert rec["epoch"] == 1 and rec["rung"] == 1 and rec["place"] == 4 and rec["of"] == 6 and rec["kept"] == 2
    assert "place 4 of 6" in rec["why"]
    # the same standings in another order decide the same
    assert decide(1, 1, list(reversed(s)), 3) == d
    # 7 contenders at rate 3 keep 3 (rounded up); a lone contender goes on
    seven = [Standing(f"t{i}", 1, i / 10, 0.0, 1) for i in range(7)]
    assert decide(1, 1, seven, 3).promoted == ("t6", "t5", "t4")
    assert decide(2, 3, [Standing("x", 3, 0.1, 1.0, 1)], 3).promoted == ("x",)


def test_complete_and_failed_trials_take_no_place():
    s = [Standing("probe", 1, 0.99, 0.1, 10, COMPLETE), Standing("broken", 0, None, None, 0, FAILED),
         Standing("a", 1, 0.5, 0.5, 10), Standing("b", 1, 0.4, 0.5, 10)]
    d = decide(1, 1, s, 3)
    assert d.promoted == ("a",) and d.stopped == ("b",) and d.contenders == 2
    assert d.place("probe") is None and [x.trial for x in d.standings] == ["a", "b", "probe", "broken"]


def test_a_trial_group_of_folds_stands_by_its_mean_and_a_failed_fold_fails_it():
    folds = [Standing("a-f1", 1, 0.6, 0.4, 10), Standing("a-f2", 1, 0.8, 0.2, 10)]
    g = group_standing("a", folds)
    assert g.trial == "a" and abs(g.accuracy - 0.7) < 1e-12 and abs(g.loss - 0.3) < 1e-12 and g.state == "training"
    bad = group_standing("a", folds + [Standing("a-f3", 0, None, None, 0, FAILED)])
    assert bad.state == FAILED and bad.accuracy is None
    done = group_standing("a", [Standing("a-f1", 1, 0.6, 0.4, 10, COMPLETE)] * 2)
    assert done.state == COMPLETE


def test_the_record_reads_back_what_it_wrote():
    rec = RungRecord(rungs=(1, 3, 8), rate=3, order=["arc2"], signals={"arc2": {"logme": 0.1}})
    rec.add(decide(1, 1, [Standing("a", 1, 0.5, 0.5, 10), Standing("b", 1, 0.4, 0.5, 10)], 3))
    back = RungRecord.from_dict(rec.to_dict())
    assert back.to_dict() == rec.to_dict() and back.decision(1) == rec.decision(1) and back.decision(2) is None
    assert back.matches(plan_schedule(_cfg(), plan_trials(_cfg())))
    assert not back.matches(plan_schedule(_cfg(halving_rate=2), plan_trials(_cfg())))
