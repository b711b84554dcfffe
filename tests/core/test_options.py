"""Options declared once: the flag, the check and the config field come from one spec."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from transfer.errors import ConfigError
from transfer.options import (Flag, Interval, ListOf, OneOf, Text, click_options, from_cli, group, make, option,
                              to_dict, validate)


@dataclass(frozen=True)
class Model:
    backend: str | None = option(None, OneOf("onnxruntime", "tensorrt"), "Backend.", none=True)
    threads: int | None = option(None, Interval(int, 1), "Threads.", none=True)


@dataclass(frozen=True)
class Demo:
    batch: tuple = option((1, 8), ListOf(Interval(int, 1)), "Batch sizes.")
    seconds: float = option(3.0, Interval(float, 0, closed="neither"), "Seconds.")
    accept: float = option(0.95, Interval(float, 0, 1, closed="neither"), "Share accepted.")
    name: str = option("x", Text("a name"), "A name.")
    cache: bool = option(True, Flag(), "Cache.", negative="--no-cache")
    debug: bool = option(False, Flag(), "Debug.")
    model: Model = group(Model)

    def __post_init__(self):
        validate(self)


def test_values_are_coerced_and_checked_with_one_wording():
    d = Demo(batch="1, 4,4", seconds=2, accept="0.5")
    assert d.batch == (1, 4) and d.seconds == 2.0 and isinstance(d.seconds, float) and d.accept == 0.5
    for kw, words in ((dict(batch="1,0"), "invalid batch: '1,0'; accepted: a comma list of one or more items, "
                                          "each an integer >= 1"),
                      (dict(seconds=0), "invalid seconds: 0; accepted: a number > 0"),
                      (dict(accept=1.0), "invalid accept: 1.0; accepted: a number > 0 and < 1"),
                      (dict(name=""), "invalid name: ''; accepted: a name"),
                      (dict(cache="maybe"), "invalid cache: 'maybe'; accepted: true or false"),
                      (dict(batch=""), "accepted: a comma list of one or more")):
        with pytest.raises(ConfigError) as err:
            Demo(**kw)
        assert words in err.value.message and err.value.option == next(iter(kw))
    with pytest.raises(ConfigError, match=r"invalid threads: 0; accepted: an integer >= 1 \(or unset\)"):
        Demo(model=Model(threads=0))
    assert Demo(model={"backend": "TensorRT"}).model.backend == "tensorrt"
    with pytest.raises(ConfigError, match="invalid seconds: True"):
        Demo(seconds=True)  # a bool is not a number


def test_make_reads_mappings_with_groups_flat_or_nested_and_refuses_unknown_keys():
    d = make(Demo, {"batch": [2], "backend": "onnxruntime"})
    assert d.batch == (2,) and d.model.backend == "onnxruntime"
    assert make(Demo, {"model": {"threads": 2}}).model.threads == 2
    with pytest.raises(ConfigError, match="unknown option 'speed'") as err:
        make(Demo, {"speed": 1})
    assert "batch" in err.value.hint and "threads" in err.value.hint
    assert to_dict(d)["model"] == {"backend": "onnxruntime", "threads": None} and to_dict(d)["batch"] == [2]


def test_the_command_line_takes_only_the_flags_given_over_the_base():
    seen = {}

    @click.command()
    @click_options(Demo)
    def cmd(**values):
        seen["cfg"] = from_cli(Demo, values, base={"seconds": 9.0})

    r = CliRunner().invoke(cmd, ["--batch", "4,16", "--no-cache", "--threads", "2"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.batch, cfg.cache, cfg.debug, cfg.seconds, cfg.model.threads) == ((4, 16), False, False, 9.0, 2)
    r = CliRunner().invoke(cmd, ["--seconds", "1", "--debug"])
    assert seen["cfg"].seconds == 1.0 and seen["cfg"].debug and seen["cfg"].cache
    helptext = CliRunner().invoke(cmd, ["--help"]).output
    assert "--batch" in helptext and "[default: 1,8]" in helptext and "--no-cache" in helptext
    r = CliRunner().invoke(cmd, ["--backend", "nope"])
    assert r.exit_code == 2 and "nope" in r.output  # click refuses a value that is not one of the choices


def test_the_cli_names_the_flag_of_an_invalid_value():
    """The library error names the field; the transfer CLI maps it to the flag the user typed."""
    from transfer.cli import cli

    r = CliRunner().invoke(cli, ["bench", "nowhere", "--batch", "0"])
    assert r.exit_code == 2
    assert "--batch: invalid value" in r.output and "accepted: a comma list" in r.output
