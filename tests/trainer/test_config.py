from __future__ import annotations

import pytest

from transfer.errors import ConfigError
from transfer.trainer.config import ACCEPTED_KEYS, TrainConfig, config_from_yaml_text, load_config


def test_defaults_and_roundtrip():
    cfg = load_config(None, {"data": "d", "out": "r"})
    assert cfg.weights == "imagenet" and cfg.trainable == (0.0,) and cfg.freeze_by == "layers"
    assert cfg.epochs == 10 and cfg.batch_size == 32 and cfg.optimizer == "adam"
    assert cfg.patience == 3 and cfg.val == 0.2 and cfg.test == 0.1 and cfg.split == "stratified"
    assert config_from_yaml_text(cfg.to_yaml()) == cfg


def test_lr_default_rule():
    cfg = TrainConfig(data="d", out="r")
    assert cfg.lr_for(0.0, pretrained=True) == 1e-3
    assert cfg.lr_for(0.3, pretrained=True) == 1e-4
    assert cfg.lr_for(1.0, pretrained=False) == 1e-3
    assert TrainConfig(lr=0.05).lr_for(0.3, pretrained=True) == 0.05
    assert TrainConfig(lr=0.01).fine_tune_lr_for(0.01) == pytest.approx(0.001)


def test_yaml_values_overridden_by_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 7\nbackbones: [arc2, arc3]\ntrainable: 0,0.5\nlr: 0.01\noptimizer: sgd\n")
    cfg = load_config(y, {"epochs": 2, "data": "d"})
    assert cfg.epochs == 2  # flag wins
    assert cfg.backbones == ("arc2", "arc3") and cfg.trainable == (0.0, 0.5)
    assert cfg.lr == 0.01 and cfg.optimizer == "sgd"  # YAML kept where no flag
    assert load_config(y, {}).epochs == 7


def test_unknown_key_lists_accepted(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochz: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(y, {})
    assert "epochz" in ei.value.message
    assert "epochs" in ei.value.hint and "freeze_by" in ei.value.hint
    assert set(ACCEPTED_KEYS) >= {"two_stage", "head_epochs", "kfold", "train_bn", "tensorboard"}


@pytest.mark.parametrize("key,value,needle", [
    ("trainable", "0,1.5", "trainable"),
    ("epochs", 0, "epochs"),
    ("optimizer", "rmsprop", "sgd, adam"),
    ("loss", "hinge", "crossentropy, l1"),
    ("freeze_by", "weights", "layers, params, blocks"),
    ("val", 0.6, "no training data"),
    ("kfold", 1, "kfold"),
    ("patience", -1, "patience"),
    ("lr", -0.1, "lr"),
    ("dropout", 1.0, "dropout"),
])
def test_invalid_values(key, value, needle):
    ov = {"data": "d", "out": "r", key: value}
    if key == "val":
        ov["test"] = 0.5
    with pytest.raises(ConfigError) as ei:
        load_config(None, ov)
    assert needle in str(ei.value)


def test_bad_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(y, {})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", {})


def test_result_diff():
    a = TrainConfig(data="d", out="r", epochs=2)
    b = TrainConfig(data="d", out="r2", epochs=3, workers=4, tensorboard=True)
    assert a.result_diff(b) == ["epochs"]


def test_kfold_resume_ignores_the_val_options_it_does_not_use():
    from transfer.trainer.config import make_config

    base = {"data": "d", "out": "o", "kfold": 3}
    a, b = make_config({**base, "val": 0.2}), make_config({**base, "val": 0.5, "split": "random"})
    assert a.result_diff(b) == []
    assert make_config({"data": "d", "out": "o", "val": 0.2}).result_diff(make_config({"data": "d", "out": "o",
                                                                                      "val": 0.5})) == ["val"]


def test_initial_weights_per_backbone(tmp_path):
    from transfer.trainer.plan import plan_trials

    pre = tmp_path / "pre.keras"
    pre.write_bytes(b"x")
    cfg = load_config(None, {"data": "d", "out": "r", "backbones": "mobilenet_v2,arc2",
                             "weights": f"mobilenet_v2={pre}"})
    assert cfg.weights_for("mobilenet_v2") == str(pre) and cfg.weights_for("arc2") == "imagenet"
    specs = {(s.backbone, s.init, s.weights) for s in plan_trials(cfg)}
    assert specs == {("mobilenet_v2", "pretrained", str(pre)), ("arc2", "scratch", "none")}
    # a --config mapping is the same value
    y = tmp_path / "c.yaml"
    y.write_text(f"backbones: [mobilenet_v2, arc2]\nweights:\n  mobilenet_v2: {pre}\n  arc2: none\n")
    assert load_config(y, {}).weights == f"mobilenet_v2={pre},arc2=none"
    # one value for every backbone, even a path holding '=' when that file exists
    odd = tmp_path / "a=b.keras"
    odd.write_bytes(b"x")
    assert load_config(None, {"weights": str(odd)}).weights_for("mobilenet_v2") == str(odd)
    with pytest.raises(ConfigError, match="named for resnet50, which the sweep does not train") as ei:
        load_config(None, {"backbones": "arc2", "weights": "resnet50=none"})
    assert ei.value.option == "weights"
    with pytest.raises(ConfigError, match="invalid weights"):
        load_config(None, {"backbones": "arc2", "weights": "arc2="})


def test_schedule_options_are_checked_and_change_results():
    from transfer.trainer.config import PREPARED_KEYS, RESULT_KEYS

    cfg = load_config(None, {"schedule": "Halving", "halving_rate": 2, "first_rung": 2})
    assert (cfg.schedule, cfg.halving_rate, cfg.first_rung) == ("halving", 2, 2)
    for key, value in (("schedule", "asha"), ("halving_rate", 1), ("first_rung", 0)):
        with pytest.raises(ConfigError) as ei:
            load_config(None, {key: value})
        assert ei.value.option == key
    assert {"schedule", "halving_rate", "first_rung"} <= set(RESULT_KEYS)
    assert set(PREPARED_KEYS) <= set(RESULT_KEYS) and "epochs" not in PREPARED_KEYS
    assert TrainConfig(schedule="halving").result_diff(TrainConfig()) == ["schedule"]
