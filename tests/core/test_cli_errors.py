"""The CLI turns TransferError into 'error: ...' + exit code; --debug shows the traceback."""

from __future__ import annotations

import click
from click.testing import CliRunner

from transfer.cli import cli
from transfer.errors import ConfigError, TensorRTUnavailableError


@cli.command("_raise", hidden=True)
@click.argument("kind")
@click.option("--batch-size", "batch", type=int)
def _raise(kind, batch):
    if kind == "option":
        raise ConfigError("batch size must be positive (got 0)", option="batch")
    if kind == "config":
        raise ConfigError("bad option --x=3", hint="use 1 or 2")
    raise TensorRTUnavailableError("TensorRT needs an NVIDIA GPU with CUDA; none was found: test")


def test_user_error_is_clean_with_exit_code():
    res = CliRunner().invoke(cli, ["_raise", "config"])
    assert res.exit_code == 2
    assert "error: bad option --x=3" in res.output
    assert "hint: use 1 or 2" in res.output
    assert "Traceback" not in res.output


def test_an_error_about_a_parameter_is_shown_with_its_flag():
    """Library errors describe values; the CLI names the flag that fed the parameter."""
    res = CliRunner().invoke(cli, ["_raise", "option"])
    assert res.exit_code == 2
    assert "error: --batch-size: batch size must be positive (got 0)" in res.output


def test_tensorrt_missing_has_distinct_exit_code():
    res = CliRunner().invoke(cli, ["_raise", "trt"])
    assert res.exit_code == 3
    assert "none was found" in res.output


def test_debug_shows_traceback():
    res = CliRunner().invoke(cli, ["--debug", "_raise", "config"])
    assert res.exit_code == 2
    assert "Traceback" in res.output


def test_help_lists_commands():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output


def test_every_command_module_is_mapped_and_loaded_only_when_its_command_runs():
    """cli._COMMAND_OF names the module of every command: a module missing there would hide its
    commands; a runtime command must not import the trainer's or exporter's modules."""
    import importlib
    import pkgutil
    import subprocess
    import sys

    import transfer.commands as commands
    from transfer import cli as cli_mod

    declared = {}
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"transfer.commands.{info.name}")
        for cmd in getattr(mod, "COMMANDS", ()):
            declared[cmd.name] = info.name
    assert declared and all(info in cli_mod._COMMAND_OF[name] for name, info in declared.items()), declared
    assert set(cli_mod._COMMAND_OF) == set(declared) | {"data"}
    code = ("import sys; from transfer.cli import main\n"
            "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('transfer.trainer', 'transfer.export', "
            "'transfer.commands.train'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr
