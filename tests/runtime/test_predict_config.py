"""The options of infer and serve, declared once: shared groups, rules between options, overlays."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from transfer.cli import cli
from transfer.errors import ConfigError
from transfer.options import make
from transfer.runtime.predict_config import InferConfig, ModelOptions, TrustOptions, configure
from transfer.serve.serve_config import ServeConfig


def test_infer_and_serve_share_the_model_and_trust_groups():
    i = make(InferConfig, {"head": "rf", "backend": "ONNXRuntime-int8", "trust": ["k.pub"], "batch": "16"})
    s = make(ServeConfig, {"head": "rf", "backend": "onnxruntime-int8", "trust": ["k.pub"]})
    assert i.model == s.model == ModelOptions(backend="onnxruntime-int8", head="rf")
    assert i.security == s.security == TrustOptions(trust=("k.pub",)) and i.batch == 16
    assert TrustOptions().store is None and TrustOptions(trust=()).store is False
    assert TrustOptions(trust=("a.pub",)).store == ["a.pub"]
    assert ModelOptions(reject=True).reject_rule is True
    assert ModelOptions(reject=True, unknown_score="knn").reject_rule == "knn" and ModelOptions().reject_rule is False


@pytest.mark.parametrize("values, option, words", [
    ({"unknown_score": "knn"}, "unknown_score", "accepted: a score only together with reject"),
    ({"address": "h:1"}, "address", "accepted: --address needs --ray (without it: none)"),
    ({"gpus_per_worker": 1}, "gpus_per_worker", "accepted: --gpus-per-worker needs --ray (without it: 0.0)"),
    ({"ray": True}, "out", "accepted: a file or FOLDER/ with ray"),
    ({"out": "p.jsonl", "fmt": "csv"}, "fmt", "accepted: jsonl, the format the output p.jsonl names"),
    ({"out": "shot.JPG"}, "out", "not an image or a Parquet file"),
    ({"providers": "cpu,,cuda"}, "providers", "no empty name"),
    ({"backend": "nope"}, "backend", "accepted: one of onnxruntime, onnxruntime-fp32"),
    ({"threads": 0}, "threads", "accepted: an integer >= 1 (or unset)"),
])
def test_rules_between_options_use_the_one_wording(values, option, words):
    with pytest.raises(ConfigError) as e:
        make(InferConfig, values)
    assert e.value.option == option and e.value.message.startswith(f"invalid {option}: ") and words in e.value.message


def test_serve_ray_options_need_ray():
    with pytest.raises(ConfigError, match="invalid replicas: 2; accepted: 1 without ray") as e:
        make(ServeConfig, {"replicas": 2})
    assert e.value.option == "replicas" and "--ray" in e.value.hint
    assert make(ServeConfig, {"replicas": 2, "ray": True}).replicas == 2


def test_configure_lays_flat_group_options_over_a_config():
    base = make(InferConfig, {"batch": 8, "head": "rf"})
    cfg = configure(InferConfig, base, {"threads": 2, "trust_pickle": True, "topk": 3})
    assert (cfg.batch, cfg.topk, cfg.model.head, cfg.model.threads, cfg.security.trust_pickle) == (8, 3, "rf", 2, True)
    assert configure(InferConfig, None, {}) == InferConfig() and configure(InferConfig, base) is base
    assert configure(InferConfig, base, {"model": ModelOptions(head="svm")}).model.head == "svm"
    with pytest.raises(ConfigError, match="unknown option 'speed'"):
        configure(InferConfig, base, {"speed": 1})


def test_the_cli_names_the_flag():
    r = CliRunner().invoke(cli, ["infer", "nowhere", "x.png", "--unknown-score", "msp"])
    assert r.exit_code == 2 and "--unknown-score: invalid value 'msp'" in r.output and "add --reject" in r.output
    r = CliRunner().invoke(cli, ["infer", "nowhere", "x.png", "--threads", "0"])
    assert r.exit_code == 2 and "--threads: invalid value 0; accepted: an integer >= 1" in r.output
